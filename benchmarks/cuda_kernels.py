"""PyTorch on CUDA: each model and r timed eagerly and as a replayed CUDA graph (the forward
`turbo bench --runtime torch --device cuda` times), and the GPU kernels that take the time.

    python benchmarks/cuda_kernels.py --model vit-b16,clip-vit-b16 --r 0,16 --batch 64

Prints, per model, r and form, the median ms over --iters consecutive runs and the --top
kernels by total GPU time over three profiled runs (torch.profiler, CUDA activity).
"""

import argparse
import statistics

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from turbo.export.onnx_export import ExportModule
from turbo.models.build import build_merged_model, build_plan
from turbo.runtimes.pytorch import TorchRunner

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def report(model_name: str, r: int, batch: int, dtype: torch.dtype, cuda_graph: bool, iters: int, top: int) -> None:
    built = build_plan(model_name, r=r)
    model, _ = build_merged_model(built, random_weights=True)
    module = ExportModule(model, built)
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((batch, *built.pixel_shape), np.float32)}
    runner = TorchRunner(module, ["pixel_values"], module.output_names(), "cuda", dtype, cuda_graph=cuda_graph)
    timed = runner.timer(feeds)
    for _ in range(5):
        timed()
    median = statistics.median(timed() for _ in range(iters)) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            timed()
    form = "graph" if cuda_graph else "eager"
    print(f"\n## {model_name} r={r} batch {batch} {form}: median {median:.2f} ms ({runner.merge_kernel} merge)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16,clip-vit-b16")
    parser.add_argument("--r", default="0,16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn sdp "
          f"{torch.backends.cuda.cudnn_sdp_enabled()}, flash sdp {torch.backends.cuda.flash_sdp_enabled()}")
    for model_name in args.model.split(","):
        for r in (int(v) for v in args.r.split(",")):
            for cuda_graph in (False, True):
                report(model_name, r, args.batch, DTYPES[args.dtype], cuda_graph, args.iters, args.top)


if __name__ == "__main__":
    main()
