"""BLIP adapter (transformers 5.x `BlipForConditionalGeneration`): only the vision encoder merges;
the text decoder cross-attends to the fewer image tokens unchanged."""

import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.blip.modeling_blip import BlipEncoderLayer

from turbo.models.adapters import CAPTIONING, BlockParts, CaptionDecoder, FamilyAdapter, fixed_size_processor

RANDOM_INIT_RANGE = 0.02  # BLIP's vision default (1e-10) makes every random token identical


def blip_layer_class() -> type[nn.Module]:
    return BlipEncoderLayer


def blip_block_parts(layer: nn.Module) -> BlockParts:
    attn = layer.self_attn

    def qkv(x):
        batch, tokens, width = x.shape
        mixed = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads)
        q, k, v = mixed.permute(2, 0, 3, 1, 4)  # 3×(B, H, N, d)
        return q, k, v

    return BlockParts(layer.layer_norm1, layer.layer_norm2, layer.mlp, attn.projection, qkv, attn.scale, False)  # eager


def prepare_blip_random_config(config) -> None:
    config.vision_config.initializer_range = RANDOM_INIT_RANGE


def blip_image_embeds(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The image embeddings the text decoder cross-attends to: (B, N_final, C)."""
    return model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state


def blip_image_outputs(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> dict[str, torch.Tensor]:
    return {"image_embeds": blip_image_embeds(model, pixel_values, interpolate)}


def blip_generation_ids(config) -> dict[str, int]:
    """As BLIP's generate methods (captioning and VQA) set them: [DEC] starts, [SEP] ends, [PAD] pads."""
    text = config.text_config
    return {"bos_token_id": text.bos_token_id, "eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id}


# bert-base-uncased ids of the prompt words, so the placeholder tokenizer encodes BLIP's prompt as the real one does
_PROMPT_WORDS = {1037: "a", 3861: "picture", 1997: "of"}


def blip_placeholder_tokenizer(config) -> object:
    """A BERT word-piece tokenizer with BLIP's special-token ids and made-up words ("w123") for
    the rest: decodes random-weight captions, which are noise whatever the vocabulary."""

    text = config.text_config
    vocab = [f"w{i}" for i in range(text.vocab_size)]
    specials = {text.pad_token_id: "[PAD]", 100: "[UNK]", 101: "[CLS]", text.sep_token_id: "[SEP]", 103: "[MASK]",
                text.bos_token_id: "[DEC]"}
    for index, token in {**_PROMPT_WORDS, **specials}.items():
        vocab[index] = token
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        return BertTokenizer(str(path), bos_token="[DEC]", model_max_length=512)


# The vision side every BLIP head shares (captioning here, retrieval in blip_retrieval.py)
BLIP_VISION = dict(
    family="blip",
    model_types=("blip",),
    layer_class=blip_layer_class,
    vision_config=lambda config: config.vision_config,
    encoder_layers=lambda model: model.vision_model.encoder.layers,
    block_parts=blip_block_parts,
    prepare_random_config=prepare_blip_random_config,
    image_processor=fixed_size_processor(BlipImageProcessorPil),
)

# BLIP's text decoder: the captioner's, and VQA's answer decoder (blip_vqa.py)
BLIP_TEXT_DECODER = CaptionDecoder(
    module=lambda model: model.text_decoder,
    layers=lambda decoder: decoder.bert.encoder.layer,
    image_embeds=blip_image_embeds,
    generation_ids=blip_generation_ids,
    placeholder_tokenizer=blip_placeholder_tokenizer,
    lm_head=lambda decoder: decoder.cls.predictions.decoder,
)

BLIP = FamilyAdapter(
    **BLIP_VISION,
    architectures=("BlipForConditionalGeneration",),
    export_outputs=blip_image_outputs,
    task=CAPTIONING,
    caption_decoder=BLIP_TEXT_DECODER,
)
