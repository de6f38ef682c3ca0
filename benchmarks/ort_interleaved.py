"""Time ONNX models on ONNX Runtime in turn (A B C A B C …) and compare each with the last one.

    python benchmarks/ort_interleaved.py MODEL.onnx [MODEL.onnx ...] REFERENCE.onnx [--batch 1] [--rounds 30]

For before/after claims on one machine: every round runs each model once, starting from a
different model each round, so drift and the VM's slow and fast phases hit all of them alike.
Prints each model's median time and its median per-round difference to the reference (the last
model) as a share of the model's own median. Sessions are set up as turbo's runner sets them.
"""

import argparse
import time

import numpy as np
import onnxruntime as ort


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sessions = [session(path, args.threads) for path in args.models]
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)}

    def ms(s: ort.InferenceSession) -> float:
        begin = time.perf_counter()
        s.run(None, feeds)
        return (time.perf_counter() - begin) * 1e3

    for s in sessions:
        ms(s)
    print("| repeat | model | median ms | minus reference |\n|---|---|---|---|")
    count = len(sessions)
    for repeat in range(args.repeats):
        times = np.zeros((args.rounds, count))
        for round_ in range(args.rounds):
            for step in range(count):
                index = (round_ + step) % count
                times[round_, index] = ms(sessions[index])
        medians = np.median(times, axis=0)
        for index, path in enumerate(args.models):
            diff = np.median(times[:, index] - times[:, -1])
            print(f"| {repeat + 1} | {path} | {medians[index]:.1f} | {diff:+.1f} ms ({diff / medians[index]:+.1%}) |",
                  flush=True)


if __name__ == "__main__":
    main()
