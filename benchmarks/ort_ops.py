"""Where an ONNX model's time goes on ONNX Runtime: kernel time per operator type (its profiler).

    python benchmarks/ort_ops.py BASELINE.onnx MERGED.onnx [--size 224] [--batch 1] [--runs 10]

One column per model: milliseconds per run summed over the nodes of each operator type, and
how many such nodes run. Operators ONNX Runtime fused (FusedMatMul, BiasGelu, ...) appear under
their fused names. Random inputs; 2 threads unless --threads.
"""

import argparse
import json
import os
import tempfile
from collections import defaultdict

import numpy as np
import onnxruntime as ort

SUFFIX = "_kernel_time"


def op_times(path: str, batch: int, size: int, runs: int, threads: int) -> tuple[dict, dict]:
    """(op type -> ms per run, op type -> nodes per run)."""
    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, threads
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    for _ in range(runs):
        session.run(None, feeds)
    with open(session.end_profiling()) as profile:
        events = json.load(profile)
    ms, count = defaultdict(float), defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith(SUFFIX):
            op = event["args"]["op_name"]
            ms[op] += event["dur"] / 1e3 / runs
            count[op] += 1
    return ms, {op: n // runs for op, n in count.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    results = [op_times(m, args.batch, args.size, args.runs, args.threads) for m in args.models]
    ops = sorted({op for ms, _ in results for op in ms}, key=lambda op: -max(ms.get(op, 0.0) for ms, _ in results))
    print("| op | " + " | ".join(f"model {i + 1} ms (nodes)" for i in range(len(results))) + " |")
    print("|---|" + "---|" * len(results))
    for op in ops[:args.top]:
        print(f"| {op} | " + " | ".join(f"{ms.get(op, 0.0):.2f} ({n.get(op, 0)})" for ms, n in results) + " |")
    print("| total | " + " | ".join(f"{sum(ms.values()):.1f}" for ms, _ in results) + " |")


if __name__ == "__main__":
    main()
