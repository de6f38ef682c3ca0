"""DINOv2 adapter (`Dinov2Model`, `Dinov2ForImageClassification` and their with-registers
variants): CLS and register tokens protected; layer scale on both residual branches; position
embeddings always interpolated to the input size, as upstream does."""

from functools import partial

import torch
from torch import nn
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer

from turbo.models.adapters import BlockParts, FamilyAdapter, fixed_size_processor, split_heads

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _block_parts(layer: nn.Module) -> BlockParts:
    attn = layer.attention
    heads = attn.config.num_attention_heads

    def qkv(x):
        return tuple(split_heads(proj(x), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def out_proj(context: torch.Tensor) -> torch.Tensor:
        return layer.layer_scale1(attn.o_proj(context))

    def mlp(hidden: torch.Tensor) -> torch.Tensor:
        return layer.layer_scale2(layer.mlp(hidden))

    fused = attn.config._attn_implementation != "eager"
    return BlockParts(layer.norm1, layer.norm2, mlp, out_proj, qkv, attn.scaling, fused)


def _backbone(model: nn.Module) -> nn.Module:
    for name in ("dinov2", "dinov2_with_registers"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _protected_tokens(config) -> int:
    return 1 + getattr(config, "num_register_tokens", 0)  # CLS, then the registers


def _mlp_size(config) -> int:
    """The MLP width in two-matrix terms (SwiGLU has three matrices of its own width)."""
    width = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:
        return 3 * ((int(width * 2 / 3) + 7) // 8 * 8) // 2
    return width


def weighted_patch_mean(patches: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """(B, M, C), sizes (B, M, 1) or None -> (B, C): the mean over the original patches."""
    if size is None:
        return patches.mean(dim=1)
    return (patches * size).sum(dim=1) / size.sum(dim=1)


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The classifier's logits (CLS and mean patch token, the mean weighted by token sizes) or the
    pooled CLS state, and the final hidden states."""
    out = _backbone(model)(pixel_values)
    hidden = out.last_hidden_state  # (B, N_final, C)
    if not hasattr(model, "classifier"):
        return {"pooler_output": out.pooler_output, "last_hidden_state": hidden}
    first = _protected_tokens(model.config)
    state = getattr(model, "turbo_state", None)
    size = None if state is None or state.size is None else state.size[:, first:]
    mean = weighted_patch_mean(hidden[:, first:], size)
    return {"logits": model.classifier(torch.cat([hidden[:, 0], mean], dim=1)), "last_hidden_state": hidden}


def _adapter(family: str, layer: type, architectures: tuple[str, ...], model_type: str,
             protected_names: str) -> FamilyAdapter:
    return FamilyAdapter(
        family=family,
        architectures=architectures,
        model_types=(model_type,),
        layer_class=partial(lambda cls: cls, layer),
        encoder_layers=lambda model: _backbone(model).encoder.layer,
        block_parts=_block_parts,
        export_outputs=_export_outputs,
        embedders=architectures[-1:],  # the base model
        image_processor=fixed_size_processor(BitImageProcessorPil, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        classifier=lambda model: getattr(model, "classifier", None),
        protected_tokens=_protected_tokens,
        protected_names=protected_names,
        mlp_size=_mlp_size,
    )


DINOV2 = _adapter("dinov2", Dinov2Layer, ("Dinov2ForImageClassification", "Dinov2Model"), "dinov2", "CLS")
DINOV2_REGISTERS = _adapter("dinov2-registers", Dinov2WithRegistersLayer,
                            ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"),
                            "dinov2_with_registers", "CLS, registers")
