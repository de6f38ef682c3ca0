"""BLIP visual question answering adapter (`BlipForQuestionAnswering`): the merged vision encoder;
the question encoder, BLIP's text encoder reading the merged image tokens through cross-attention
(unweighted: an all-ones mask, no size bias, as transformers does); and the answer decoder,
BLIP's text decoder cross-attending to the encoded question and generating from [DEC]."""

import torch
from torch import nn

from turbo.models.adapters import VQA, CaptionDecoder, FamilyAdapter, QuestionAnswerer
from turbo.models.blip import BLIP_VISION, blip_placeholder_tokenizer

QUESTION_LENGTH = 35  # question tokens in BLIP's VQA code (its max_length)


def _image_embeds(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The merged image tokens the question encoder reads: (B, N_final, C)."""
    return model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state


def _export_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    return {"image_embeds": _image_embeds(model, pixel_values, interpolate)}


def _encode_question(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_embeds: torch.Tensor) -> torch.Tensor:
    """Question states (B, L, C_text): the text encoder over the question, cross-attending to every
    image token alike."""
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_mask).last_hidden_state


def _generation_ids(config) -> dict[str, int]:
    """As BlipForQuestionAnswering.generate sets them: the decoder starts at bos ([DEC]), ends at [SEP]."""
    text = config.text_config
    return {"bos_token_id": text.bos_token_id, "eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id}


BLIP_VQA = FamilyAdapter(
    **BLIP_VISION,
    architectures=("BlipForQuestionAnswering",),
    export_outputs=_export_outputs,
    task=VQA,
    question_answerer=QuestionAnswerer(
        encode=_encode_question,
        max_length=lambda config: min(QUESTION_LENGTH, config.text_config.max_position_embeddings),
        decoder=CaptionDecoder(
            module=lambda model: model.text_decoder,
            layers=lambda decoder: decoder.bert.encoder.layer,
            image_embeds=_image_embeds,
            generation_ids=_generation_ids,
            placeholder_tokenizer=blip_placeholder_tokenizer,
            lm_head=lambda decoder: decoder.cls.predictions.decoder,
        ),
    ),
)
