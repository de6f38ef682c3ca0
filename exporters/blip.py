"""BLIP adapter (transformers 5.x `BlipForConditionalGeneration`): only the vision encoder merges;
the text decoder cross-attends to the fewer image tokens unchanged."""

import torch
from torch import nn

from exporters.adapters import BlockParts, FamilyAdapter

RANDOM_INIT_RANGE = 0.02  # BLIP's vision default (1e-10) makes every random token identical


def _layer_class() -> type[nn.Module]:
    from transformers.models.blip.modeling_blip import BlipEncoderLayer

    return BlipEncoderLayer


def _block_parts(layer: nn.Module) -> BlockParts:
    attn = layer.self_attn

    def qkv(x):
        batch, tokens, width = x.shape
        mixed = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads)
        q, k, v = mixed.permute(2, 0, 3, 1, 4)  # 3×(B, H, N, d)
        return q, k, v

    return BlockParts(layer.layer_norm1, layer.layer_norm2, layer.mlp, attn.projection, qkv, attn.scale, False)  # eager


def _prepare_random_config(config) -> None:
    config.vision_config.initializer_range = RANDOM_INIT_RANGE


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The image embeddings the text decoder cross-attends to: (B, N_final, C)."""
    out = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
    return {"image_embeds": out.last_hidden_state}


def _image_processor(image_size: int) -> object:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size})


BLIP = FamilyAdapter(
    family="blip",
    architectures=("BlipForConditionalGeneration",),
    layer_class=_layer_class,
    vision_config=lambda config: config.vision_config,
    encoder_layers=lambda model: model.vision_model.encoder.layers,
    block_parts=_block_parts,
    prepare_random_config=_prepare_random_config,
    export_outputs=_export_outputs,
    image_processor=_image_processor,
)
