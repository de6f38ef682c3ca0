"""Time ONNX models on ONNX Runtime in turn (A B C A B C …) and compare each with the last one.

    python benchmarks/ort_interleaved.py MODEL.onnx [MODEL.onnx ...] REFERENCE.onnx [--batch 1] [--rounds 30]
    python benchmarks/ort_interleaved.py MODEL.onnx@fused MODEL.onnx@graph   # the TurboMerge kernels

For before/after claims on one machine: every round runs each model once, starting from a
different model each round, so drift and the VM's slow and fast phases hit all of them alike.
Prints each model's median time and its median per-round difference to the reference (the last
model) as a share of the model's own median. The models run in turbo's OnnxRuntimeRunner; a
model given as PATH@KERNEL runs its TurboMerge nodes that way (fused, graph or auto, the default).
"""

import argparse
import time

import numpy as np

from turbo.runtimes.onnxrt import OnnxRuntimeRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runners = [OnnxRuntimeRunner(path, threads=args.threads, merge_kernel=kernel or "auto")
               for path, _, kernel in (model.partition("@") for model in args.models)]
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)}

    def ms(runner: OnnxRuntimeRunner) -> float:
        begin = time.perf_counter()
        runner.run(feeds)
        return (time.perf_counter() - begin) * 1e3

    for runner in runners:
        ms(runner)
    print("| repeat | model | median ms | minus reference |\n|---|---|---|---|")
    count = len(runners)
    for repeat in range(args.repeats):
        times = np.zeros((args.rounds, count))
        for round_ in range(args.rounds):
            for step in range(count):
                index = (round_ + step) % count
                times[round_, index] = ms(runners[index])
        medians = np.median(times, axis=0)
        for index, path in enumerate(args.models):
            diff = np.median(times[:, index] - times[:, -1])
            print(f"| {repeat + 1} | {path} | {medians[index]:.1f} | {diff:+.1f} ms ({diff / medians[index]:+.1%}) |",
                  flush=True)


if __name__ == "__main__":
    main()
