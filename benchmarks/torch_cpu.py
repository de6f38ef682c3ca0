"""PyTorch eager latency of merged vs unmerged encoders, interleaved (A B A B …), medians.

    python benchmarks/torch_cpu.py --model vit-b16 --r 0,8,16 --batch 4 --rounds 7
    python benchmarks/torch_cpu.py --model vit-b16 --r 16 --batch 1 --merge ops,fused --rounds 30

Random weights (speed does not depend on them when r is fixed). Prints a Markdown table row per r
(and per --merge form of the Turbo step: PyTorch ops, or the fused CPU step of
turbo/kernels/torch_merge_kernel.py) with the median latency, the measured speedup vs r=0, the plan's
FLOPs bound and their ratio; every variant runs in the same interleaved rounds.
"""

import argparse
import platform
import statistics
import time

import torch

from turbo.kernels.torch_merge_kernel import install_merge_kernel
from turbo.models.build import build_merged_model, build_plan


def encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The part that merges: BLIP's vision model, or the ViT classifier as a whole."""
    return model.vision_model if hasattr(model, "vision_model") else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", default="0,8,16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--merge", default="ops", help="comma-separated forms of the Turbo step: ops, fused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rs = [int(v) for v in args.r.split(",")]
    if rs[0] != 0:
        rs.insert(0, 0)
    runs = {}
    for r in rs:
        built = build_plan(args.model, r=r)
        for kernel in args.merge.split(",") if r else ["ops"]:
            model, _ = build_merged_model(built, random_weights=True)
            install_merge_kernel(model, kernel, torch.device("cpu"), torch.float32)
            runs[r, kernel] = (encoder(model), built.plan)
    size = built.source.adapter.image_size(built.source.config)
    x = torch.randn(args.batch, 3, size, size)
    times: dict[tuple[int, str], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        for model, _ in runs.values():
            model(pixel_values=x)  # warm-up
        for _ in range(args.rounds):
            for key, (model, _) in runs.items():
                start = time.perf_counter()
                model(pixel_values=x)
                times[key].append(time.perf_counter() - start)

    base = statistics.median(times[0, "ops"])
    print(f"# {args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| r | Turbo step | final tokens | median latency (ms) | speedup | FLOPs bound | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for (r, kernel), (_, plan) in runs.items():
        median = statistics.median(times[r, kernel])
        speedup = base / median
        print(f"| {r} | {kernel if r else '—'} | {plan.final_tokens} | {median * 1e3:.0f} | {speedup:.2f}x | "
              f"{plan.speedup_bound:.2f}x | {speedup / plan.speedup_bound:.2f} |")


if __name__ == "__main__":
    main()
