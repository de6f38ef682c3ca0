"""DeiT adapter (`DeiTModel`, `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`):
a ViT block, with CLS and the distillation token both protected from merging."""

import torch
from torch import nn
from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
from transformers.models.deit.modeling_deit import DeiTLayer

from turbo.models.adapters import FamilyAdapter, fixed_size_processor
from turbo.models.vit import drop_pooler, vit_block_parts


def _backbone(model: nn.Module) -> nn.Module:
    return model.deit if hasattr(model, "deit") else model


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """As upstream's forward: the distilled model averages its CLS and distillation heads."""
    out = _backbone(model)(pixel_values, interpolate_pos_encoding=interpolate)
    hidden = out.last_hidden_state  # (B, N_final, C); token 0 CLS, token 1 distillation
    if hasattr(model, "distillation_classifier"):
        logits = (model.cls_classifier(hidden[:, 0, :]) + model.distillation_classifier(hidden[:, 1, :])) / 2
        return {"logits": logits, "last_hidden_state": hidden}
    if hasattr(model, "classifier"):
        return {"logits": model.classifier(hidden[:, 0, :]), "last_hidden_state": hidden}
    if out.pooler_output is not None:
        return {"pooler_output": out.pooler_output, "last_hidden_state": hidden}
    return {"last_hidden_state": hidden}


DEIT = FamilyAdapter(
    family="deit",
    architectures=("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "DeiTModel"),
    model_types=("deit",),
    layer_class=lambda: DeiTLayer,
    encoder_layers=lambda model: _backbone(model).layers,
    block_parts=vit_block_parts,
    export_outputs=_export_outputs,
    embedders=("DeiTModel",),
    image_processor=fixed_size_processor(DeiTImageProcessorPil),
    classifier=lambda model: getattr(model, "classifier", None),  # the distilled model has two heads
    optional_parts={"pooler.": drop_pooler},
    protected_names="CLS, distillation",
    protected_tokens=lambda config: 2,  # CLS and distillation
)
