"""One small config per model family: where its encoder blocks are and how to run one."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from turbo.merging.plan import ArchSpec


@dataclass(frozen=True)
class BlockParts:
    """The pieces of one pre-norm encoder block that the Turbo forward needs."""

    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    out_proj: nn.Module
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (B,N,C) -> 3×(B,H,N,d)
    scale: float
    fused_attention: bool  # the upstream block uses a fused kernel (SDPA and kin), not eager softmax


@dataclass(frozen=True)
class Task:
    """What a family's models are deployed for, and how `turbo eval` measures them."""

    name: str  # image-classification | image-captioning
    fidelity_metric: str  # agreement with r=0, the metric `--metric fidelity` bounds
    accuracy_metric: str  # the task metric `--metric accuracy` bounds
    accuracy_data: str  # what the accuracy metric needs, for the error that asks for it


CLASSIFICATION = Task("image-classification", "agreement", "top1", "class folders")
CAPTIONING = Task("image-captioning", "exact_match", "cider", "--captions")


@dataclass(frozen=True)
class CaptionDecoder:
    """A family's text decoder, for captioning exports."""

    module: Callable[[nn.Module], nn.Module]  # model -> its language-model-head decoder
    layers: Callable[[nn.Module], nn.ModuleList]  # decoder -> its transformer layers (quantized block by block)
    # (model, pixel_values, interpolate_pos_encoding) -> the image embeddings it cross-attends to (B, N, C)
    image_embeds: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor]
    generation_ids: Callable[[object], dict[str, int]]  # config -> bos/eos/pad token ids as generate uses them
    placeholder_tokenizer: Callable[[object], object]  # config -> a made-up vocabulary (random weights only)
    lm_head: Callable[[nn.Module], nn.Linear]  # decoder -> its vocabulary projection


@dataclass(frozen=True)
class FamilyAdapter:
    """What turbo knows of one transformers model family."""

    family: str
    architectures: tuple[str, ...]  # transformers class names this adapter supports
    layer_class: Callable[[], type[nn.Module]]
    vision_config: Callable[[object], object]
    encoder_layers: Callable[[nn.Module], nn.ModuleList]
    block_parts: Callable[[nn.Module], BlockParts]
    prepare_random_config: Callable[[object], None]
    # (model, pixel_values, interpolate_pos_encoding) -> named outputs, the deployed ones first
    export_outputs: Callable[[nn.Module, torch.Tensor, bool], dict[str, torch.Tensor]]
    image_processor: Callable[[int], object]  # image size -> the family's default (PIL) image processor
    task: Task = CLASSIFICATION
    caption_decoder: CaptionDecoder | None = None
    classifier: Callable[[nn.Module], nn.Module | None] = lambda model: None  # model -> its class head, if any
    # Parts a checkpoint may lack, by weight-name prefix, and how to remove them so that nothing
    # randomly initialised is exported; any other missing weight refuses the checkpoint.
    optional_parts: dict[str, Callable[[nn.Module], None]] = field(default_factory=dict)

    def arch_spec(self, config: object, image_size: int | None = None) -> ArchSpec:
        vision = self.vision_config(config)
        patches = ((image_size or vision.image_size) // vision.patch_size) ** 2
        return ArchSpec(
            num_layers=vision.num_hidden_layers,
            num_tokens=patches + 1,
            hidden_size=vision.hidden_size,
            mlp_size=vision.intermediate_size,
            patch_size=vision.patch_size,
            channels=getattr(vision, "num_channels", 3),
        )

    def image_size(self, config: object) -> int:
        return int(self.vision_config(config).image_size)

    def patch_size(self, config: object) -> int:
        return int(self.vision_config(config).patch_size)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)
