"""Export a VQA model's text side: the question encoder, (input_ids, attention_mask (B, L),
image_embeds (B, N, C)) -> question states (B, L, C_text), with L dynamic up to the record's
max_length and N the plan's final image tokens; and the answer decoder's masked graphs
(decoder_export.py), which cross-attend to those states. Both stay fp32 whatever the image
encoder's precision; validation compares each graph, and whole answers, with PyTorch."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from turbo.core.errors import describe_error
from turbo.core.files import GENERATION_FILE, QUESTION_EMBEDS, QUESTION_FILE, QUESTION_INPUTS
from turbo.core.manifest import DecoderRecord, QuestionRecord
from turbo.export.decoder_export import export_decoder, write_generation_config
from turbo.export.decoder_validate import DECODER_RUN, LOGIT_STEPS, CaptionCheck
from turbo.export.onnx_export import EXTERNAL_DATA_BYTES, parameter_bytes, run_exporter
from turbo.export.text_export import sample_image_tokens
from turbo.export.validate import ValidationReport, exact_check, seeded_pixels
from turbo.models.adapters import QuestionAnswerer
from turbo.models.loading import ModelSource
from turbo.runtimes.vqa import ANSWER_TOKENS, VqaPipeline, question_feeds

QUESTION_RUN = "question encoder"
ANSWER_RUN = f"{DECODER_RUN} (answers)"  # counted with the caption decoder's checks by turbo check
# Validation questions: short and long (padding in one batch), one word, one past the maximum length
SAMPLE_QUESTIONS = ("what is in the picture?", "how many dogs are playing in the snow next to the small red fence?",
                    "why", "is there a " + "very " * 40 + "red bus?")


class QuestionEncoder(nn.Module):
    """(input_ids, attention_mask, image_embeds) -> the family's question states (B, L, C_text)."""

    def __init__(self, model: nn.Module, answerer: QuestionAnswerer) -> None:
        super().__init__()
        self.model, self.answerer = model, answerer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        return self.answerer.encode(self.model, input_ids, attention_mask, image_embeds)


def export_answerer(model: nn.Module, source: ModelSource, tokenizer: tuple[object, str], directory: Path,
                    image_tokens: int, opset: int) -> tuple[QuestionRecord, DecoderRecord]:
    """Write QUESTION_FILE, the answer decoder's graphs, the tokenizer and the generation config
    into `directory`; the manifest's `question` and `decoder` sections."""
    answerer = source.adapter.question_answerer
    tokenizer, origin = tokenizer
    length = answerer.max_length(source.config)
    feeds, _ = question_feeds(tokenizer, list(SAMPLE_QUESTIONS[:2]), length)
    width = source.adapter.vision_config(source.config).hidden_size
    texts = (torch.from_numpy(feeds[name]) for name in QUESTION_INPUTS[:2])
    args = (*texts, sample_image_tokens(2, image_tokens, width, 0))
    encoder = QuestionEncoder(model, answerer).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=length)
    program = run_exporter(encoder, args, list(QUESTION_INPUTS), [QUESTION_EMBEDS],
                           ({0: batch, 1: sequence}, {0: batch, 1: sequence}, {0: batch}), opset)
    program.save(str(directory / QUESTION_FILE), external_data=parameter_bytes(encoder) >= EXTERNAL_DATA_BYTES)
    decoder = answerer.decoder.module(model)
    info = export_decoder(decoder, directory, None, opset)
    tokenizer.save_pretrained(directory)
    write_generation_config(directory, answerer.decoder.generation_ids(source.config), ANSWER_TOKENS)
    question = QuestionRecord(file=QUESTION_FILE, max_length=length, image_tokens=image_tokens, precision="fp32",
                              tokenizer={"origin": origin})
    answers = DecoderRecord(**info, precision="fp32", prompt="", generation_config=GENERATION_FILE,
                            tokenizer={"origin": origin},
                            max_positions=getattr(decoder.config, "max_position_embeddings", None))
    return question, answers


def reference_answers(model: nn.Module, pixels: np.ndarray, pairs: list[tuple[int, str]], pipeline: VqaPipeline,
                      interpolate: bool) -> list[list[int]]:
    """Upstream `generate` of each question alone (no padding), greedy: its ids up to [SEP]."""
    answers = []
    for image, question in pairs:
        feeds, _ = question_feeds(pipeline.tokenizer, [question], pipeline.question.max_length)
        with torch.inference_mode():
            ids = model.generate(input_ids=torch.from_numpy(feeds["input_ids"]),
                                 attention_mask=torch.from_numpy(feeds["attention_mask"]),
                                 pixel_values=torch.from_numpy(pixels[image:image + 1]),
                                 interpolate_pos_encoding=interpolate, do_sample=False, num_beams=1,
                                 max_new_tokens=pipeline.settings.max_new_tokens)
        answers.append(ids[0].tolist())
    return answers


