"""CLIP vision tower adapter (`CLIPVisionModel`, `CLIPVisionModelWithProjection`): pre-norm blocks
after a pre-layernorm, a class embedding at token 0, image embeddings for retrieval."""

import torch
from torch import nn
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from turbo.models.adapters import BlockParts, FamilyAdapter, fixed_size_processor, split_heads


def clip_block_parts(layer: nn.Module) -> BlockParts:
    """The parts of a CLIP-style block (CLIP, SigLIP): layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp."""
    attn = layer.self_attn

    def qkv(x):
        return tuple(split_heads(proj(x), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    fused = attn.config._attn_implementation != "eager"
    return BlockParts(layer.layer_norm1, layer.layer_norm2, layer.mlp, attn.out_proj, qkv, attn.scale, fused)


def _tower(model: nn.Module) -> nn.Module:
    return model.vision_model if hasattr(model, "vision_model") else model


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The projected image embeddings (or the pooled CLS state) and the final hidden states."""
    out = _tower(model)(pixel_values, interpolate_pos_encoding=interpolate)
    hidden = out.last_hidden_state  # (B, N_final, C)
    if hasattr(model, "visual_projection"):
        return {"image_embeds": model.visual_projection(out.pooler_output), "last_hidden_state": hidden}
    return {"pooler_output": out.pooler_output, "last_hidden_state": hidden}


CLIP = FamilyAdapter(
    family="clip",
    architectures=("CLIPVisionModelWithProjection", "CLIPVisionModel"),
    model_types=("clip_vision_model",),
    layer_class=lambda: CLIPEncoderLayer,
    encoder_layers=lambda model: _tower(model).encoder.layers,
    block_parts=clip_block_parts,
    export_outputs=_export_outputs,
    embedders=("CLIPVisionModelWithProjection", "CLIPVisionModel"),
    image_processor=fixed_size_processor(CLIPImageProcessorPil),
)
