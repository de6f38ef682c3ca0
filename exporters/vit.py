"""ViT adapter (transformers 5.x `ViTModel` / `ViTForImageClassification`)."""

from torch import nn

from exporters.adapters import BlockParts, FamilyAdapter, split_heads


def _layer_class() -> type[nn.Module]:
    from transformers.models.vit.modeling_vit import ViTLayer

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


VIT = FamilyAdapter(
    family="vit",
    architectures=("ViTForImageClassification", "ViTModel"),
    layer_class=_layer_class,
    vision_config=lambda config: config,
    encoder_layers=_encoder_layers,
    block_parts=_block_parts,
    prepare_random_config=lambda config: None,
)
