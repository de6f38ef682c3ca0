"""The model registry: named models with their architecture config (so `--random-weights`
works offline), a tiny variant for tests, and Turbo defaults."""

from dataclasses import dataclass, field

from turbo.core.errors import UsageError
from turbo.models.adapters import FamilyAdapter
from turbo.models.blip import BLIP
from turbo.models.blip2 import BLIP2
from turbo.models.blip_retrieval import BLIP_RETRIEVAL
from turbo.models.blip_vqa import BLIP_VQA
from turbo.models.clip import CLIP, CLIP_MODEL
from turbo.models.deit import DEIT
from turbo.models.dinov2 import DINOV2, DINOV2_REGISTERS
from turbo.models.llava import LLAVA
from turbo.models.siglip import SIGLIP
from turbo.models.vit import VIT

# BLIP last: an architecture-less config of model_type "blip" is the captioning model
FAMILIES: tuple[FamilyAdapter, ...] = (VIT, DEIT, CLIP, CLIP_MODEL, SIGLIP, DINOV2, DINOV2_REGISTERS, BLIP_RETRIEVAL,
                                       BLIP_VQA, BLIP, LLAVA, BLIP2)
ADAPTERS: dict[str, FamilyAdapter] = {arch: adapter for adapter in FAMILIES for arch in adapter.architectures}
BY_MODEL_TYPE: dict[str, FamilyAdapter] = {kind: adapter for adapter in FAMILIES for kind in adapter.model_types}

# Families whose design merging would silently break: model_type -> why.
_RELATIVE_BIAS = "its relative position bias is defined per pair of grid positions, which merged tokens no longer have"
_WINDOWS = "its windowed attention needs the full token grid in every block"
_CONVOLUTIONAL = "it is convolutional: it has no tokens to merge"
UNSUPPORTED_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("beit", "data2vec-vision"), _RELATIVE_BIAS),
    **dict.fromkeys(("swin", "swinv2", "donut-swin", "maskformer-swin"), _WINDOWS),
    **dict.fromkeys(("convnext", "convnextv2", "resnet", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2",
                     "bit", "van", "poolformer", "levit", "mobilevit", "mobilevitv2", "dinat", "nat"), _CONVOLUTIONAL),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    architecture: str  # transformers class name
    config: dict  # the hub config's architecture fields (model_type included)
    tiny_overrides: dict  # a small variant of the same architecture, for tests
    default_r: int
    alpha: float = 5.0
    threshold: int = 0
    method: str = "turbo"
    input_size: int | None = None  # the hub image processor's output size, when not the config's image_size
    notes: str = field(default="")

    @property
    def adapter(self) -> FamilyAdapter:
        return ADAPTERS[self.architecture]


def _vit(hidden: int, layers: int, heads: int, mlp: int) -> dict:
    return dict(model_type="vit", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=mlp, image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-12)


def _blip(hidden: int, layers: int, heads: int, mlp: int) -> dict:
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=mlp, image_size=384, patch_size=16, layer_norm_eps=1e-5)
    text = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, encoder_hidden_size=hidden)
    return dict(model_type="blip", vision_config=vision, text_config=text)


def _vision(model_type: str, hidden: int, layers: int, heads: int, mlp: int, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=mlp, **extra)


