"""`turbo bench` of LLM-based VLM exports on ONNX Runtime: the time to the first token (image
encoding and prefill) and the decode speed, each export against the unmerged, unreduced one built
alike, interleaved; peak memory of a first-token run; the FLOPs bounds of both."""

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from turbo.core.errors import TurboError, UsageError
from turbo.core.manifest import Manifest
from turbo.export.options import ExportOptions
from turbo.export.validate import seeded_pixels
from turbo.merging.llm_drop import parse_llm_drop
from turbo.models.llm_plan import DEFAULT_TEXT_TOKENS, LlmPlan, llm_plan
from turbo.runtimes.base import Runner
from turbo.runtimes.llm_onnx import OnnxVlm
from turbo.tools.timing import TimingStats, interleaved

Progress = Callable[[str], None]
PREFIX_TOKENS = 8  # of the prompt's text tokens, before the image (a template; none where the image goes first)


class FirstTokenRunner(Runner):
    """Image features and the prefill: the time to the first token (a Runner, for peak memory)."""

    name = "ort"

    def __init__(self, vlm: OnnxVlm, prefix: list[int], suffix: list[int]) -> None:
        self.vlm, self.prefix, self.suffix = vlm, prefix, suffix
        self._inputs, self._outputs = ["pixel_values"], ["logits"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = self.vlm.image_features(feeds["pixel_values"])
        return {"logits": next(self.vlm.stream(image, self.prefix, self.suffix, 1))}

    def memory_probe(self) -> "FirstTokenRunner":
        return FirstTokenRunner(self.vlm.without_memory_arena(), self.prefix, self.suffix)

    def describe(self) -> dict:
        return {**self.vlm.vision.describe(), "language_model": "onnxruntime, prefill and decode with past"}


def _decode_timer(vlm: OnnxVlm, pixels: np.ndarray, prefix: list[int], suffix: list[int],
                  tokens: int) -> Callable[[], float]:
    """Seconds of `tokens` decode steps after an untimed prefill (no end-of-text stop)."""
    image = vlm.image_features(pixels)

    def timed() -> float:
        steps = vlm.stream(image, prefix, suffix, tokens + 1)
        next(steps)  # the prefill's logits
        begin = time.perf_counter()
        for _ in steps:
            pass
        return time.perf_counter() - begin

    return timed


def _label(manifest: Manifest) -> str:
    quant = f" {manifest.quantization.mode}" if manifest.quantization else ""
    return f"r={manifest.turbo.r_requested if manifest.plan.merges else 0} {manifest.llm.llm_drop}{quant}"


def _plan(manifest: Manifest) -> LlmPlan:
    built = ExportOptions.from_manifest(manifest).plan()
    return llm_plan(built, parse_llm_drop(manifest.llm.llm_drop), DEFAULT_TEXT_TOKENS)


def generation_exports(exports: list[tuple[Path, Manifest]], baseline: tuple[Path, Manifest] | None,
                       cached_export: Callable[[ExportOptions], Path],
                       open_export: Callable[[Path], Manifest]) -> list[tuple[Path, Manifest]]:
    """The exports to time, the unreduced baseline first: --baseline, one of them, or an export
    built alike without merge or reduction."""
    def unreduced(manifest: Manifest) -> bool:
        return not manifest.plan.merges and manifest.llm.llm_drop == "none"

    missing = [str(directory) for directory, manifest in exports if manifest.llm is None]
    if missing:
        raise UsageError(f"{missing[0]} has no language model graphs; bench LLaVA exports made with them together")
    if baseline is not None:
        if baseline[1].llm is None or not unreduced(baseline[1]):
            raise UsageError(f"--baseline {baseline[0]} must be an export with its language model, r=0 and "
                             "--llm-drop none")
        chosen = [baseline, *exports]
    elif any(unreduced(manifest) for _, manifest in exports):
        chosen = sorted(exports, key=lambda item: not unreduced(item[1]))
    else:
        options = replace(ExportOptions.from_manifest(exports[0][1]), r=0, schedule="constant", llm_drop="none")
        directory = cached_export(options)
        chosen = [(directory, open_export(directory)), *exports]
    labels = [_label(manifest) for _, manifest in chosen]
    if len(set(labels)) < len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise UsageError(f"two exports with {repeated}; bench them in separate runs")
    return chosen


def time_generation(exports: list[tuple[Path, Manifest]], tokens: int, warmup_s: float, iters: int | None,
                    duration_s: float | None, threads: int | None, seed: int, memory: Callable[[Runner, dict], dict],
                    progress: Progress) -> list[dict]:
    """Rows for the first token and the decode steps of every export, the first one the baseline."""
    if tokens < 2:
        raise UsageError(f"--caption-tokens must be at least 2 for decode timing, not {tokens}")
    pixel_shape = exports[0][1].onnx.pixel_shape
    pixels = seeded_pixels(1, pixel_shape, seed)
    rng = np.random.default_rng(seed)
    record = exports[0][1].llm
    vocab = [token for token in range(min(record.vocab_size, 1000)) if token != record.image_token_id]
    text = list(map(int, rng.choice(vocab, DEFAULT_TEXT_TOKENS)))
    before = 0 if record.image_first else PREFIX_TOKENS
    prefix, suffix = text[:before], text[before:]
    if any(m.onnx.pixel_shape != pixel_shape or m.llm.vocab_size != record.vocab_size for _, m in exports):
        raise UsageError("the directories hold different models or inputs; bench one model at a time")
    vlms = {_label(m): OnnxVlm.from_files(d, m.onnx.file, m.llm, m.onnx.static_batch, threads) for d, m in exports}
    plans = {_label(m): (_plan(m), m) for _, m in exports}
    progress(f"timing the first token: {', '.join(vlms)}")
    feeds = {"pixel_values": pixels}
    first = {label: FirstTokenRunner(vlm, prefix, suffix) for label, vlm in vlms.items()}
    first_samples = interleaved({label: runner.timer(feeds) for label, runner in first.items()}, warmup_s, iters,
                                duration_s)
    read = {label: runner.vlm.image_per_layer for label, runner in first.items()}  # as the timed runs read
    progress(f"timing {tokens} decode steps: {', '.join(vlms)}")
    decode_samples = interleaved({label: _decode_timer(vlm, pixels, prefix, suffix, tokens)
                                  for label, vlm in vlms.items()}, warmup_s, iters, duration_s)
    cached = {label: vlm.image_cached for label, vlm in vlms.items()}  # at the last timed step
    rows = []
    base_label = next(iter(vlms))
    base_plan, base_manifest = plans[base_label]
    for workload, samples in (("first_token", first_samples), ("decode", decode_samples)):
        base = TimingStats.from_samples(samples[base_label], 1).median_ms
        for label, values in samples.items():
            plan, manifest = plans[label]
            stats = TimingStats.from_samples(values, 1)
            # the image tokens the timed runs read (first token) or cached (decode): DyRate and MustDrop
            # decide theirs per run, the others hold the plan's
            images = read[label] if workload == "first_token" else cached[label]
            plan = replace(plan, image_per_layer=tuple(images))
            if workload == "first_token":
                flops = manifest.plan.flops + plan.prefill_flops
                bound = (base_manifest.plan.flops + base_plan.baseline_prefill_flops) / flops
                used = memory(first[label], feeds)
            else:
                bound = plan.baseline_decode_flops / plan.decode_flops
                used = {"kind": "not measured", "peak_mb": None}
            speedup = base / stats.median_ms
            rows.append({
                "runtime": "ort", "workload": workload, "device": "cpu", "precision": manifest.onnx.precision,
                "batch": 1, "r": manifest.turbo.r_requested if manifest.plan.merges else 0,
                "final_tokens": manifest.plan.final_tokens, "llm_drop": manifest.llm.llm_drop,
                "quant": manifest.quantization.mode if manifest.quantization else None,
                "image_tokens": images, "latency": stats.to_dict(), "noisy": stats.noisy,
                "speedup": speedup, "flops_bound": bound, "efficiency": speedup / bound, "memory": used,
                "runner": first[label].describe(),
                **({"tokens_per_s": tokens / (stats.median_ms / 1000)} if workload == "decode" else {}),
            })
    return rows


def check_not_failed(exports: list[tuple[Path, Manifest]]) -> None:
    for directory, manifest in exports:
        if manifest.failed:
            raise TurboError(f"{directory} failed validation at export; not benchmarking an unfaithful export")
