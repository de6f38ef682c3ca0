"""PyTorch eager latency of merged vs unmerged encoders, interleaved (A B A B …), medians.

    python benchmarks/torch_cpu.py --model vit-b16 --r 0,8,16 --batch 4 --rounds 7

Random weights (speed does not depend on them when r is fixed). Prints a Markdown table row per r
with the median latency, the measured speedup vs r=0, the plan's FLOPs bound and their ratio.
"""

import argparse
import platform
import statistics
import time

import torch

from exporters.build import build_merged_model, build_plan


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rs = [int(v) for v in args.r.split(",")]
    if rs[0] != 0:
        rs.insert(0, 0)
    runs = {}
    for r in rs:
        built = build_plan(args.model, r=r)
        model, _ = build_merged_model(built, random_weights=True)
        runs[r] = (encoder(model), built.plan)
    size = built.source.adapter.image_size(built.source.config)
    x = torch.randn(args.batch, 3, size, size)
    times: dict[int, list[float]] = {r: [] for r in rs}
    with torch.inference_mode():
        for model, _ in runs.values():
            model(pixel_values=x)  # warm-up
        for _ in range(args.rounds):
            for r in rs:
                start = time.perf_counter()
                runs[r][0](pixel_values=x)
                times[r].append(time.perf_counter() - start)

    base = statistics.median(times[0])
    print(f"# {args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| r | final tokens | median latency (ms) | speedup | FLOPs bound | efficiency |")
    print("|---|---|---|---|---|---|")
    for r in rs:
        median = statistics.median(times[r])
        plan = runs[r][1]
        speedup = base / median
        print(f"| {r} | {plan.final_tokens} | {median * 1e3:.0f} | {speedup:.2f}x | {plan.speedup_bound:.2f}x | "
              f"{speedup / plan.speedup_bound:.2f} |")


if __name__ == "__main__":
    main()
