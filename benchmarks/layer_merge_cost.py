"""The merge's own cost in each layer, measured on that layer alone against a merge-free twin.

    python benchmarks/layer_merge_cost.py --model vit-b16 --r 16 --batch 1
    python benchmarks/layer_merge_cost.py --model vit-b16 --r 16 --batch 64 --device cuda --dtype fp16

Each merging block is exported on its own (hidden states and token sizes in, merged hidden
states and sizes out; a dynamic batch axis and a TurboMerge function node, as `turbo export`
writes), with the token count and inputs it sees inside the whole model: once with its TokenMerge
and once with a merge-free twin that keeps the first N - r tokens (no scoring, no CLS attention
row, no merge). The two run in turn on ONNX Runtime (the TurboMerge node as its ONNX function,
then as the fused C kernel) and in PyTorch eager (the Turbo step as PyTorch ops, then fused:
the C step on the CPU in float32, the Triton step on CUDA); overhead = median per-round
difference / the merged layer's time. Unlike a profiler this measures the layer's real time and
all the work the merge causes. Random weights. With --device cuda only PyTorch is timed
(synchronising after each call, so launch costs count), in --dtype.
"""

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
from merge_cost import MergeFree, overhead
from torch import nn

from turbo.export.onnx_export import ExportModule, fold_merge_ops, run_exporter
from turbo.kernels.torch_merge_kernel import install_merge_kernel
from turbo.models.adapters import FamilyAdapter
from turbo.models.build import build_merged_model, build_plan
from turbo.models.patch import TurboState, turbo_block
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LayerStep(nn.Module):
    """One patched block: (hidden (B, N, C), size (B, N, 1) or absent) -> (B, N - r, C), (B, N - r, 1)."""

    def __init__(self, layer: nn.Module, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.layer, self.adapter = layer, adapter

    def forward(self, hidden: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        state = TurboState(size=size)
        hidden = turbo_block(self.layer, self.adapter, hidden, state)
        return hidden, state.size


def layer_inputs(model: ExportModule, layers: nn.ModuleList, pixels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each block's hidden states and token sizes (absent before any merge) in one forward."""
    inputs: list[tuple[torch.Tensor, ...]] = []
    def record(module: nn.Module, args: tuple) -> None:  # block 0 resets the state after this hook runs
        size = None if module.turbo_index == 0 else module.turbo_state.size
        inputs.append((args[0],) if size is None else (args[0], size))

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    with torch.inference_mode():
        model(pixels)
    for handle in handles:
        handle.remove()
    return [tuple(t.clone() for t in step) for step in inputs]


def export_step(step: LayerStep, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    """With a dynamic batch axis and the weighted merge folded into a TurboMerge node, as `turbo
    export` writes by default (traced at batch 2: a batch-1 example would be specialised)."""
    names = ["hidden", "size"][: len(args)]
    batch = torch.export.Dim("batch")
    example = tuple(t[:1].expand(2, *t.shape[1:]).contiguous() for t in args)
    dynamic = tuple({0: batch} for _ in args)
    run_exporter(step, example, names, ["merged", "merged_size"], dynamic, opset=20).save(str(path))
    fold_merge_ops(path, step.layer.turbo_merge.kernel)
    return path


def report_layer(layer: nn.Module, inputs: tuple[torch.Tensor, ...], adapter: FamilyAdapter, prefix: Path,
                 rounds: int, device: torch.device, dtype: torch.dtype) -> None:
    """Print the layer's row: merged vs merge-free on ONNX Runtime (CPU only) and in PyTorch eager."""
    merge = layer.turbo_merge
    if merge.r == 0:
        return
    twin = copy.deepcopy(layer)
    twin.turbo_merge = MergeFree(merge.r, merge.config)
    steps = LayerStep(layer, adapter), LayerStep(twin, adapter)
    ort_cells = "— | — | — | —"
    if device.type == "cpu":
        merged, free = (export_step(step, inputs, prefix.with_name(f"{prefix.name}-{kind}.onnx"))
                        for step, kind in zip(steps, ("merged", "free")))
        free_runner = OnnxRuntimeRunner(free, threads=torch.get_num_threads())
        feeds = dict(zip(free_runner.input_names, (t.numpy() for t in inputs)))
        cells = []
        for kernel in ("graph", "fused"):
            runner = OnnxRuntimeRunner(merged, threads=torch.get_num_threads(), merge_kernel=kernel)
            ort_ms = overhead(lambda: runner.run(feeds), lambda: free_runner.run(feeds), rounds)
            cells.append(f"{ort_ms[0]:.2f} / {ort_ms[1]:.2f} ms | {ort_ms[2]:.1%}")
        ort_cells = " | ".join(cells)
    merged, free = (step.to(device, dtype) for step in steps)
    args = tuple(t.to(device, dtype) for t in inputs)

    def run(step: LayerStep) -> None:
        step(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch_cells = []
    for kernel in ("ops", "fused"):
        if kernel == "fused" and device.type == "cpu" and dtype != torch.float32:
            torch_cells.append("— | —")
            continue
        install_merge_kernel(merged, kernel, device, dtype)
        with torch.inference_mode():
            torch_ms = overhead(lambda: run(merged), lambda: run(free), rounds)
        torch_cells.append(f"{torch_ms[0]:.2f} / {torch_ms[1]:.2f} ms | {torch_ms[2]:.1%}")
    tokens = inputs[0].shape[1]
    print(f"| {layer.turbo_index} | {tokens} → {tokens - merge.r} | {ort_cells} | {' | '.join(torch_cells)} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per layer and runtime")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--layers", default="all", help="comma-separated block indices, or all")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = build_plan(args.model, r=args.r)
    model, _ = build_merged_model(built, random_weights=True)
    adapter = built.source.adapter
    layers = adapter.encoder_layers(model)
    pixels = torch.randn(args.batch, *built.pixel_shape)
    inputs = layer_inputs(ExportModule(model, built), layers, pixels)
    chosen = range(len(layers)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"{args.model} r={args.r} batch {args.batch}, {args.threads} threads, PyTorch on {device} in {args.dtype}\n\n"
          "| layer | tokens | ORT graph merged / merge-free | overhead | ORT fused merged / merge-free | overhead "
          "| torch ops merged / merge-free | overhead | torch fused merged / merge-free | overhead |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="turbo-layer-merge-") as work_dir:
        for index in chosen:
            report_layer(layers[index], inputs[index], adapter, Path(work_dir) / str(index), args.rounds, device, dtype)


if __name__ == "__main__":
    main()
