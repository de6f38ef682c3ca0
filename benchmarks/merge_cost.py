"""The merge's own cost per layer, as a share of that layer's time, on ONNX Runtime and PyTorch.

    python benchmarks/merge_cost.py --model vit-b16 --r 16 --batch 1,8
    python benchmarks/merge_cost.py --model blip-caption --r 30 --batch 1,8

ONNX Runtime: node times from its profiler, attributed to layers and to the TokenMerge module
through the exporter's scope metadata (read from a `--merge-op inline` export: ONNX Runtime renames
the nodes of TurboMerge functions it inlines; both forms are bit-identical and equally fast).
PyTorch (CPU, synchronous): forward hooks timing every block and its TokenMerge, the Turbo step
run as PyTorch ops (the fused CPU step: layer_merge_cost.py, torch_cpu.py --merge). Random weights.

Profilers add their own cost to every node and miss work outside the TokenMerge scope (the CLS
attention row it needs). So each runtime is also timed against a merge-free twin: the same plan
with every TokenMerge replaced by keeping the first N - r tokens (same token counts, no scoring,
no CLS row), the two run in turn; overhead = median per-round difference / merged model's time.
Prints one Markdown row per runtime and batch.
"""

import argparse
import ast
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import torch

from turbo.export.onnx_export import ExportModule
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.merging.module import TokenMerge
from turbo.models.build import build_merged_model, build_plan
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

LAYER = re.compile(r"\.layers\.(\d+)$")


class MergeFree(TokenMerge):
    """Keeps the first N - r tokens: the merge's token counts without any of its work."""

    needs_cls_attention = False

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, keys: torch.Tensor,
                cls_attn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if size is None:
            size = x[..., :1] * 0 + 1
        kept = x.shape[1] - self.r
        return x[:, :kept], size[:, :kept]


def merge_free() -> mock._patch:
    """While active, patched models get MergeFree blocks in place of TokenMerge."""
    return mock.patch("turbo.models.patch.TokenMerge", MergeFree)


def overhead(merged: Callable[[], None], free: Callable[[], None], rounds: int) -> tuple[float, float, float]:
    """(merged ms, merge-free ms, overhead share): the two run in turn, medians over rounds."""
    def ms(run: Callable[[], None]) -> float:
        begin = time.perf_counter()
        run()
        return (time.perf_counter() - begin) * 1e3

    merged(), free()
    times = np.array([(ms(merged), ms(free)) for _ in range(rounds)])
    diff = np.median(times[:, 0] - times[:, 1])
    return float(np.median(times[:, 0])), float(np.median(times[:, 1])), float(diff / np.median(times[:, 0]))


def node_scopes(path: Path) -> dict[str, tuple[int | None, bool]]:
    """node name -> (layer index or None, inside TokenMerge)."""
    scopes = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        names = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        layer = next((int(m.group(1)) for s in names if (m := LAYER.search(s))), None)
        scopes[node.name] = (layer, any(s.endswith("turbo_merge") for s in names))
    return scopes


def profiled_session(path: Path, threads: int) -> ort.InferenceSession:
    """A session with ONNX Runtime's profiler on, set up otherwise as turbo's runner."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_costs(path: Path, x: np.ndarray, runs: int, threads: int) -> dict[int, list[float]]:
    scopes = node_scopes(path)
    profiled = profiled_session(path, threads)
    profiled.run(None, {"pixel_values": x})
    costs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # layer -> [layer µs, merge µs]
    for _ in range(runs):
        profiled.run(None, {"pixel_values": x})
    with open(profiled.end_profiling()) as file:
        events = json.load(file)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            layer, merge = scopes.get(event["name"][: -len("_kernel_time")], (None, False))
            if layer is not None:
                costs[layer][0] += event["dur"] / (runs + 1)
                costs[layer][1] += event["dur"] / (runs + 1) if merge else 0.0
    return costs


def torch_costs(model: torch.nn.Module, layers: torch.nn.ModuleList, x: torch.Tensor,
                runs: int) -> dict[int, list[float]]:
    costs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    begun: dict[object, float] = {}
    handles = []

    def hooks(module, index, slot):
        handles.append(module.register_forward_pre_hook(lambda *_: begun.__setitem__(module, time.perf_counter())))
        handles.append(module.register_forward_hook(lambda *_: costs[index].__setitem__(
            slot, costs[index][slot] + (time.perf_counter() - begun[module]) * 1e6 / runs)))

    for index, layer in enumerate(layers):
        hooks(layer, index, 0)
        hooks(layer.turbo_merge, index, 1)
    with torch.inference_mode():
        model(x)
        costs.clear()
        for _ in range(runs):
            model(x)
    for handle in handles:
        handle.remove()
    return costs


def export_pair(model: str, r: int, work_dir: Path) -> tuple[Path, Path, int]:
    """Inline exports of the merged model and its merge-free twin; (merged, free, image size)."""
    options = ExportOptions(model=model, r=r, random_weights=True, merge_op="inline")
    result = run_export(options, work_dir / "merged", force=True)
    with merge_free():
        run_export(options, work_dir / "merge-free", force=True)
    return work_dir / "merged" / "model.onnx", work_dir / "merge-free" / "model.onnx", \
        result.manifest.onnx.image_size


def torch_pair(model: str, r: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.ModuleList]:
    """Eager merged model, its merge-free twin (same random weights), the merged model's blocks."""
    built = build_plan(model, r=r)
    merged, _ = build_merged_model(built, random_weights=True)
    with merge_free():
        free, _ = build_merged_model(built, random_weights=True)
    return ExportModule(merged, built), ExportModule(free, built), built.source.adapter.encoder_layers(merged)


def row(label: str, costs: dict[int, list[float]], timed: tuple[float, float, float]) -> str:
    shares = [merge / layer for layer, merge in costs.values() if merge]
    total_layer = sum(layer for layer, _ in costs.values())
    total_merge = sum(merge for _, merge in costs.values())
    merged_ms, free_ms, share = timed
    return (f"| {label} | {total_merge / 1e3:.2f} of {total_layer / 1e3:.1f} ms | {total_merge / total_layer:.1%} | "
            f"{max(shares):.1%} | {' '.join(f'{s:.1%}' for s in shares)} | {merged_ms:.1f} / {free_ms:.1f} ms | "
            f"{share:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds against the merge-free twin")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", default="/tmp/turbo-merge-cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    merged_onnx, free_onnx, size = export_pair(args.model, args.r, Path(args.work_dir) / f"{args.model}-r{args.r}")
    merged_torch, free_torch, layers = torch_pair(args.model, args.r)
    runners = OnnxRuntimeRunner(merged_onnx, threads=args.threads), OnnxRuntimeRunner(free_onnx, threads=args.threads)
    print("| model | runtime | batch | profiled merge of layers | share | worst layer | per layer "
          "| merged / merge-free | overhead |\n|---|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        x = torch.randn(batch, 3, size, size)
        feeds = {"pixel_values": x.numpy()}
        label = f"{args.model} r={args.r}"
        ort_timed = overhead(*(lambda runner=runner: runner.run(feeds) for runner in runners), args.rounds)
        print(row(f"{label} | ort | {batch}", ort_costs(merged_onnx, x.numpy(), args.runs, args.threads), ort_timed),
              flush=True)
        with torch.inference_mode():
            torch_timed = overhead(*(lambda m=m: m(x) for m in (merged_torch, free_torch)), args.rounds)
        print(row(f"{label} | torch | {batch}", torch_costs(merged_torch, layers, x, args.runs), torch_timed),
              flush=True)


if __name__ == "__main__":
    main()
