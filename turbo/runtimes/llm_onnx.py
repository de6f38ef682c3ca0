"""An LLM-based VLM export on ONNX Runtime: the vision graph gives the image features, the prefill
graph reads the prompt around them and fills every layer's (reduced) KV cache, the decode graph
generates greedily from it."""

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import UsageError
from turbo.core.files import LLM_DECODE_INPUTS, LLM_PREFILL_INPUTS, LLM_PROMPT_LAYOUT, TOKENS_READ
from turbo.core.manifest import LanguageModelRecord, Manifest
from turbo.graph.export_dir import open_export
from turbo.runtimes.base import Runner
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

PREFIX, FEATURES, SUFFIX = LLM_PREFILL_INPUTS
IDS, POSITIONS = LLM_DECODE_INPUTS


class OnnxVlm:
    """The vision, prefill and decode graphs of an export behind runners: ONNX Runtime sessions
    (`open`, `from_files`), or the models a Triton server serves them as."""

    def __init__(self, vision: Runner, prefill: Runner, decode: Runner, record: LanguageModelRecord,
                 static_batch: int | None, tokenizer=None, processor=None, manifest: Manifest | None = None) -> None:
        self.vision, self.prefill, self.decode = vision, prefill, decode
        self.record, self.static_batch = record, static_batch
        self.tokenizer, self.processor = tokenizer, processor
        self.manifest = manifest  # None while an export is being validated
        # what each decode step reads back from the step before: the KV caches (DyRate: and the kept image tokens)
        self.past_names = [name for name in self.decode.input_names if name.startswith("past.")]
        self.present_names = [name.replace("past", "present", 1) for name in self.past_names]
        self.reads_layout = set(LLM_PROMPT_LAYOUT) <= set(self.decode.input_names)
        self.image_inputs = [name for name in self.prefill.input_names if name not in (PREFIX, SUFFIX)]
        self.image_per_layer: list[int] = []  # image tokens each layer read in the last prefill
        self.image_cached: list[int] = []  # image tokens each layer's cache held after the last step
        self._reopen: Callable[..., OnnxVlm] | None = None

    @classmethod
    def from_files(cls, directory: Path, vision_file: str, record: LanguageModelRecord, static_batch: int | None,
                   threads: int | None = None, tokenizer=None, processor=None, manifest: Manifest | None = None,
                   memory_arena: bool = True, exact: bool = False) -> "OnnxVlm":
        """On ONNX Runtime sessions of the directory's graphs; `exact` as OnnxRuntimeRunner takes it
        (quantized weights multiplied in fp32, for validation)."""
        runners = [OnnxRuntimeRunner(directory / file, threads=threads, memory_arena=memory_arena, exact=exact)
                   for file in (vision_file, record.prefill, record.decode)]
        vlm = cls(*runners, record, static_batch, tokenizer, processor, manifest)
        vlm._reopen = functools.partial(cls.from_files, directory, vision_file, record, static_batch, threads,
                                        tokenizer, processor, manifest, exact=exact)
        return vlm

    @classmethod
    def open(cls, directory: str | Path, threads: int | None = None) -> "OnnxVlm":
        """The pipeline of a verified export directory with a language model."""
        directory = Path(directory)
        manifest = open_export(directory)
        if manifest.llm is None:
            raise UsageError(f"{directory} has no language model graphs (a {manifest.model.architecture} export); "
                             "turbo generate needs an LLM-based VLM exported with them: turbo export --model "
                             "llava-1.5-7b (without --no-decoder)")
        return cls.from_files(directory, manifest.onnx.file, manifest.llm, manifest.onnx.static_batch, threads,
                              AutoTokenizer.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory),
                              manifest)

    def without_memory_arena(self) -> "OnnxVlm":
        """The same graphs in ONNX Runtime sessions that keep no memory pool between runs (peak
        memory probes)."""
        if self._reopen is None:
            raise TypeError("only an OnnxVlm from files can reopen its graphs")
        return self._reopen(memory_arena=False)

    def image_features(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels (1, C, H, W) -> what the prefill reads of the image: the image tokens (1, N, C_text)
        and, for MustDrop, the tower's CLS attention on each (1, N)."""
        batch = self.static_batch or 1
        out = self.vision.run({"pixel_values": np.repeat(pixels, batch, axis=0)})
        return {name: out[name][:1] for name in self.image_inputs}

    def stream(self, image: dict[str, np.ndarray], prefix: list[int], suffix: list[int], max_new_tokens: int,
               eos_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Each step's logits (1, V), greedy, until eos or max_new_tokens; `image` as
        `image_features` gives it. A token sent in (`send`) is decoded instead of the greedy one
        (teacher forcing)."""
        out = self.prefill.run({PREFIX: np.array([prefix]), **image, SUFFIX: np.array([suffix])})
        logits, state = out["logits"], [out[name] for name in self.present_names]
        position = len(prefix) + image[FEATURES].shape[1] + len(suffix)
        text = len(prefix) + len(suffix)
        self.image_cached = self._images_cached(out, text)
        # what each layer read: what its cache holds, but MustDrop's caches keep fewer from layer K on
        self.image_per_layer = [tokens - text for tokens in out[TOKENS_READ].tolist()] if TOKENS_READ in out else \
            self.image_cached
        layout = dict(zip(LLM_PROMPT_LAYOUT, (np.array([len(prefix)]), np.array([position])))) \
            if self.reads_layout else {}
        for step in range(max_new_tokens):
            forced = yield logits
            token = int(logits[0].argmax()) if forced is None else int(forced)
            if token == eos_token_id or step == max_new_tokens - 1:
                return
            out = self.decode.run({IDS: np.array([[token]]), POSITIONS: np.array([[position + step]]), **layout,
                                   **dict(zip(self.past_names, state))})
            logits, state = out["logits"], [out[name] for name in self.present_names]
            self.image_cached = self._images_cached(out, text + step + 1)

    def _images_cached(self, out: dict[str, np.ndarray], other_tokens: int) -> list[int]:
        """The image tokens each layer's cache holds: its length less the text and generated tokens."""
        return [out[name].shape[2] - other_tokens for name in self.present_names if name.endswith(".key")]

    def greedy_tokens(self, pixels: np.ndarray, prefix: list[int], suffix: list[int],
                      max_new_tokens: int) -> Iterator[int]:
        """The whole pipeline from pixels (1, C, H, W): greedy token ids as they come, until the
        export's end of text or max_new_tokens."""
        steps = self.stream(self.image_features(pixels), prefix, suffix, max_new_tokens, self.record.eos_token_id)
        return (int(logits[0].argmax()) for logits in steps)
