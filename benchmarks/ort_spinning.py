"""What ONNX Runtime's thread spinning does to interleaved timing of two sessions.

    python benchmarks/ort_spinning.py BASELINE.onnx MERGED.onnx [--size 224] [--rounds 15]

Each mode builds one session per model and times them in turn (A B A B …), as `turbo bench`
does: `spin` is ONNX Runtime's default (worker threads keep spinning after a run), `stop` sets
`session.force_spinning_stop` (what turbo's runner sets), `nospin` turns spinning off. Modes are
repeated in turn so machine drift hits all of them. Prints medians and the speedup per mode.
"""

import argparse
import time

import numpy as np
import onnxruntime as ort

MODES = ("spin", "stop", "nospin")


def session(path: str, mode: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if mode == "stop":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if mode == "nospin":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline")
    parser.add_argument("merged")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)}
    sessions = {mode: (session(args.baseline, mode, args.threads), session(args.merged, mode, args.threads))
                for mode in MODES}

    def seconds(s: ort.InferenceSession) -> float:
        begin = time.perf_counter()
        s.run(None, feeds)
        return time.perf_counter() - begin

    print("| mode | baseline ms | merged ms | speedup |\n|---|---|---|---|")
    for _ in range(args.repeats):
        for mode in MODES:
            baseline, merged = sessions[mode]
            for _ in range(3):
                seconds(baseline), seconds(merged)
            times = np.array([(seconds(baseline), seconds(merged)) for _ in range(args.rounds)]) * 1e3
            a, b = np.median(times, axis=0)
            print(f"| {mode} | {a:.1f} | {b:.1f} | {a / b:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
