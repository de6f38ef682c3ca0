"""BLIP-2 adapter (`Blip2ForConditionalGeneration` with an OPT language model): the ViT's tokens
merge; the Q-Former's learned queries cross-attend to the fewer tokens, unchanged, and its
`num_query_tokens` outputs, projected, are the image tokens the OPT decoder reads before the prompt
(transformers puts that many `<image>` ids first; the prompt itself has no placeholder).

The merge makes the ViT and the Q-Former's cross-attention cheaper; the language model always reads
the same number of image tokens, which `--llm-drop` can reduce inside it.
"""

import torch
from torch import nn
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

from turbo.models.adapters import GENERATION, FamilyAdapter, LanguageModel, fixed_size_processor
from turbo.models.blip import blip_block_parts, prepare_blip_random_config
from turbo.models.decoder_stacks import OptStack
from turbo.models.llm_vocab import placeholder_tokenizer, special_ids

LANGUAGE_MODELS = ("opt",)
QUERY_STD = 0.02  # random query tokens: upstream initialises them to zeros, which makes every query the same
# BLIP-2's zero-shot VQA prompt
QUESTION_PROMPT = "Question: {question} Answer:"


def _config_problem(config) -> str | None:
    text = config.text_config
    if text.model_type not in LANGUAGE_MODELS:
        return f"its language model is {text.model_type}; turbo takes {', '.join(LANGUAGE_MODELS)} (decoder-only)"
    if text.word_embed_proj_dim != text.hidden_size:
        return (f"its OPT embeds tokens in {text.word_embed_proj_dim} dimensions and runs its blocks in "
                f"{text.hidden_size}; BLIP-2 writes {text.hidden_size}-wide image tokens into the embeddings")
    if config.image_token_index is None:
        return ("its config has no image_token_index (saved before transformers put the image tokens in the prompt); "
                "set it to the tokenizer's <image> id")
    return None


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """image_features (B, num_query_tokens, C_text): the Q-Former's queries over the merged tokens,
    projected; last_hidden_state (B, N_final, C): the merged ViT tokens."""
    tokens = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    read = model.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state  # (B, Q, C_qformer)
    return {"image_features": model.language_projection(read.to(tokens.dtype)), "last_hidden_state": tokens}


def image_features(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    return _export_outputs(model, pixel_values, interpolate)["image_features"]


def _init_random_queries(model: nn.Module) -> None:
    with torch.no_grad():
        model.query_tokens.normal_(0.0, QUERY_STD)


BLIP2 = FamilyAdapter(
    family="blip2",
    architectures=("Blip2ForConditionalGeneration",),
    model_types=("blip-2",),
    layer_class=lambda: Blip2EncoderLayer,
    encoder_layers=lambda model: model.vision_model.encoder.layers,
    block_parts=blip_block_parts,
    export_outputs=_export_outputs,
    image_processor=lambda size, config: fixed_size_processor(BlipImageProcessorPil)(size),
    vision_config=lambda config: config.vision_config,
    prepare_random_config=prepare_blip_random_config,
    init_random_weights=_init_random_queries,
    task=GENERATION,
    fixed_tokens=lambda config: {"image_features": config.num_query_tokens},
    config_problem=_config_problem,
    language_model=LanguageModel(
        stack=lambda model: OptStack(model.language_model.model.decoder, model.language_model.lm_head),
        text_config=lambda config: config.text_config,
        image_token_id=lambda config: config.image_token_id,
        image_features=image_features,
        image_tokens=lambda config, tokens: config.num_query_tokens,
        special_ids=special_ids,
        placeholder_tokenizer=placeholder_tokenizer,
        mlp=lambda text: (text.ffn_dim, 2),  # fc1, fc2
        question_prompt=QUESTION_PROMPT,
        image_first=True,
    ),
)
