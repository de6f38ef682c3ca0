"""One small config per model family: where its encoder blocks are and how to run one."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from turbo.core.manifest import OutputTokens
from turbo.merging.plan import ArchSpec
from turbo.merging.spatial import SpatialMerge
from turbo.models.decoder_stacks import DecoderStack


@dataclass(frozen=True)
class BlockParts:
    """The pieces of one pre-norm encoder block that the Turbo forward needs."""

    norm1: nn.Module
    norm2: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]  # the MLP branch, layer scale included where the family has one
    out_proj: Callable[[torch.Tensor], torch.Tensor]  # attention output projection (and layer scale)
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
    tiebreak: tuple[str, int] | None = None  # a continuous fidelity metric and its sign (+1: larger is closer)


CLASSIFICATION = Task("image-classification", "agreement", "top1", "class folders", ("kl", -1))
CAPTIONING = Task("image-captioning", "exact_match", "cider", "--captions", ("bleu4_vs_r0", 1))
EMBEDDING = Task("image-embedding", "cosine", "knn_top1", "class folders", ("cosine", 1))  # backbones, towers
RETRIEVAL = Task("image-text-retrieval", "top1_agreement", "recall_mean", "--captions", ("rank_correlation", 1))
VQA = Task("visual-question-answering", "answer_agreement", "vqa_accuracy", "--questions")
GENERATION = Task("image-text-generation", "token_agreement", "vqa_accuracy", "--questions")  # LLM-based VLMs


def task_named(name: str) -> Task:
    return next(task for task in (CLASSIFICATION, CAPTIONING, EMBEDDING, RETRIEVAL, VQA, GENERATION)
                if task.name == name)


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

    def special_ids(self, config: object) -> dict[str, int]:
        return self.generation_ids(config)


@dataclass(frozen=True)
class MatchHead:
    """A family's image-text matching head (BLIP's ITM): a text read with cross-attention over the
    merged image tokens -> match logits (B, 2), index 1 meaning "the text matches the image"."""

    # (model, input_ids, attention_mask, image_tokens (B, N, C)) -> logits (B, 2)
    logits: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    image_tokens_output: str  # the image encoder's output it reads


@dataclass(frozen=True)
class QuestionAnswerer:
    """A family's visual question answering: a question encoder reading the merged image tokens
    through cross-attention, and an answer decoder cross-attending to the encoded question."""

    # (model, input_ids, attention_mask, image_embeds (B, N, C)) -> question states (B, L, C_text)
    encode: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    max_length: Callable[[object], int]  # config -> question tokens kept (longer questions are truncated)
    decoder: CaptionDecoder  # the answer decoder: its module, layers, ids and placeholder vocabulary

    @property
    def placeholder_tokenizer(self) -> Callable[[object], object]:
        return self.decoder.placeholder_tokenizer

    def special_ids(self, config: object) -> dict[str, int]:
        return self.decoder.generation_ids(config)


@dataclass(frozen=True)
class TextTower:
    """A family's text encoder for image-text retrieval: texts -> embeddings in the space of the
    image embeddings (the export's first output)."""

    # (model, input_ids, attention_mask) -> text embeddings (B, D), projected, not normalised
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    max_length: Callable[[object], int]  # config -> tokens per text (texts are padded to it: a static shape)
    logit_scale: Callable[[nn.Module], float]  # model -> the factor on cosine similarities that gives its logits
    special_ids: Callable[[object], dict[str, int]]  # config -> the tokenizer's special ids the model relies on
    placeholder_tokenizer: Callable[[object], object]  # config -> a made-up vocabulary (random weights only)
    match: MatchHead | None = None  # a head that re-scores (text, image) pairs, when the family has one


@dataclass(frozen=True)
class LanguageModel:
    """The language model of an LLM-based VLM (LLaVA, BLIP-2): it reads the image tokens, projected
    into its embedding space, in place of the prompt's image placeholders."""

    stack: Callable[[nn.Module], DecoderStack]  # model -> its decoder, run block by block
    text_config: Callable[[object], object]
    image_token_id: Callable[[object], int]
    # (model, pixel_values, interpolate_pos_encoding) -> the image tokens it reads (B, N_image, C_text)
    image_features: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor]
    image_tokens: Callable[[object, int], int]  # (config, the tower's tokens at its feature layer) -> image tokens
    special_ids: Callable[[object], dict[str, int]]  # config -> eos (and bos, pad where it has them)
    placeholder_tokenizer: Callable[[object], object]  # config -> a made-up vocabulary (random weights only)
    mlp: Callable[[object], tuple[int, int]]  # text config -> (FFN width, FFN matrices) for FLOPs counts
    question_prompt: str  # the family's short-answer prompt, {question} where each question goes
    image_first: bool = False  # the image goes before the prompt, which has no placeholder (BLIP-2)
    # (model, pixel_values, interpolate_pos_encoding, MustDrop's spatial merge or None)
    # -> the image features and the vision tower's CLS attention on each (B, N_image), None where the
    # tower has no CLS; None: image tokens that are not the tower's (BLIP-2's queries). For MustDrop.
    cls_attention: Callable[[nn.Module, torch.Tensor, bool, SpatialMerge | None],
                            tuple[torch.Tensor, torch.Tensor | None]] | None = None


