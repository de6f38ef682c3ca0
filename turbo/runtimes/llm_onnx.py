"""An LLM-based VLM export on ONNX Runtime: the vision graph gives the image features, the prefill
graph reads the prompt around them and fills every layer's (reduced) KV cache, the decode graph
generates greedily from it."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import UsageError
from turbo.core.files import LLM_DECODE_INPUTS, LLM_PREFILL_INPUTS
from turbo.core.manifest import LanguageModelRecord, Manifest
from turbo.graph.export_dir import open_export
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

PREFIX, FEATURES, SUFFIX = LLM_PREFILL_INPUTS
IDS, POSITIONS = LLM_DECODE_INPUTS


class OnnxVlm:
    def __init__(self, directory: Path, vision_file: str, record: LanguageModelRecord, static_batch: int | None,
                 threads: int | None = None, tokenizer=None, processor=None, manifest: Manifest | None = None,
                 memory_arena: bool = True) -> None:
        self.directory, self.vision_file, self.threads = directory, vision_file, threads
        self.vision, self.prefill, self.decode = (
            OnnxRuntimeRunner(directory / file, threads=threads, memory_arena=memory_arena)
            for file in (vision_file, record.prefill, record.decode))
        self.record, self.static_batch = record, static_batch
        self.tokenizer, self.processor = tokenizer, processor
        self.manifest = manifest  # None while an export is being validated
        self.past_names = self.decode.input_names[len(LLM_DECODE_INPUTS):]
        self.present_names = [name.replace("past", "present", 1) for name in self.past_names]

    @classmethod
    def open(cls, directory: str | Path, threads: int | None = None) -> "OnnxVlm":
        """The pipeline of a verified export directory with a language model."""
        directory = Path(directory)
        manifest = open_export(directory)
        if manifest.llm is None:
            raise UsageError(f"{directory} has no language model graphs (a {manifest.model.architecture} export); "
                             "turbo generate needs an LLM-based VLM exported with them: turbo export --model "
                             "llava-1.5-7b (without --no-decoder)")
        return cls(directory, manifest.onnx.file, manifest.llm, manifest.onnx.static_batch, threads,
                   AutoTokenizer.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory), manifest)

    def without_memory_arena(self) -> "OnnxVlm":
        """The same graphs in sessions that keep no memory pool between runs (peak memory probes)."""
        return OnnxVlm(self.directory, self.vision_file, self.record, self.static_batch, self.threads,
                       self.tokenizer, self.processor, self.manifest, memory_arena=False)

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """pixels (1, C, H, W) -> the image tokens the language model reads (1, N, C_text)."""
        batch = self.static_batch or 1
        deployed = self.vision.output_names[0]  # the image features
        return self.vision.run({"pixel_values": np.repeat(pixels, batch, axis=0)})[deployed][:1]

    def stream(self, features: np.ndarray, prefix: list[int], suffix: list[int], max_new_tokens: int,
               eos_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Each step's logits (1, V), greedy, until eos or max_new_tokens."""
        out = self.prefill.run({PREFIX: np.array([prefix]), FEATURES: features, SUFFIX: np.array([suffix])})
        logits, cache = out["logits"], [out[name] for name in self.present_names]
        position = len(prefix) + features.shape[1] + len(suffix)
        for step in range(max_new_tokens):
            yield logits
            token = int(logits[0].argmax())
            if token == eos_token_id or step == max_new_tokens - 1:
                return
            out = self.decode.run({IDS: np.array([[token]]), POSITIONS: np.array([[position + step]]),
                                   **dict(zip(self.past_names, cache))})
            logits, cache = out["logits"], [out[name] for name in self.present_names]

    def greedy_tokens(self, pixels: np.ndarray, prefix: list[int], suffix: list[int],
                      max_new_tokens: int) -> Iterator[int]:
        """The whole pipeline from pixels (1, C, H, W): greedy token ids as they come, until the
        export's end of text or max_new_tokens."""
        steps = self.stream(self.image_features(pixels), prefix, suffix, max_new_tokens, self.record.eos_token_id)
        return (int(logits[0].argmax()) for logits in steps)
