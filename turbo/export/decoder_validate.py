"""Validate a captioning export's decoder against upstream transformers: the decoder graphs'
logits over the first steps, and whole greedy captions (ONNX encoder + decoder vs `generate`)."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from turbo.core.errors import describe_error
from turbo.export.validate import EXACT, OutputCheck, ValidationReport, seeded_pixels
from turbo.models.adapters import CaptionDecoder
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.generation import GenerationSettings

LOGIT_STEPS = 4  # tokens generated after the prompt whose logits are compared
CAPTION_BATCH = 2
DECODER_RUN = "decoder"  # how the decoder's checks and errors are named in a ValidationReport


@dataclass(frozen=True)
class CaptionCheck:
    """Greedy captions of the ONNX pipeline vs upstream `generate`, token for token."""

    run: str
    batch: int
    beams: int
    sequences_differing: int
    gated: bool  # False for fp16 or INT8 encoders: near-tie merge flips and rounding change image tokens

    @property
    def passed(self) -> bool:
        return self.sequences_differing == 0 or not self.gated


def reference_ids(model: nn.Module, pixels: np.ndarray, prompt_ids: list[int], settings: GenerationSettings,
                  interpolate: bool = False) -> np.ndarray:
    """Upstream BLIP `generate` (ids include the prompt). BLIP's generate replaces the first id with
    [DEC] and drops the last (the tokenizer's [SEP]), hence the extra EOS appended here."""
    prompt = torch.tensor([prompt_ids + [settings.eos_token_id]] * len(pixels))
    with torch.inference_mode():
        ids = model.generate(pixel_values=torch.from_numpy(pixels), input_ids=prompt, do_sample=False,
                             interpolate_pos_encoding=interpolate,
                             num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
                             min_new_tokens=settings.min_new_tokens, length_penalty=settings.length_penalty,
                             early_stopping=settings.early_stopping)
    return ids.numpy()


def _logit_checks(model: nn.Module, caption: CaptionDecoder, pipeline: CaptionPipeline, pixels: np.ndarray,
                  prompt_ids: list[int], interpolate: bool) -> list[OutputCheck]:
    """First-step and with-past logits, both fed PyTorch's image embeddings and token ids."""
    settings = GenerationSettings(pipeline.settings.eos_token_id, pipeline.settings.pad_token_id,
                                  max_new_tokens=LOGIT_STEPS, min_new_tokens=LOGIT_STEPS)
    ids = reference_ids(model, pixels, prompt_ids, settings, interpolate)  # (B, T + steps), no EOS inside
    with torch.inference_mode():
        embeds = caption.image_embeds(model, torch.from_numpy(pixels), interpolate)
        expected = caption.module(model)(input_ids=torch.from_numpy(ids), encoder_hidden_states=embeds).logits.numpy()
    decoder, prompt_len = pipeline.decoder, len(prompt_ids)
    decoder.image_embeds = embeds.numpy()
    first, stepped = decoder.teacher_forced(ids, prompt_len)  # (B, T, V), (B, L - T, V)
    batch = len(pixels)
    want_first, want_steps = expected[:, :prompt_len], expected[:, prompt_len:]
    return [OutputCheck(f"{DECODER_RUN} first step", "logits", batch, want_first.shape, first.shape,
                        float(np.abs(want_first - first).max()), EXACT.atol),
            OutputCheck(f"{DECODER_RUN} with past ({ids.shape[1] - prompt_len} steps)", "logits", batch,
                        want_steps.shape, stepped.shape, float(np.abs(want_steps - stepped).max()), EXACT.atol)]


def captions_are_exact(precision: str, quant: str | None) -> bool:
    """Whether the ONNX captioner must reproduce PyTorch's captions token for token: fp32 encoders,
    unquantized or weight-only quantized (PyTorch runs the same fake-quantized weights). fp16 and
    INT8 encoders change image tokens (near-tie merge flips, rounded activations)."""
    return precision == "fp32" and quant != "int8"


def validate_decoder(model: nn.Module, caption: CaptionDecoder, pipeline: CaptionPipeline, report: ValidationReport,
                     pixel_shape: tuple[int, int, int], interpolate: bool, prompt: str, exact_captions: bool,
                     seed: int = 0) -> None:
    """Append the decoder's logit checks and a greedy caption check to `report`."""
    batch = pipeline.static_batch or CAPTION_BATCH
    pixels = seeded_pixels(batch, pixel_shape, seed)
    prompt_ids = pipeline.prompt_ids(prompt)
    try:
        report.outputs.extend(_logit_checks(model, caption, pipeline, pixels, prompt_ids, interpolate))
        want = reference_ids(model, pixels, prompt_ids, pipeline.settings, interpolate)
        got = pipeline.generate(pixels, prompt_ids, pipeline.settings)
    except Exception as exc:  # ORT load or run failures of the decoder graphs are validation failures
        report.runtime_error = f"{DECODER_RUN}: {describe_error(exc)}"
        return
    differing = batch if want.shape != got.shape else int((want != got).any(axis=1).sum())
    report.captions.append(CaptionCheck("greedy, onnx vs generate", batch,
                                        pipeline.settings.num_beams, differing, gated=exact_captions))