@dataclass(frozen=True)
class FamilyAdapter:
    """What turbo knows of one transformers model family."""

    family: str
    architectures: tuple[str, ...]  # transformers class names this adapter supports, the base model last
    model_types: tuple[str, ...]  # config model_type values of those classes
    layer_class: Callable[[], type[nn.Module] | tuple[type[nn.Module], ...]]  # its encoder block class(es)
    encoder_layers: Callable[[nn.Module], nn.ModuleList]
    block_parts: Callable[[nn.Module], BlockParts]
    # (model, pixel_values, interpolate_pos_encoding) -> named outputs, the deployed ones first
    export_outputs: Callable[[nn.Module, torch.Tensor, bool], dict[str, torch.Tensor]]
    # ((height, width), config) -> the family's default PIL processor
    image_processor: Callable[[tuple[int, int], object], object]
    vision_config: Callable[[object], object] = lambda config: config  # config -> its vision part's config
    prepare_random_config: Callable[[object], None] = lambda config: None  # fix-ups before random weights
    init_random_weights: Callable[[nn.Module], None] = lambda model: None  # fix-ups of a random model, seeded
    task: Task = CLASSIFICATION  # of its head architectures
    embedders: tuple[str, ...] = ()  # its architectures that output embeddings (EMBEDDING), not the task's
    caption_decoder: CaptionDecoder | None = None
    text_tower: TextTower | None = None
    question_answerer: QuestionAnswerer | None = None
    classifier: Callable[[nn.Module], nn.Module | None] = lambda model: None  # model -> its class head, if any
    # Parts a checkpoint may lack, by weight-name prefix, and how to remove them so that nothing
    # randomly initialised is exported; any other missing weight refuses the checkpoint.
    optional_parts: dict[str, Callable[[nn.Module], None]] = field(default_factory=dict)
    # config -> leading tokens never merged: CLS (1), CLS and distillation (2), CLS and registers, none (0)
    protected_tokens: Callable[[object], int] = lambda config: 1
    protected_names: str = "CLS"  # what the protected tokens are, for users
    mlp_size: Callable[[object], int] = lambda vision: vision.intermediate_size
    # config -> encoder blocks whose output is used (a VLM reads an earlier layer's tokens); None: all
    used_layers: Callable[[object], int] | None = None
    config_problem: Callable[[object], str | None] = lambda config: None  # why turbo cannot take this config
    language_model: LanguageModel | None = None  # the LLM of an LLM-based VLM
    # config -> token outputs that leave out some of the final tokens (LLaVA's features: the CLS), by name
    excluded_tokens: Callable[[object], dict[str, int]] = lambda config: {}
    # config -> token outputs whose count the merge does not change (BLIP-2's Q-Former queries), by name
    fixed_tokens: Callable[[object], dict[str, int]] = lambda config: {}

    def output_tokens(self, config: object) -> OutputTokens:
        return OutputTokens(self.excluded_tokens(config), self.fixed_tokens(config))

    def arch_spec(self, config: object, image_size: tuple[int, int] | None = None) -> ArchSpec:
        vision = self.vision_config(config)
        height, width = image_size or self.image_size(config)
        patch_h, patch_w = self.patch_size(config)
        return ArchSpec(
            num_layers=self.used_layers(config) if self.used_layers else vision.num_hidden_layers,
            num_tokens=(height // patch_h) * (width // patch_w) + self.protected_tokens(config),
            hidden_size=vision.hidden_size,
            mlp_size=self.mlp_size(vision),
            patch_area=patch_h * patch_w,
            channels=getattr(vision, "num_channels", 3),
            protected_tokens=self.protected_tokens(config),
        )

    def image_size(self, config: object) -> tuple[int, int]:
        """The config's (height, width): `image_size` as one int or a pair."""
        return as_pair(self.vision_config(config).image_size)

    def patch_size(self, config: object) -> tuple[int, int]:
        return as_pair(self.vision_config(config).patch_size)

    @property
    def text_side(self) -> CaptionDecoder | TextTower | QuestionAnswerer | LanguageModel | None:
        """What reads text: the caption decoder, the retrieval text tower, the question answerer or
        the language model (they need a tokenizer)."""
        return self.caption_decoder or self.text_tower or self.question_answerer or self.language_model

    def task_of(self, architecture: str) -> Task:
        return EMBEDDING if architecture in self.embedders else self.task

    def has_cls_token(self, config: object) -> bool:
        """Whether token 0 is a CLS token, whose attention row Turbo's semantic term reads."""
        return self.protected_tokens(config) > 0


def as_pair(value: int | Iterable[int]) -> tuple[int, int]:
    """An int or a (height, width) pair, as transformers configs give sizes -> (height, width)."""
    if isinstance(value, Iterable):
        height, width = value
        return int(height), int(width)
    return int(value), int(value)


def fixed_size_processor(processor_class: type, **settings) -> Callable[[tuple[int, int]], object]:
    """A family's default processor: resize straight to the export's (height, width), no crop."""

    def build(image_size: tuple[int, int], config: object = None) -> object:
        height, width = image_size
        return processor_class(size={"height": height, "width": width}, do_center_crop=False, **settings)

    return build


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)
