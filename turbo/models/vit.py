"""ViT adapter (transformers 5.x `ViTModel` / `ViTForImageClassification`)."""

import torch
from torch import nn
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.models.vit.modeling_vit import ViTLayer

from turbo.models.adapters import BlockParts, FamilyAdapter, split_heads


def _layer_class() -> type[nn.Module]:
    return ViTLayer


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.vit.layers if hasattr(model, "vit") else model.layers


def _block_parts(layer: nn.Module) -> BlockParts:
    attn = layer.attention
    heads = attn.num_attention_heads

    def qkv(x):
        return tuple(split_heads(proj(x), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    fused = attn.config._attn_implementation != "eager"
    return BlockParts(layer.layernorm_before, layer.layernorm_after, layer.mlp, attn.o_proj, qkv, attn.scaling, fused)


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


def _drop_pooler(model: nn.Module) -> None:
    """Without its pooler, ViTModel returns no pooler_output (and the export has none)."""
    model.pooler = None


def _image_processor(image_size: int) -> object:
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size})


VIT = FamilyAdapter(
    family="vit",
    architectures=("ViTForImageClassification", "ViTModel"),
    layer_class=_layer_class,
    vision_config=lambda config: config,
    encoder_layers=_encoder_layers,
    block_parts=_block_parts,
    prepare_random_config=lambda config: None,
    export_outputs=_export_outputs,
    image_processor=_image_processor,
    classifier=lambda model: getattr(model, "classifier", None),  # ViTModel has none
    optional_parts={"pooler.": _drop_pooler},  # a ViTModel saved with add_pooling_layer=False
)
