"""The TurboMerge Triton kernel against the torch merge (matmul and scatter forms) on CUDA.

    python benchmarks/merge_kernel.py                     # ViT-B/16 r=16 and BLIP-base r=30 shapes
    python benchmarks/merge_kernel.py --batch 1,64 --dtype fp16

Checks the kernel equals the torch merge first, then times each form with CUDA events
(warm-up, interleaved repetitions, medians). Prints one Markdown row per shape. Needs a GPU.
"""

import argparse
import statistics

import torch

from turbo.kernels.triton_merge import turbo_merge
from turbo.merging.matching import MergeConfig, information_degree, select_merges
from turbo.merging.merge import merge_tokens, pack_indices

SHAPES = {"vit-b16 r16 (layer 1)": (197, 768, 16), "blip-base r30 (layer 1)": (577, 768, 30)}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,64")
    parser.add_argument("--dtype", default="fp16", choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    print("| shape | batch | triton ms | torch matmul ms | torch scatter ms | matmul / triton |")
    print("|---|---|---|---|---|---|")
    for label, (tokens, channels, r) in SHAPES.items():
        for batch in map(int, args.batch.split(",")):
            x = torch.randn(batch, tokens, channels, device="cuda", dtype=dtype)
            size = torch.ones(batch, tokens, 1, device="cuda", dtype=dtype)
            degree, best = information_degree(torch.randn(batch, tokens, 64, device="cuda"),
                                              torch.rand(batch, tokens, device="cuda"), MergeConfig())
            index = pack_indices(*select_merges(degree, best, r))
            want = merge_tokens(x, size, index)
            got = turbo_merge(x, size, index, r)
            assert torch.equal(got[1], want[1]), "merged sizes differ"
            torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)
            forms = {"triton": lambda: turbo_merge(x, size, index, r),
                     "matmul": lambda: merge_tokens(x, size, index, "matmul"),
                     "scatter": lambda: merge_tokens(x, size, index, "scatter")}
            for fn in forms.values():
                cuda_ms(fn, 20)
            samples = {name: [] for name in forms}
            for _ in range(5):  # interleaved rounds
                for name, fn in forms.items():
                    samples[name] += cuda_ms(fn, args.repeats // 5)
            med = {name: statistics.median(values) for name, values in samples.items()}
            print(f"| {label} | {batch} | {med['triton']:.4f} | {med['matmul']:.4f} | {med['scatter']:.4f} | "
                  f"{med['matmul'] / med['triton']:.2f}× |")


if __name__ == "__main__":
    main()
