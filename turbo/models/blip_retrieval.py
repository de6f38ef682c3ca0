"""BLIP image-text retrieval adapter (`BlipForImageTextRetrieval`): the merged vision encoder; the
image-text contrastive (ITC) embeddings, each the projected, normalised first token of its
encoder; and the image-text matching (ITM) head, the text encoder reading the merged image tokens
through cross-attention. As transformers' forward: image tokens are attended unweighted (an
all-ones mask, no size bias), and the ITC similarity is the plain cosine."""

import torch
from torch import nn
from torch.nn.functional import normalize

from turbo.models.adapters import RETRIEVAL, FamilyAdapter, MatchHead, TextTower
from turbo.models.blip import BLIP_VISION, blip_placeholder_tokenizer

TEXT_LENGTH = 35  # tokens per text in BLIP's retrieval code (its max_length), not the 512 positions


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    """The ITC image embedding (B, D) and the image tokens the ITM head reads (B, N_final, C)."""
    tokens = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
    return {"image_embeds": normalize(model.vision_proj(tokens[:, 0, :]), dim=-1), "last_hidden_state": tokens}


def _text_embeds(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ITC text embedding: the text encoder alone, its first token projected and normalised (B, D)."""
    states = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return normalize(model.text_proj(states[:, 0, :]), dim=-1)


def _match_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_tokens: torch.Tensor) -> torch.Tensor:
    """ITM logits (B, 2) (index 1: the text matches the image) over image tokens (B, N, C)."""
    states = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_tokens,
                                encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
    return model.itm_head(states.last_hidden_state[:, 0, :])


def _special_ids(config) -> dict[str, int]:
    text = config.text_config
    return {"bos_token_id": text.bos_token_id, "sep_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id}


BLIP_RETRIEVAL = FamilyAdapter(
    **BLIP_VISION,
    architectures=("BlipForImageTextRetrieval",),
    export_outputs=_export_outputs,
    task=RETRIEVAL,
    text_tower=TextTower(
        embed=_text_embeds,
        max_length=lambda config: min(TEXT_LENGTH, config.text_config.max_position_embeddings),
        logit_scale=lambda model: 1.0,  # transformers' ITC score is the cosine itself
        special_ids=_special_ids,
        placeholder_tokenizer=blip_placeholder_tokenizer,
        match=MatchHead(logits=_match_logits, image_tokens_output="last_hidden_state"),
    ),
)
