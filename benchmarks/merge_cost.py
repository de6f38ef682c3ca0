"""The merge's own cost per layer, as a share of that layer's time, on ONNX Runtime and PyTorch.

    python benchmarks/merge_cost.py --model vit-b16 --r 16 --batch 1,8
    python benchmarks/merge_cost.py --model blip-caption --r 30 --batch 1,8

ONNX Runtime: node times from its profiler, attributed to layers and to the TokenMerge module
through the exporter's scope metadata (read from a `--merge-op inline` export: ONNX Runtime renames
the nodes of TurboMerge functions it inlines; both forms are bit-identical and equally fast).
PyTorch (CPU, synchronous): forward hooks timing every block and its TokenMerge. Random weights;
prints one Markdown row per layer and a total.
"""

import argparse
import ast
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporters.build import build_merged_model, build_plan
from exporters.export import ExportOptions, run_export
from exporters.onnx_export import ExportModule

LAYER = re.compile(r"\.layers\.(\d+)$")


def node_scopes(path: Path) -> dict[str, tuple[int | None, bool]]:
    """node name -> (layer index or None, inside TokenMerge)."""
    scopes = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        names = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        layer = next((int(m.group(1)) for s in names if (m := LAYER.search(s))), None)
        scopes[node.name] = (layer, any(s.endswith("turbo_merge") for s in names))
    return scopes


def ort_costs(path: Path, batch: int, size: int, runs: int, threads: int) -> dict[int, list[float]]:
    scopes = node_scopes(path)
    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, threads
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)
    session.run(None, {"pixel_values": x})
    costs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # layer -> [layer µs, merge µs]
    for _ in range(runs):
        session.run(None, {"pixel_values": x})
    events = json.load(open(session.end_profiling()))
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            layer, merge = scopes.get(event["name"][: -len("_kernel_time")], (None, False))
            if layer is not None:
                costs[layer][0] += event["dur"] / (runs + 1)
                costs[layer][1] += event["dur"] / (runs + 1) if merge else 0.0
    return costs


def torch_costs(model_name: str, r: int, batch: int, runs: int) -> dict[int, list[float]]:
    built = build_plan(model_name, r=r)
    model, _ = build_merged_model(built, random_weights=True)
    layers = built.source.adapter.encoder_layers(model)
    costs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    begun: dict[object, float] = {}

    def hooks(module, index, slot):
        module.register_forward_pre_hook(lambda *_: begun.__setitem__(module, time.perf_counter()))
        module.register_forward_hook(lambda *_: costs[index].__setitem__(
            slot, costs[index][slot] + (time.perf_counter() - begun[module]) * 1e6 / runs))

    for index, layer in enumerate(layers):
        hooks(layer, index, 0)
        hooks(layer.turbo_merge, index, 1)
    module = ExportModule(model, built)
    x = torch.randn(batch, 3, built.image_size, built.image_size)
    with torch.inference_mode():
        module(x)
        costs.clear()
        for _ in range(runs):
            module(x)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", default="/tmp/turbo-merge-cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.work_dir) / f"{args.model}-r{args.r}"
    options = ExportOptions(model=args.model, r=args.r, random_weights=True, merge_op="inline")
    result = run_export(options, out, force=True)
    size = result.manifest["onnx"]["image_size"]
    for batch in (int(b) for b in args.batch.split(",")):
        for runtime, costs in (("ort", ort_costs(out / "model.onnx", batch, size, args.runs, args.threads)),
                               ("torch", torch_costs(args.model, args.r, batch, args.runs))):
            shares = [merge / layer for layer, merge in costs.values() if merge]
            total_layer = sum(layer for layer, _ in costs.values())
            total_merge = sum(merge for _, merge in costs.values())
            print(f"| {args.model} r={args.r} | {runtime} | {batch} | {total_merge / 1e3:.2f} of "
                  f"{total_layer / 1e3:.1f} ms | {total_merge / total_layer:.1%} | {max(shares):.1%} | "
                  f"{' '.join(f'{s:.1%}' for s in shares)} |")


if __name__ == "__main__":
    main()
