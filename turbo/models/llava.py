"""LLaVA adapter (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower, whose tokens at
one feature layer go through the projector into a LLaMA-style language model (Llama, Qwen2,
Mistral) in place of the prompt's `<image>` placeholder.

Only the tower's blocks up to the feature layer run (upstream runs the rest and discards it), so
those are the blocks that merge: the LLM reads N_final image tokens (the CLS token dropped by the
"default" feature strategy), and the prompt carries that many placeholders.
"""

import torch
from torch import nn
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from turbo.merging.attention import cls_attention
from turbo.merging.spatial import SpatialMerge
from turbo.models.adapters import GENERATION, FamilyAdapter, LanguageModel, fixed_size_processor
from turbo.models.clip import clip_block_parts
from turbo.models.decoder_stacks import LlamaStack
from turbo.models.llm_vocab import placeholder_tokenizer, special_ids

TOWERS = {"clip_vision_model": CLIPImageProcessorPil, "siglip_vision_model": SiglipImageProcessorPil}
LANGUAGE_MODELS = ("llama", "qwen2", "mistral")  # LLaMA-style decoders: RMSNorm, rotary, gated MLP
# LLaVA-1.5's short-answer prompt (its VQAv2 evaluation)
QUESTION_PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"


def used_layers(config) -> int:
    """The tower blocks up to the feature layer: hidden_states[k] is block k's input (k ≥ 0) or, from
    the end, hidden_states[-1] the last block's output."""
    layer, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    return layer if layer >= 0 else total + 1 + layer


def _config_problem(config) -> str | None:
    if not isinstance(config.vision_feature_layer, int):
        return (f"its vision_feature_layer {config.vision_feature_layer} concatenates several layers; turbo merges "
                "tokens for one feature layer")
    if config.vision_config.model_type not in TOWERS:
        return f"its vision tower is {config.vision_config.model_type}; turbo takes {', '.join(TOWERS)}"
    text = config.text_config
    if text.model_type not in LANGUAGE_MODELS:
        return f"its language model is {text.model_type}; turbo takes {', '.join(LANGUAGE_MODELS)}"
    window = getattr(text, "sliding_window", None)
    if window is not None or any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
        return (f"its language model uses sliding-window attention{f' (window {window})' if window else ''}; "
                "turbo's reduced KV cache needs full attention")
    if used_layers(config) < 1:
        return f"its vision_feature_layer {config.vision_feature_layer} reads the embeddings, before any block"
    return None


def _vision(model: nn.Module) -> nn.Module:
    """The tower's transformer (embeddings, encoder): transformers builds the tower bare."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def tower_tokens(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool,
                 spatial: SpatialMerge | None = None) -> torch.Tensor:
    """The tower's hidden states at the feature layer: (B, N_final, C), CLS included where it has one.
    `spatial`: MustDrop's spatial merge, run after the first block (an unmerged tower)."""
    vision = _vision(model)
    hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    if hasattr(vision, "pre_layrnorm"):  # CLIP
        hidden = vision.pre_layrnorm(hidden)
    for index, layer in enumerate(vision.encoder.layers[:used_layers(model.config)]):
        hidden = layer(hidden, attention_mask=None)
        if index == 0 and spatial is not None:
            patch = vision.embeddings.patch_size
            hidden = spatial(hidden, (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch))
    return hidden


def feature_cls_attention(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The CLS query's attention over the feature-layer tokens hidden (B, N_final, C), averaged over
    heads, in the block after the feature layer (MustDrop reads LLaVA-1.5's last CLIP block so), or
    the last block when the feature layer is the last; merged tokens weigh by their sizes. (B, N_final)."""
    layers, used = _vision(model).encoder.layers, used_layers(model.config)
    parts = clip_block_parts(layers[min(used, len(layers) - 1)])
    q, k, _ = parts.qkv(parts.norm1(hidden))
    state = getattr(layers[used - 1], "turbo_state", None)  # a merged tower: the sizes of its output tokens
    return cls_attention(q, k, state.size if state else None, parts.scale)
def _dropped_cls(config) -> int:
    """Tokens the "default" feature strategy leaves out: the CLS token."""
    return int(config.vision_feature_select_strategy == "default")


def image_features(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The image tokens the LLM reads: the projected feature-layer tokens, (B, N_image, C_text)."""
    return _export_outputs(model, pixel_values, interpolate)["image_features"]


def image_features_and_cls_attention(
    model: nn.Module, pixel_values: torch.Tensor, interpolate: bool, spatial: SpatialMerge | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image tokens the LLM reads and the tower's CLS attention on each (B, N_image), None for
    a tower without CLS (SigLIP); `spatial` as tower_tokens takes it."""
    hidden, dropped = tower_tokens(model, pixel_values, interpolate, spatial), _dropped_cls(model.config)
    features = model.model.multi_modal_projector(hidden[:, dropped:])
    if model.config.vision_config.model_type != "clip_vision_model":
        return features, None
    return features, feature_cls_attention(model, hidden)[:, dropped:]


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    hidden = tower_tokens(model, pixel_values, interpolate)  # (B, N_final, C)
    features = model.model.multi_modal_projector(hidden[:, _dropped_cls(model.config):])  # (B, N_image, C_text)
    return {"image_features": features, "last_hidden_state": hidden}


def _image_processor(image_size: tuple[int, int], config) -> object:
    """The tower's own processor family: CLIP's or SigLIP's mean and std."""
    return fixed_size_processor(TOWERS[config.vision_config.model_type])(image_size)


LLAVA = FamilyAdapter(
    family="llava",
    architectures=("LlavaForConditionalGeneration",),
    model_types=("llava",),
    layer_class=lambda: (CLIPEncoderLayer, SiglipEncoderLayer),
    encoder_layers=lambda model: _vision(model).encoder.layers[:used_layers(model.config)],
    block_parts=clip_block_parts,
    export_outputs=_export_outputs,
    image_processor=_image_processor,
    vision_config=lambda config: config.vision_config,
    task=GENERATION,
    protected_tokens=lambda config: 1 if config.vision_config.model_type == "clip_vision_model" else 0,
    protected_names="CLS (CLIP tower), none (SigLIP tower)",
    used_layers=used_layers,
    excluded_tokens=lambda config: {"image_features": _dropped_cls(config)},
    config_problem=_config_problem,
    language_model=LanguageModel(
        stack=lambda model: LlamaStack(model.model.language_model, model.lm_head),
        text_config=lambda config: config.text_config,
        image_token_id=lambda config: config.image_token_id,
        image_features=image_features,
        cls_attention=image_features_and_cls_attention,
        image_tokens=lambda config, tokens: tokens - _dropped_cls(config),
        special_ids=special_ids,
        placeholder_tokenizer=placeholder_tokenizer,
        mlp=lambda text: (text.intermediate_size, 3),  # gated: gate, up, down
        question_prompt=QUESTION_PROMPT,
    ),
)
