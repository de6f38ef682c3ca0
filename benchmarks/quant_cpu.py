"""Merging and quantization stacked: ONNX Runtime CPU latency and file size of vit-b16 at
r=0 and r=16, fp32, int8 (QDQ) and gptq-int4, all exported by `turbo export`.

    python benchmarks/quant_cpu.py --r 0,16 --modes fp32,int8,gptq-int4 --batch 1,8 --rounds 10

Random weights and `--calib synthetic` (speed depends on neither); every model is timed
round-robin (one run each per round) after a warm-up, medians; ORT's default kernels (INT4
DequantizeLinear+MatMul fuse to MatMulNBits).
"""

import argparse
import os
import statistics
import time
from pathlib import Path

from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.export.validate import seeded_pixels
from turbo.runtimes.onnxrt import OnnxRuntimeRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", default="0,16")
    parser.add_argument("--modes", default="fp32,int8,gptq-int4")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--work-dir", default="/tmp/turbo-quant-bench")
    args = parser.parse_args()

    runners, rows = {}, {}
    for r in map(int, args.r.split(",")):
        for mode in args.modes.split(","):
            out = Path(args.work_dir) / f"{args.model}-r{r}-{mode}"
            quant = None if mode == "fp32" else mode
            begin = time.perf_counter()
            result = run_export(ExportOptions(model=args.model, r=r, random_weights=True, quant=quant,
                                              opset=21 if quant else 20, calib="synthetic" if quant else None,
                                              calib_size=args.calib_size), out, force=True)
            seconds = time.perf_counter() - begin
            if not result.passed:
                raise SystemExit(f"{out}: validation failed")
            size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
            runners[(r, mode)] = OnnxRuntimeRunner(out / "model.onnx", threads=os.cpu_count())
            rows[(r, mode)] = {"size_mb": size / 1e6, "export_s": seconds}
            print(f"exported r={r} {mode}: {size / 1e6:.0f} MB in {seconds:.0f} s", flush=True)
    pixel_shape = result.manifest.onnx.pixel_shape
    print("| batch | r | mode | file MB | median ms | vs fp32 r=0 |")
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batch.split(",")):
        feeds = {"pixel_values": seeded_pixels(batch, pixel_shape)}
        times = {key: [] for key in runners}
        for runner in runners.values():
            runner.run(feeds)
        for _ in range(args.rounds):
            for key, runner in runners.items():
                begin = time.perf_counter()
                runner.run(feeds)
                times[key].append(time.perf_counter() - begin)
        medians = {key: statistics.median(values) * 1000 for key, values in times.items()}
        base = medians.get((0, "fp32"), next(iter(medians.values())))
        for (r, mode), median in medians.items():
            print(f"| {batch} | {r} | {mode} | {rows[(r, mode)]['size_mb']:.0f} | {median:.0f} | "
                  f"{base / median:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
