"""BLIP visual question answering from an export directory on ONNX Runtime: the (merged) vision
encoder once per image, the question encoder reading its image tokens, and the answer decoder
generating from [DEC] while cross-attending to the encoded question (masked, so a question's
answer does not depend on the others padded into its batch)."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import UsageError
from turbo.core.files import GENERATION_FILE, QUESTION_EMBEDS, QUESTION_INPUTS, TEXT_INPUTS
from turbo.core.manifest import DecoderRecord, Manifest, QuestionRecord
from turbo.data.images import batches
from turbo.graph.export_dir import open_export
from turbo.runtimes.base import Runner
from turbo.runtimes.caption import (
    ExportMismatchError,
    FixedLengthRunner,
    GraphDecoder,
    onnx_graph,
    settings_from_config,
)
from turbo.runtimes.generation import GenerationSettings, generate
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

ANSWER_TOKENS = 10  # BLIP's VQA generation length (its max_length)


def question_feeds(tokenizer, questions: list[str], max_length: int) -> tuple[dict[str, np.ndarray], list[bool]]:
    """Questions as the question encoder takes them, padded to the longest and truncated at
    `max_length` tokens (int64, (B, L)); and which of them were truncated."""
    lengths = [len(ids) for ids in tokenizer(list(questions))["input_ids"]]
    encoded = tokenizer(list(questions), padding="longest", truncation=True, max_length=max_length,
                        return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in TEXT_INPUTS}, [n > max_length for n in lengths]


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    ids: list[int]  # the decoder's tokens, [DEC] first
    truncated: bool  # the question was longer than the export's max_length


class VqaPipeline:
    """`turbo vqa`'s engine: pixels -> (merged) image tokens -> question states -> answer ids -> text."""

    def __init__(self, encoder: Runner, question_encoder: Runner, decoder: GraphDecoder, tokenizer,
                 settings: GenerationSettings, bos_token_id: int, question: QuestionRecord,
                 static_batch: int | None = None, manifest: Manifest | None = None, processor=None) -> None:
        self.encoder, self.question_encoder, self.decoder = encoder, question_encoder, decoder
        self.tokenizer, self.settings, self.bos_token_id = tokenizer, settings, bos_token_id
        self.question, self.static_batch, self.manifest, self.processor = question, static_batch, manifest, processor

    @classmethod
    def open(cls, directory: str | Path, threads: int | None = None, exact: bool = False) -> "VqaPipeline":
        """The pipeline of a VQA export directory, checked for completeness."""
        directory = Path(directory)
        manifest = open_export(directory)
        if manifest.question is None or manifest.decoder is None:
            raise UsageError(f"{directory} does not answer questions (a {manifest.model.architecture} export); "
                             "turbo vqa needs a BLIP VQA export: turbo export --model blip-vqa")
        try:
            return cls.load(directory, manifest.onnx.file, manifest.question, manifest.decoder,
                            manifest.onnx.static_batch, threads, exact, manifest)
        except ExportMismatchError as exc:
            raise ExportMismatchError(f"{directory}: {exc}") from None

    @classmethod
    def load(cls, directory: Path, encoder_file: str, question: QuestionRecord, decoder: DecoderRecord,
             static_batch: int | None = None, threads: int | None = None, exact: bool = False,
             manifest: Manifest | None = None) -> "VqaPipeline":
        """The pipeline from the files themselves (an export being validated has no turbo.json yet)."""
        encoder = OnnxRuntimeRunner(directory / encoder_file, threads=threads, exact=exact)
        question_encoder = OnnxRuntimeRunner(directory / question.file, threads=threads, exact=exact)
        graphs = GraphDecoder.onnxruntime(directory, decoder, threads, exact=exact)
        produced = encoder.output_shape(encoder.output_names[0])[1]  # (B, N, C)
        read = onnx_graph(directory / question.file).input[2].type.tensor_type.shape.dim[1].dim_value  # (B, N, C)
        if produced != read or read != question.image_tokens:
            raise ExportMismatchError(f"the vision encoder gives {produced} image tokens but the question encoder "
                                      f"reads {read} (exported for another r); re-export the directory")
        config = json.loads((directory / GENERATION_FILE).read_text())
        return cls(encoder, question_encoder, graphs, AutoTokenizer.from_pretrained(directory),
                   settings_from_config(config), config["bos_token_id"], question, static_batch, manifest,
                   AutoImageProcessor.from_pretrained(directory))

    @property
    def random_weights(self) -> bool:
        return self.manifest is not None and self.manifest.model.random_weights

    def image_tokens(self, pixel_values: np.ndarray, batch: int = 8) -> np.ndarray:
        """(I, C, H, W) -> the merged image tokens (I, N, C), in batches (the export's, when static)."""
        parts = []
        for chunk, count in batches(pixel_values, self.static_batch or batch, static=bool(self.static_batch)):
            parts.append(self.encoder.run({self.encoder.input_names[0]: chunk})[self.encoder.output_names[0]][:count])
        return np.concatenate(parts)

    def answer_ids(self, image_tokens: np.ndarray, questions: list[str],
                   settings: GenerationSettings) -> tuple[np.ndarray, list[bool]]:
        """Each question about the image tokens of its row (B, N, C) -> answer ids (B, T), [DEC]
        first; and which questions were truncated."""
        feeds, truncated = question_feeds(self.tokenizer, questions, self.question.max_length)
        states = self.question_encoder.run({**feeds, QUESTION_INPUTS[2]: image_tokens})[QUESTION_EMBEDS]
        return self.decode(states, feeds["attention_mask"], settings), truncated

    def decode(self, states: np.ndarray, mask: np.ndarray, settings: GenerationSettings) -> np.ndarray:
        """Question states (B, L, C) and their mask (B, L) -> answer ids (B, T), [DEC] first."""
        self.decoder.image_embeds, self.decoder.cross_mask = states, mask
        prompt = np.full((len(states), 1), self.bos_token_id, dtype=np.int64)
        return generate(self.decoder, prompt, settings)

    def answer(self, pixel_values: np.ndarray, pairs: list[tuple[int, str]], batch: int = 8,
               **overrides) -> list[Answer]:
        """One Answer per (image index, question); `overrides` replace generation settings."""
        settings = replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        tokens = self.image_tokens(pixel_values, batch)
        answers = []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            rows = np.array([image for image, _ in chunk])
            questions = [question for _, question in chunk]
            ids, truncated = self.answer_ids(tokens[rows], questions, settings)
            for question, row, cut in zip(questions, ids, truncated):
                text = self.tokenizer.decode(row[1:], skip_special_tokens=True).strip()
                answers.append(Answer(question, text, row.tolist(), cut))
        return answers


class VqaRunner(FixedLengthRunner):
    """Whole answering, for bench: each run encodes the B images, one question about each, and
    decodes a fixed number of answer tokens."""

    def __init__(self, pipeline: VqaPipeline, tokens: int = 3,
                 question: str = "what is the man on the left holding in his hand?") -> None:
        super().__init__(pipeline, tokens)
        self.question = question

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = feeds[self.input_names[0]]
        tokens = self.pipeline.encoder.run({self.input_names[0]: pixels})[self.pipeline.encoder.output_names[0]]
        ids, _ = self.pipeline.answer_ids(tokens, [self.question] * len(pixels), self.settings)
        return {"sequences": ids}

    def _probe_pipeline(self) -> VqaPipeline:
        pipeline = super()._probe_pipeline()
        pipeline.question_encoder = pipeline.question_encoder.memory_probe()
        return pipeline

    def describe(self) -> dict:
        return {**self.pipeline.encoder.describe(), "decoder": "onnxruntime, with past key/values",
                "answer_tokens": self.settings.max_new_tokens}