def _clip(projection: int, hidden: int) -> dict:
    """openai/clip-vit-base-patch16's: its text config keeps the legacy end-of-text id 2 (the text
    tower pools at the largest token id, the end-of-text token's)."""
    vision = dict(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=12, intermediate_size=4 * hidden,
                  image_size=224, patch_size=16, projection_dim=projection, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
    text = dict(vocab_size=49408, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                intermediate_size=2048, max_position_embeddings=77, projection_dim=projection,
                hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return dict(model_type="clip", vision_config=vision, text_config=text, projection_dim=projection,
                logit_scale_init_value=2.6592)


def _dinov2(model_type: str, hidden: int, layers: int, heads: int, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                mlp_ratio=4, image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6, **extra)


def _llava_15() -> dict:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (its penultimate layer, CLS dropped), Vicuna-7B."""
    vision = dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
    text = dict(model_type="llama", vocab_size=32064, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return dict(model_type="llava", vision_config=vision, text_config=text, image_token_index=32000,
                vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _llava_interleave() -> dict:
    """llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP-so400m at 384 px (its last layer, every token), Qwen2-0.5B."""
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                  intermediate_size=4304, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=152000, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)
    return dict(model_type="llava", vision_config=vision, text_config=text, image_token_index=151646,
                vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                tie_word_embeddings=True)


def _blip2_opt() -> dict:
    """Salesforce/blip2-opt-2.7b: EVA ViT-g/14 at 224 px (39 blocks), a 12-layer Q-Former with 32 queries,
    OPT-2.7B (its end of text is the newline, 50118)."""
    vision = dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522)
    text = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                ffn_dim=10240, max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True,
                activation_function="relu", bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    return dict(model_type="blip-2", vision_config=vision, qformer_config=qformer, text_config=text,
                num_query_tokens=32, image_token_index=50265)


_TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                 image_size=48, patch_size=8, num_labels=10)
_TINY_BLIP = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                       image_size=48, patch_size=8, layer_norm_eps=1e-5),
    text_config=dict(vocab_size=30524, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
)

_TINY_CLIP_TEXT = dict(vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=16)
_TINY_TOWER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                   image_size=48, patch_size=8)
_TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=48,
                    patch_size=8, layerscale_value=0.5)

_TINY_LLM = dict(vocab_size=600, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=512)
_TINY_LLAVA = dict(vision_config={**_TINY_TOWER, "num_hidden_layers": 5}, image_token_index=590)
_TINY_BLIP2 = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=48,
                       patch_size=8),
    qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        encoder_hidden_size=32, vocab_size=600),
    text_config=dict(vocab_size=600, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                     max_position_embeddings=512, word_embed_proj_dim=32, eos_token_id=598),
    num_query_tokens=8, image_token_index=590)
_LLAVA_NOTES = ("Turbo in the vision tower; --llm-drop fastv|pyramid|dyrate|mustdrop reduces the image tokens inside "
                "the language model")

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("vit-b16", "google/vit-base-patch16-224", "ViTForImageClassification",
                  _vit(768, 12, 12, 3072), _TINY_VIT, default_r=16),
        ModelSpec("vit-l16", "google/vit-large-patch16-224", "ViTForImageClassification",
                  _vit(1024, 24, 16, 4096), _TINY_VIT, default_r=8),
        ModelSpec("deit-b16", "facebook/deit-base-distilled-patch16-224", "DeiTForImageClassificationWithTeacher",
                  _vision("deit", 768, 12, 12, 3072, image_size=224, patch_size=16, num_labels=1000,
                          layer_norm_eps=1e-12), {**_TINY_VIT, "num_labels": 10}, default_r=16),
        ModelSpec("clip-b16", "openai/clip-vit-base-patch16", "CLIPVisionModelWithProjection",
                  _vision("clip_vision_model", 768, 12, 12, 3072, image_size=224, patch_size=16, projection_dim=512,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5), {**_TINY_TOWER, "projection_dim": 16},
                  default_r=16, notes="the vision tower of the CLIP checkpoint"),
        ModelSpec("clip-vit-b16", "openai/clip-vit-base-patch16", "CLIPModel", _clip(512, 768),
                  {"vision_config": _TINY_TOWER, "text_config": _TINY_CLIP_TEXT, "projection_dim": 16},
                  default_r=16, notes="image-text retrieval: the merged image tower, the text tower, logit_scale"),
        ModelSpec("siglip-b16", "google/siglip-base-patch16-224", "SiglipVisionModel",
                  _vision("siglip_vision_model", 768, 12, 12, 3072, image_size=224, patch_size=16,
                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6), _TINY_TOWER, default_r=16,
                  method="tome", notes="the vision tower of the SigLIP checkpoint; no CLS token: tome"),
        ModelSpec("dinov2-b14", "facebook/dinov2-base", "Dinov2Model", _dinov2("dinov2", 768, 12, 12),
                  _TINY_DINOV2, default_r=21, input_size=224),
        ModelSpec("dinov2-reg-b14", "facebook/dinov2-with-registers-base", "Dinov2WithRegistersModel",
                  _dinov2("dinov2_with_registers", 768, 12, 12, num_register_tokens=4),
                  {**_TINY_DINOV2, "num_register_tokens": 2}, default_r=21, input_size=224),
        ModelSpec("blip-caption", "Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration",
                  _blip(768, 12, 12, 3072), _TINY_BLIP, default_r=30, threshold=40),
        ModelSpec("blip-retrieval", "Salesforce/blip-itm-base-coco", "BlipForImageTextRetrieval",
                  {**_blip(768, 12, 12, 3072), "image_text_hidden_size": 256},
                  {**_TINY_BLIP, "image_text_hidden_size": 16}, default_r=30, threshold=100,
                  notes="image-text retrieval: ITC embeddings and the ITM head over the merged image tokens"),
        ModelSpec("blip-vqa", "Salesforce/blip-vqa-base", "BlipForQuestionAnswering",
                  _blip(768, 12, 12, 3072), _TINY_BLIP, default_r=40,
                  notes="visual question answering: the question encoder reads the merged image tokens "
                        "(the paper's VQA setting is 480 px: --image-size 480)"),
        ModelSpec("blip-caption-large", "Salesforce/blip-image-captioning-large", "BlipForConditionalGeneration",
                  _blip(1024, 24, 16, 4096), _TINY_BLIP, default_r=30, threshold=40),
        ModelSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", _llava_15(),
                  {**_TINY_LLAVA, "text_config": {**_TINY_LLM, "bos_token_id": 1, "eos_token_id": 2,
                                                  "pad_token_id": 599}}, default_r=12, notes=_LLAVA_NOTES),
        ModelSpec("llava-interleave-qwen-0.5b", "llava-hf/llava-interleave-qwen-0.5b-hf",
                  "LlavaForConditionalGeneration", _llava_interleave(),
                  {**_TINY_LLAVA, "text_config": {**_TINY_LLM, "bos_token_id": 597, "eos_token_id": 598},
                   "vision_config": {**_TINY_TOWER, "num_hidden_layers": 4}}, default_r=12, method="tome",
                  notes=_LLAVA_NOTES + "; SigLIP tower without CLS: tome"),
        ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "Blip2ForConditionalGeneration", _blip2_opt(),
                  _TINY_BLIP2, default_r=16, threshold=40,
                  notes="Turbo in the ViT; the Q-Former's 32 queries read the merged tokens; --llm-drop reduces "
                        "them inside OPT"),
    )
}


def list_models() -> list[str]:
    return list(REGISTRY)


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def supported_families() -> list[str]:
    return list(dict.fromkeys(adapter.family for adapter in FAMILIES))


def adapter_for(architecture: str) -> FamilyAdapter:
    """The adapter of a transformers class name, or a UsageError naming the supported ones."""
    if architecture not in ADAPTERS:
        raise UsageError(f"architecture {architecture} is not supported; "
                         f"supported: {', '.join(supported_architectures())}")
    return ADAPTERS[architecture]
