"""BLIP visual question answering adapter (`BlipForQuestionAnswering`): the merged vision encoder;
the question encoder, BLIP's text encoder reading the merged image tokens through cross-attention
(unweighted: an all-ones mask, no size bias, as transformers does); and the answer decoder,
BLIP's text decoder cross-attending to the encoded question and generating from [DEC]."""

import torch
from torch import nn

from turbo.models.adapters import VQA, FamilyAdapter, QuestionAnswerer
from turbo.models.blip import BLIP_TEXT_DECODER, BLIP_VISION, blip_image_outputs

QUESTION_LENGTH = 35  # question tokens in BLIP's VQA code (its max_length)


def _encode_question(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_embeds: torch.Tensor) -> torch.Tensor:
    """Question states (B, L, C_text): the text encoder over the question, cross-attending to every
    image token alike."""
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_mask).last_hidden_state


BLIP_VQA = FamilyAdapter(
    **BLIP_VISION,
    architectures=("BlipForQuestionAnswering",),
    export_outputs=blip_image_outputs,
    task=VQA,
    question_answerer=QuestionAnswerer(
        encode=_encode_question,
        max_length=lambda config: min(QUESTION_LENGTH, config.text_config.max_position_embeddings),
        decoder=BLIP_TEXT_DECODER,
    ),
)
