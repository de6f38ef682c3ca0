"""LLaVA adapter (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower, whose tokens at
one feature layer go through the projector into a LLaMA-style language model (Llama, Qwen2,
Mistral) in place of the prompt's `<image>` placeholder.

Only the tower's blocks up to the feature layer run (upstream runs the rest and discards it), so
those are the blocks that merge: the LLM reads N_final image tokens (the CLS token dropped by the
"default" feature strategy), and the prompt carries that many placeholders.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from turbo.models.adapters import GENERATION, FamilyAdapter, LanguageModel, fixed_size_processor
from turbo.models.clip import clip_block_parts

TOWERS = {"clip_vision_model": CLIPImageProcessorPil, "siglip_vision_model": SiglipImageProcessorPil}
LANGUAGE_MODELS = ("llama", "qwen2", "mistral")  # LLaMA-style decoders: RMSNorm, rotary, gated MLP
IMAGE_TOKEN = "<image>"


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


def tower_tokens(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The tower's hidden states at the feature layer: (B, N_final, C), CLS included where it has one."""
    vision = _vision(model)
    hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    if hasattr(vision, "pre_layrnorm"):  # CLIP
        hidden = vision.pre_layrnorm(hidden)
    for layer in vision.encoder.layers[:used_layers(model.config)]:
        hidden = layer(hidden, attention_mask=None)
    return hidden


def _dropped_cls(config) -> int:
    """Tokens the "default" feature strategy leaves out: the CLS token."""
    return int(config.vision_feature_select_strategy == "default")


def image_features(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The image tokens the LLM reads: the projected feature-layer tokens, (B, N_image, C_text)."""
    return _export_outputs(model, pixel_values, interpolate)["image_features"]


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    hidden = tower_tokens(model, pixel_values, interpolate)  # (B, N_final, C)
    features = model.model.multi_modal_projector(hidden[:, _dropped_cls(model.config):])  # (B, N_image, C_text)
    return {"image_features": features, "last_hidden_state": hidden}


def _special_ids(config) -> dict[str, int]:
    text = config.text_config
    ids = {"image_token_id": config.image_token_id, "eos_token_id": text.eos_token_id,
           "bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id}
    return {name: value[0] if isinstance(value, list) else value for name, value in ids.items() if value is not None}


def placeholder_tokenizer(config) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: the model's special ids (the image placeholder, end and
    start of text) where its config puts them, the 256 byte symbols at the lowest free ids, made-up
    words ("w123") up to the largest special id (so that every id it relies on is in range)."""
    special = {f"<{name.removesuffix('_token_id')}>": value for name, value in _special_ids(config).items()}
    special[IMAGE_TOKEN] = config.image_token_id
    taken = set(special.values())
    free = (index for index in range(max(taken) + 1) if index not in taken)
    vocab = {symbol: next(free) for symbol in bytes_to_unicode().values()}
    vocab.update({f"w{index}": index for index in free})
    vocab.update(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    names = {value: name for name, value in special.items()}
    ids = _special_ids(config)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": IMAGE_TOKEN},
        eos_token=names[ids["eos_token_id"]], pad_token=names.get(ids.get("pad_token_id", -1)),
        additional_special_tokens=list(special))


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
        module=lambda model: model.model.language_model,
        lm_head=lambda model: model.lm_head,
        text_config=lambda config: config.text_config,
        image_token_id=lambda config: config.image_token_id,
        image_features=image_features,
        image_tokens=lambda config, tokens: tokens - _dropped_cls(config),
        special_ids=_special_ids,
        placeholder_tokenizer=placeholder_tokenizer,
    ),
)