def answers_agree(model: nn.Module, pipeline: VqaPipeline, pixels: np.ndarray, pairs: list[tuple[int, str]],
                  interpolate: bool) -> list[bool]:
    """Per (image, question): whether the pipeline's greedy answer, all questions in one batch,
    is upstream `generate`'s on the question alone, token for token up to [SEP]."""
    want = reference_answers(model, pixels, pairs, pipeline, interpolate)
    eos = pipeline.settings.eos_token_id
    return [until_eos(w, eos) == until_eos(got.ids, eos)
            for w, got in zip(want, pipeline.answer(pixels, pairs, batch=len(pairs)))]


def until_eos(ids: list[int], eos: int) -> list[int]:
    """Ids up to and including the first end-of-sequence token (the padding after it dropped)."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def _decoder_logits(decoder: nn.Module, ids: np.ndarray, states: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """Upstream decoder logits (B, T, V), each row over its question's own positions: transformers'
    decoder does not apply an encoder mask, so padding is cut off instead."""
    rows = []
    with torch.inference_mode():
        for row, length in enumerate(mask.sum(axis=1)):
            rows.append(decoder(input_ids=torch.from_numpy(ids[row:row + 1]),
                                encoder_hidden_states=states[row:row + 1, :length]).logits[0].numpy())
    return np.stack(rows)


def validate_answerer(model: nn.Module, answerer: QuestionAnswerer, pipeline: VqaPipeline, report: ValidationReport,
                      pixel_shape: tuple[int, int, int], interpolate: bool, exact_answers: bool,
                      seed: int = 0) -> None:
    """The question encoder and answer decoder graphs against PyTorch on padded questions, and
    greedy answers of the whole ONNX pipeline against upstream `generate` token for token."""
    batch = pipeline.static_batch or 2
    pixels = seeded_pixels(batch, pixel_shape, seed)
    pairs = [(index % batch, question) for index, question in enumerate(SAMPLE_QUESTIONS)]
    run = QUESTION_RUN
    try:
        feeds, _ = question_feeds(pipeline.tokenizer, [q for _, q in pairs], pipeline.question.max_length)
        inputs = {name: torch.from_numpy(value) for name, value in feeds.items()}
        with torch.inference_mode():
            tokens = answerer.decoder.image_embeds(model, torch.from_numpy(pixels), interpolate)
            tokens = tokens[[image for image, _ in pairs]]
            states = answerer.encode(model, inputs["input_ids"], inputs["attention_mask"], tokens)
        got = pipeline.question_encoder.run({**feeds, QUESTION_INPUTS[2]: tokens.numpy()})[QUESTION_EMBEDS]
        mask = feeds["attention_mask"].astype(bool)  # padded positions are never read
        report.outputs.append(exact_check(run, QUESTION_EMBEDS, states.numpy()[mask], got[mask]))
        run = ANSWER_RUN
        steps = replace(pipeline.settings, num_beams=1, max_new_tokens=LOGIT_STEPS, min_new_tokens=LOGIT_STEPS)
        ids = pipeline.decode(states.numpy(), feeds["attention_mask"], steps)  # (B, 1 + steps)
        want = _decoder_logits(answerer.decoder.module(model), ids, states, feeds["attention_mask"])
        decoder = pipeline.decoder
        decoder.image_embeds, decoder.cross_mask = states.numpy(), feeds["attention_mask"]
        first, stepped = decoder.teacher_forced(ids, 1)
        report.outputs.append(exact_check(f"{ANSWER_RUN} first step", "logits", want[:, :1], first))
        report.outputs.append(exact_check(f"{ANSWER_RUN} with past ({ids.shape[1] - 1} steps)", "logits", want[:, 1:],
                                     stepped))
        agree = answers_agree(model, pipeline, pixels, pairs, interpolate)
    except Exception as exc:  # ORT load or run failures of the text graphs are validation failures
        report.runtime_error = f"{run}: {describe_error(exc)}"
        return
    differing = len(agree) - sum(agree)
    report.captions.append(CaptionCheck("greedy answers, onnx vs generate (each question alone)", len(pairs), 1,
                                        differing, gated=exact_answers))
