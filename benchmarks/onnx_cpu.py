"""Export time and ONNX Runtime CPU latency of `turbo export` outputs, merged vs r=0,
interleaved (A B A B …), medians.

    python benchmarks/onnx_cpu.py --model vit-b16 --r 0,8,16 --batch 1,8 --rounds 7
    python benchmarks/onnx_cpu.py --model blip-caption --r 0,30 --batch 1,8 --rounds 7

Exports with random weights (speed does not depend on them when r is fixed) into --work-dir,
validated as `turbo export` does. Prints one Markdown row per (batch, r): median latency,
measured speedup vs r=0, the plan's FLOPs bound, their ratio, and the export's time.
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from turbo.core.files import MODEL_FILE
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.runtimes.onnxrt import OnnxRuntimeRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", default="0,8,16")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", default="/tmp/turbo-bench")
    args = parser.parse_args()

    rs = sorted({0, *(int(v) for v in args.r.split(","))})
    exports = {}
    for r in rs:
        out = Path(args.work_dir) / f"{args.model}-r{r}"
        result = run_export(ExportOptions(model=args.model, r=r, random_weights=True), out, force=True)
        if not result.passed:
            raise SystemExit(f"{out}: validation failed; not benchmarking an unfaithful export")
        exports[r] = result.manifest
    print(f"# {args.model}, onnxruntime CPU, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| batch | r | final tokens | latency ms | speedup | FLOPs bound | efficiency | export s |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        runners = {r: OnnxRuntimeRunner(Path(args.work_dir) / f"{args.model}-r{r}" / MODEL_FILE, threads=args.threads)
                   for r in rs}
        size = exports[0]["onnx"]["image_size"]
        feeds = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)}
        times: dict[int, list[float]] = {r: [] for r in rs}
        for runner in runners.values():
            runner.run(feeds)  # warm-up
        for _ in range(args.rounds):
            for r, runner in runners.items():
                begin = time.perf_counter()
                runner.run(feeds)
                times[r].append(time.perf_counter() - begin)
        base = statistics.median(times[0])
        for r in rs:
            plan = exports[r].plan
            latency = statistics.median(times[r])
            speedup = base / latency
            export_s = exports[r].stage_seconds["export"]
            print(f"| {batch} | {r} | {plan.final_tokens} | {latency * 1e3:.1f} | {speedup:.2f}x | "
                  f"{plan.speedup_bound:.2f}x | {speedup / plan.speedup_bound:.2f} | {export_s:.0f} |")


if __name__ == "__main__":
    main()
