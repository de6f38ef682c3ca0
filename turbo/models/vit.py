"""ViT adapter (transformers 5.x `ViTModel` / `ViTForImageClassification`)."""

import torch
from torch import nn
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.models.vit.modeling_vit import ViTLayer

from turbo.models.adapters import BlockParts, FamilyAdapter, fixed_size_processor, split_heads


def vit_block_parts(layer: nn.Module) -> BlockParts:
    """The parts of a ViT-style block (ViT, DeiT): layernorm_before/after, attention.{q,k,v,o}_proj, mlp."""
    attn = layer.attention
    heads = attn.config.num_attention_heads

    def qkv(x):
        return tuple(split_heads(proj(x), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    fused = attn.config._attn_implementation != "eager"
    return BlockParts(layer.layernorm_before, layer.layernorm_after, layer.mlp, attn.o_proj, qkv, attn.scaling, fused)


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.vit.layers if hasattr(model, "vit") else model.layers


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The classifier's logits and the final hidden states, computed as upstream's forward does."""
    backbone = model.vit if hasattr(model, "vit") else model
    out = backbone(pixel_values, interpolate_pos_encoding=interpolate)
    hidden = out.last_hidden_state  # (B, N_final, C)
    if hasattr(model, "classifier"):
        return {"logits": model.classifier(hidden[:, 0, :]), "last_hidden_state": hidden}
    if out.pooler_output is not None:
        return {"pooler_output": out.pooler_output, "last_hidden_state": hidden}
    return {"last_hidden_state": hidden}


def drop_pooler(model: nn.Module) -> None:
    """Without its pooler, the base model returns no pooler_output (and the export has none)."""
    model.pooler = None


VIT = FamilyAdapter(
    family="vit",
    architectures=("ViTForImageClassification", "ViTModel"),
    model_types=("vit",),
    layer_class=lambda: ViTLayer,
    encoder_layers=_encoder_layers,
    block_parts=vit_block_parts,
    export_outputs=_export_outputs,
    embedders=("ViTModel",),
    image_processor=fixed_size_processor(ViTImageProcessorPil),
    classifier=lambda model: getattr(model, "classifier", None),  # ViTModel has none
    optional_parts={"pooler.": drop_pooler},  # a ViTModel saved with add_pooling_layer=False
)
