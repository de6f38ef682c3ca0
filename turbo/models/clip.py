"""CLIP adapters: the vision tower (`CLIPVisionModel`, `CLIPVisionModelWithProjection`) and the
whole model for image-text retrieval (`CLIPModel`: the merged vision tower, the text tower and
`logit_scale`). Pre-norm blocks after a pre-layernorm, a class embedding at token 0."""

import torch
from torch import nn
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from turbo.models.adapters import RETRIEVAL, BlockParts, FamilyAdapter, TextTower, fixed_size_processor, split_heads


def clip_block_parts(layer: nn.Module) -> BlockParts:
    """The parts of a CLIP-style block (CLIP, SigLIP): layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp."""
    attn = layer.self_attn

    def qkv(x):
        return tuple(split_heads(proj(x), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    fused = attn.config._attn_implementation != "eager"
    return BlockParts(layer.layer_norm1, layer.layer_norm2, layer.mlp, attn.out_proj, qkv, attn.scale, fused)


def _tower(model: nn.Module) -> nn.Module:
    return model.vision_model if hasattr(model, "vision_model") else model


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The projected image embeddings (or the pooled CLS state) and the final hidden states."""
    out = _tower(model)(pixel_values, interpolate_pos_encoding=interpolate)
    hidden = out.last_hidden_state  # (B, N_final, C)
    if hasattr(model, "visual_projection"):
        return {"image_embeds": model.visual_projection(out.pooler_output), "last_hidden_state": hidden}
    return {"pooler_output": out.pooler_output, "last_hidden_state": hidden}


CLIP_VISION = dict(  # what the vision towers and the whole model share
    family="clip",
    layer_class=lambda: CLIPEncoderLayer,
    encoder_layers=lambda model: _tower(model).encoder.layers,
    block_parts=clip_block_parts,
    export_outputs=_export_outputs,
    image_processor=fixed_size_processor(CLIPImageProcessorPil),
)

CLIP = FamilyAdapter(
    **CLIP_VISION,
    architectures=("CLIPVisionModelWithProjection", "CLIPVisionModel"),
    model_types=("clip_vision_model",),
    embedders=("CLIPVisionModelWithProjection", "CLIPVisionModel"),
)


def _text_embeds(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """CLIPModel.get_text_features: the projected end-of-text state (B, D)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def _special_ids(config) -> dict[str, int]:
    text = config.text_config
    return {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id}


def _placeholder_tokenizer(config) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges, with CLIP's layout: the 256 byte symbols, their
    end-of-word forms, made-up words, and start/end of text as the last two ids (the end-of-text
    id is the largest, as the text tower's pooling assumes)."""
    size = config.text_config.vocab_size
    symbols = list(bytes_to_unicode().values())
    vocab = {**{c: i for i, c in enumerate(symbols)}, **{c + "</w>": 256 + i for i, c in enumerate(symbols)}}
    vocab.update({f"w{i}</w>": i for i in range(len(vocab), size - 2)})
    vocab.update({"<|startoftext|>": size - 2, "<|endoftext|>": size - 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=config.text_config.max_position_embeddings)


CLIP_MODEL = FamilyAdapter(
    **CLIP_VISION,
    architectures=("CLIPModel",),
    model_types=("clip",),
    vision_config=lambda config: config.vision_config,
    task=RETRIEVAL,
    text_tower=TextTower(
        embed=_text_embeds,
        max_length=lambda config: config.text_config.max_position_embeddings,
        logit_scale=lambda model: float(model.logit_scale.detach().exp()),
        special_ids=_special_ids,
        placeholder_tokenizer=_placeholder_tokenizer,
    ),
)
