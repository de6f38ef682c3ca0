"""SigLIP vision tower adapter (`SiglipVisionModel`). There is no CLS token: every token may merge
(tome), and the attention-pooling head attends to the merged tokens with their sizes."""

import torch
from torch import nn
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from turbo.models.adapters import FamilyAdapter, fixed_size_processor
from turbo.models.clip import clip_block_parts


def _tower(model: nn.Module) -> nn.Module:
    return model.vision_model if hasattr(model, "vision_model") else model


def attention_pool(head: nn.Module, hidden: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """SigLIP's pooling head with proportional attention: the probe's attention to a merged token
    gets +log(size), as if the patches it stands for were all still there. (B, N, C) -> (B, C)."""
    if size is None:
        return head(hidden)
    probe = head.probe.expand(hidden.shape[0], -1, -1)  # (B, 1, C)
    bias = size.log().to(hidden.dtype).transpose(1, 2)  # (B, 1, N)
    mask = bias.repeat_interleave(head.attention.num_heads, dim=0)  # (B·heads, 1, N)
    pooled = head.attention(probe, hidden, hidden, attn_mask=mask, need_weights=False)[0]  # (B, 1, C)
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The pooled image embedding (the head's, sizes included) and the final hidden states."""
    tower = _tower(model)
    hidden = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    hidden = tower.post_layernorm(tower.encoder(inputs_embeds=hidden).last_hidden_state)  # (B, N_final, C)
    if not tower.use_head:
        return {"last_hidden_state": hidden}
    state = getattr(model, "turbo_state", None)
    size = None if state is None else state.size  # (B, N_final, 1) once a block merged
    return {"pooler_output": attention_pool(tower.head, hidden, size), "last_hidden_state": hidden}


SIGLIP = FamilyAdapter(
    family="siglip",
    architectures=("SiglipVisionModel",),
    model_types=("siglip_vision_model",),
    layer_class=lambda: SiglipEncoderLayer,
    encoder_layers=lambda model: _tower(model).encoder.layers,
    block_parts=clip_block_parts,
    export_outputs=_export_outputs,
    embedders=("SiglipVisionModel",),
    image_processor=fixed_size_processor(SiglipImageProcessorPil),
    protected_names="none",
    protected_tokens=lambda config: 0,  # no CLS token
)
