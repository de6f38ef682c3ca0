"""BLIP captioning from an export directory on ONNX Runtime: the (merged) vision encoder, the
two decoder graphs stepping with a key/value cache, and greedy or beam search."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import TurboError, UsageError
from turbo.core.files import GENERATION_FILE
from turbo.core.manifest import DecoderRecord, Manifest, TensorRTRecord
from turbo.data.images import Sample, batches, pixel_batch
from turbo.graph.export_dir import open_export
from turbo.runtimes.base import Runner
from turbo.runtimes.generation import GenerationSettings, generate
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.tensorrt import TensorRTRunner

DEFAULT_PROMPT = "a picture of"  # BLIP's COCO captioning prompt


class ExportMismatchError(TurboError):
    """The files of an export do not belong together."""


def grow_cache(cache: list[np.ndarray], grown: list[np.ndarray]) -> list[np.ndarray]:
    """The cache after one step: per layer [self K, self V, cross K, cross V]; a with-past step
    returns only the self K, V (one position longer), the cross ones never change."""
    return [grown[2 * (i // 4) + i % 4] if i % 4 < 2 else c for i, c in enumerate(cache)]


def reorder_cache(cache: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """Beams only move within their input, whose rows share one cross K/V: only self K/V move."""
    return [c[rows] if i % 4 < 2 else c for i, c in enumerate(cache)]


def onnx_graph(path: Path):
    """An ONNX file's graph, without its weights."""

    return onnx.load(str(path), load_external_data=False).graph


class GraphDecoder:
    """The first-step and with-past decoder graphs, on any two runners (ONNX Runtime sessions or
    TensorRT engines built from them), as a `StepDecoder` for one batch of cross-attended states at a
    time: `image_embeds` (captioning's image tokens, or VQA's question states) and, for graphs with a
    mask input, `cross_mask`, set before each search. Outputs are read by the ONNX graphs' names."""

    def __init__(self, first: Runner, with_past: Runner, directory: Path, decoder: DecoderRecord) -> None:
        self.first, self.with_past = first, with_past
        first_graph = onnx_graph(directory / decoder.first_step)
        past_graph = onnx_graph(directory / decoder.with_past)
        self.first_outputs = [o.name for o in first_graph.output]
        self.cross_name = first_graph.input[1].name  # image_embeds (B, N, C) or question_embeds (B, L, C)
        self.mask_name = first_graph.input[2].name if len(first_graph.input) > 2 else None  # (B, L)
        self.past_names = [i.name for i in past_graph.input][1 + bool(self.mask_name):]  # per layer: self K, V,
        self.past_outputs = [o.name for o in past_graph.output]                         # cross K, V
        self.image_tokens = first_graph.input[1].type.tensor_type.shape.dim[1].dim_value  # 0 where dynamic
        self.image_embeds: np.ndarray | None = None
        self.cross_mask: np.ndarray | None = None
        self._step_mask: np.ndarray | None = None  # cross_mask, one row per search row

    @classmethod
    def onnxruntime(cls, directory: Path, decoder: DecoderRecord, threads: int | None = None,
                    providers: tuple[str, ...] = ("CPUExecutionProvider",), exact: bool = False) -> "GraphDecoder":
        return cls(OnnxRuntimeRunner(directory / decoder.first_step, providers, threads, exact=exact),
                   OnnxRuntimeRunner(directory / decoder.with_past, providers, threads, exact=exact),
                   directory, decoder)

    def first_step(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits at every prompt position (B, T, V) and the cache."""
        feeds = {"input_ids": input_ids, self.cross_name: self.image_embeds}
        if self.mask_name:
            feeds[self.mask_name] = self._step_mask = self.cross_mask
        outputs = self.first.run(feeds)
        logits, *cache = (outputs[name] for name in self.first_outputs)
        return logits, cache

    def teacher_forced(self, ids: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Logits over the prompt (B, T, V) and after each later token of `ids` (B, L - T, V)."""
        first, cache = self.first_step(ids[:, :prompt_len])
        stepped = []
        for position in range(prompt_len, ids.shape[1]):
            logits, cache = self.step(ids[:, position], cache)
            stepped.append(logits)
        return first, np.stack(stepped, axis=1) if stepped else first[:, :0]

    def start(self, input_ids: np.ndarray, rows_per_input: int) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, cache = self.first_step(input_ids)
        logits = logits[:, -1]
        if rows_per_input > 1:  # every beam of an input starts from the same prompt
            logits, cache = np.repeat(logits, rows_per_input, 0), [np.repeat(c, rows_per_input, 0) for c in cache]
            if self.mask_name:
                self._step_mask = np.repeat(self.cross_mask, rows_per_input, 0)
        return logits, cache

    def step(self, tokens: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": tokens[:, None], **dict(zip(self.past_names, cache))}
        if self.mask_name:
            feeds[self.mask_name] = self._step_mask  # beams only move within their input: its mask stays
        outputs = self.with_past.run(feeds)
        logits, *grown = (outputs[name] for name in self.past_outputs)
        return logits[:, -1], grow_cache(cache, grown)

    def reorder(self, cache: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        return reorder_cache(cache, rows)


class CaptionPipeline:
    """`turbo caption`'s engine: pixels -> (merged) image embeddings -> token ids -> text."""

    def __init__(self, encoder: Runner, decoder: GraphDecoder, tokenizer, settings: GenerationSettings,
                 bos_token_id: int, static_batch: int | None = None, manifest: Manifest | None = None,
                 processor=None) -> None:
        self.encoder, self.decoder, self.tokenizer, self.processor = encoder, decoder, tokenizer, processor
        self.settings, self.bos_token_id, self.static_batch = settings, bos_token_id, static_batch
        self.manifest = manifest  # None while an export is being validated

    @classmethod
    def open(cls, directory: str | Path, threads: int | None = None,
             providers: tuple[str, ...] = ("CPUExecutionProvider",), exact: bool = False,
             tensorrt: bool = False, merge_kernel: str = "auto") -> "CaptionPipeline":
        """The pipeline of an export directory, checked for completeness (exact: INT4 weight
        MatMuls in fp32, for validation; see OnnxRuntimeRunner). tensorrt: on the export's engines.
        merge_kernel: how ONNX Runtime runs the encoder's TurboMerge nodes (see OnnxRuntimeRunner)."""
        directory = Path(directory)
        manifest = open_export(directory)
        decoder = manifest.decoder
        if decoder is None or manifest.question is not None:
            what = "answers questions: use turbo vqa" if manifest.question else "has no text decoder"
            raise UsageError(f"{directory} {what} (a {manifest.model.architecture} export); "
                             "captioning needs a BLIP captioning export: turbo export --model blip-caption")
        engines = None
        if tensorrt:
            engines = manifest.tensorrt
            engine_decoder = (engines.decoder if engines else None) or {}
            if not engine_decoder.get("built"):
                reason = engine_decoder.get("reason") or "export it with --trt"
                raise UsageError(f"{directory} has no TensorRT caption engines: {reason}")
        try:
            return cls.load(directory, manifest.onnx.file, decoder, manifest.onnx.static_batch,
                            threads, providers, exact, manifest, engines, merge_kernel)
        except ExportMismatchError as exc:
            raise ExportMismatchError(f"{directory}: {exc}") from None

    @classmethod
    def load(cls, directory: Path, encoder_file: str, decoder: DecoderRecord, static_batch: int | None = None,
             threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",), exact: bool = False,
             manifest: Manifest | None = None, engines: TensorRTRecord | None = None,
             merge_kernel: str = "auto") -> "CaptionPipeline":
        """The pipeline from the files themselves (an export being validated has no turbo.json yet).
        engines: the manifest's `tensorrt` entry, to run its engines instead of ONNX Runtime."""

        if engines is not None:
            files = engines.decoder["engines"]
            encoder = TensorRTRunner(directory / engines.file)
            graphs = GraphDecoder(TensorRTRunner(directory / files["first_step"]["file"]),
                                  TensorRTRunner(directory / files["with_past"]["file"]), directory, decoder)
        else:
            encoder = OnnxRuntimeRunner(directory / encoder_file, providers, threads, exact=exact,
                                        merge_kernel=merge_kernel)
            graphs = GraphDecoder.onnxruntime(directory, decoder, threads, providers, exact)
        produced = encoder.output_shape(encoder.output_names[0])[1]  # (B, N, C)
        if produced != graphs.image_tokens:
            raise ExportMismatchError(
                f"the vision encoder gives {produced} image tokens but the decoder graphs expect {graphs.image_tokens} "
                "(exported for another r); re-export the directory")
        config = json.loads((directory / GENERATION_FILE).read_text())
        return cls(encoder, graphs, AutoTokenizer.from_pretrained(directory), settings_from_config(config),
                   config["bos_token_id"], static_batch, manifest, AutoImageProcessor.from_pretrained(directory))

    @property
    def random_weights(self) -> bool:
        return self.manifest is not None and self.manifest.model.random_weights

    def prompt_ids(self, prompt: str) -> list[int]:
        """BLIP's decoder prompt: its BOS ([DEC]) then the prompt's word pieces."""
        return [self.bos_token_id, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]] if prompt \
            else [self.bos_token_id]

    def generate(self, pixel_values: np.ndarray, prompt_ids: list[int], settings: GenerationSettings) -> np.ndarray:
        """(B, C, H, W) -> ids (B, T) including the prompt."""
        embeds = self.encoder.run({self.encoder.input_names[0]: pixel_values})
        self.decoder.image_embeds = next(iter(embeds.values()))  # image_embeds (B, N, C)
        prompt = np.tile(np.asarray(prompt_ids, dtype=np.int64), (len(pixel_values), 1))
        return generate(self.decoder, prompt, settings)

    def caption_files(self, images: list[str | Path], prompt: str = DEFAULT_PROMPT, batch: int = 8,
                      **overrides) -> list[dict]:
        """`caption` of image files, preprocessed with the export's own image processor; a missing
        or unreadable file is a one-line UsageError before anything runs."""
        missing = [str(image) for image in images if not Path(image).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(f"no such image file: {missing[0]}{more}")
        return self.caption(pixel_batch([Sample(Path(image)) for image in images], self.processor), prompt, batch,
                            **overrides)

    def caption(self, pixel_values: np.ndarray, prompt: str = DEFAULT_PROMPT, batch: int = 8,
                **overrides) -> list[dict]:
        """One {caption, ids} per image; `overrides` replace generation settings (num_beams, ...)."""
        settings = replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        prompt_ids = self.prompt_ids(prompt)
        positions = self.manifest.decoder.max_positions if self.manifest is not None else None
        needed = len(prompt_ids) + settings.max_new_tokens
        if positions is not None and needed > positions:
            raise UsageError(f"the prompt ({len(prompt_ids)} tokens) and --max-length {settings.max_new_tokens} need "
                             f"{needed} positions but the decoder has {positions}: shorten the prompt or lower "
                             "--max-length")
        static = self.static_batch
        batch = static or batch
        results = []
        for chunk, count in batches(pixel_values, batch, static=bool(static)):
            for row in self.generate(chunk, prompt_ids, settings)[:count]:
                generated = row[len(prompt_ids):]
                results.append({"caption": self.tokenizer.decode(generated, skip_special_tokens=True).strip(),
                                "ids": row.tolist()})
        return results


def check_caption_settings(batch: int, num_beams: int | None = None, max_new_tokens: int | None = None,
                           min_new_tokens: int | None = None) -> None:
    """A UsageError naming the option for a batch, beam count or length out of range."""
    for name, value, least in (("--beams", num_beams, 1), ("--max-length", max_new_tokens, 1),
                               ("--min-length", min_new_tokens, 0), ("--batch", batch, 1)):
        if value is not None and value < least:
            raise UsageError(f"{name} must be at least {least}, not {value}")
    if max_new_tokens is not None and min_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise UsageError(f"--min-length {min_new_tokens} is above --max-length {max_new_tokens}")


def settings_from_config(config: dict) -> GenerationSettings:
    """Search settings from a generation_config.json (transformers' keys)."""
    return GenerationSettings(
        eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"],
        max_new_tokens=config.get("max_new_tokens") or 20, min_new_tokens=config.get("min_new_tokens") or 0,
        num_beams=config.get("num_beams", 1), length_penalty=config.get("length_penalty", 1.0),
        early_stopping=config.get("early_stopping", False))


class FixedLengthRunner(Runner):
    """A generating pipeline behind the Runner interface, for bench: pixel_values -> sequences, a
    fixed number of new tokens per run (min = max, greedy), so every run does the same work."""

    def __init__(self, pipeline, tokens: int) -> None:
        self.name = pipeline.encoder.name
        self.pipeline = pipeline
        self.settings = replace(pipeline.settings, num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens)

    @property
    def input_names(self) -> list[str]:
        return self.pipeline.encoder.input_names

    @property
    def output_names(self) -> list[str]:
        return ["sequences"]

    def _probe_pipeline(self):
        """The pipeline over sessions without ONNX Runtime's memory arena."""
        pipeline, decoder = copy.copy(self.pipeline), copy.copy(self.pipeline.decoder)
        decoder.first, decoder.with_past = decoder.first.memory_probe(), decoder.with_past.memory_probe()
        pipeline.encoder, pipeline.decoder = pipeline.encoder.memory_probe(), decoder
        return pipeline

    def memory_probe(self) -> "FixedLengthRunner":
        probe = copy.copy(self)
        probe.pipeline = self._probe_pipeline()
        return probe


class CaptionRunner(FixedLengthRunner):
    """Fixed-length greedy captioning, for bench."""

    def __init__(self, pipeline: CaptionPipeline, tokens: int, prompt: str = DEFAULT_PROMPT) -> None:
        super().__init__(pipeline, tokens)
        self.prompt_ids = pipeline.prompt_ids(prompt)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sequences": self.pipeline.generate(feeds[self.input_names[0]], self.prompt_ids, self.settings)}

    def describe(self) -> dict:
        decoder = "tensorrt engines" if self.name == "trt" else "onnxruntime"
        return {**self.pipeline.encoder.describe(), "decoder": f"{decoder}, with past key/values",
                "caption_tokens": self.settings.max_new_tokens}
