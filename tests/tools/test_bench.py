"""`turbo bench`: statistics on synthetic timings, interleaving, the JSON schema, the plot, the
exported-directory mode and the unavailable-runtime paths, on tiny models with a few iterations."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from turbo.cli.app import app
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.kernels.cpu_kernels import c_compiler
from turbo.models.loading import resolve_source
from turbo.runtimes.base import Runner
from turbo.tools.bench import _peak_memory
from turbo.tools.timing import TimingStats, efficiency, interleaved

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "bench.schema.json").read_text())
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "cache"))


def model_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"tiny-{name}"
    resolve_source(name, tiny=True).config.save_pretrained(path)
    return path


def test_statistics_on_synthetic_timings():
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = TimingStats.from_samples(samples, batch=8)
    assert stats.iterations == 100 and stats.min_ms == pytest.approx(1.0)
    assert stats.median_ms == pytest.approx(50.5) and stats.mean_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.cv == pytest.approx(29.011491 / 50.5, rel=1e-6)  # sample std of 1..100
    assert stats.throughput == pytest.approx(8 * 1000 / 50.5)
    assert stats.noisy
    steady = TimingStats.from_samples([0.010, 0.0101, 0.0099], batch=1)
    assert not steady.noisy and steady.cv == pytest.approx(0.01, rel=1e-6)
    assert efficiency(1.8, 2.0) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        TimingStats.from_samples([], batch=1)


def test_interleaving_order_and_stopping():
    calls = []

    def timer(key):
        def timed():
            calls.append(key)
            return 0.001
        return timed

    samples = interleaved({"a": timer("a"), "b": timer("b")}, warmup_s=0, iters=4, duration_s=None)
    assert calls == ["a", "b"] + ["a", "b"] * 4  # one warm-up each, then A B A B …
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4}
    calls.clear()
    samples = interleaved({"a": timer("a")}, warmup_s=0, iters=None, duration_s=1e-9)
    assert len(samples["a"]) == 3  # at least three rounds even when the duration is tiny


class Allocating(Runner):
    """Allocates and touches `mb` megabytes per run."""

    def __init__(self, mb: int) -> None:
        self.mb = mb

    input_names = ["x"]
    output_names = ["y"]

    def run(self, feeds):
        block = np.ones(self.mb * 2**20 // 8)
        return {"y": np.array([block.sum()])}


def test_peak_memory_sees_what_a_run_allocates():
    big = _peak_memory(Allocating(200), {}, "cpu")
    small = _peak_memory(Allocating(1), {}, "cpu")
    assert big["kind"] == "rss_growth"
    assert big["peak_mb"] > 150 and small["peak_mb"] < 50


def checked_report(stdout: str, runtime: str, kernel: str) -> dict:
    """The --json report of a tiny BLIP bench (--r 4 --batch 1,2 --iters 3, both workloads), checked
    against the schema and row by row; `kernel` is the merge kernel every row reports."""
    report = json.loads(stdout)
    jsonschema.validate(report, SCHEMA)
    keys = {(row["runtime"], row["workload"], row["batch"], row["r"]) for row in report["results"]}
    assert keys == {(runtime, wl, b, r) for wl in ("encoder", "caption") for b in (1, 2) for r in (0, 4)}
    for row in report["results"]:
        assert row["latency"]["iterations"] == 3 and row["runner"]["merge_kernel"] == kernel
        assert row["final_tokens"] == (37 if row["r"] == 0 else 21)
        if row["r"] == 0:
            assert row["speedup"] == 1.0
        if row["workload"] == "encoder":
            assert row["efficiency"] == pytest.approx(row["speedup"] / row["flops_bound"])
        else:
            assert row["flops_bound"] is None
    return report


def test_tiny_bench_json_follows_the_schema_and_plots(tmp_path):
    """PyTorch and TensorRT (skipped here); ONNX Runtime on BLIP exports: tests/test_caption.py."""
    plot = tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", "-m", str(model_dir(tmp_path, "blip-caption")), "--r", "4", "--batch", "1,2",
                                 "--runtime", "torch,trt", "--iters", "3", "--warmup", "0", "--random-weights",
                                 "--caption-tokens", "3", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = checked_report(result.stdout, "torch", "fused" if c_compiler() else "ops")
    skipped = {(s["runtime"], s["workload"]): s["reason"] for s in report["skipped"]}
    assert "TensorRT is not installed" in skipped[("trt", "all")]
    assert set(skipped) == {("trt", "all")}
    assert "skipped trt" in result.stderr and "torch caption" in result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_of_exported_directories_builds_the_baseline(tmp_path):
    local = model_dir(tmp_path, "vit-b16")
    merged = run_export(ExportOptions(model=str(local), r=4, random_weights=True), tmp_path / "r4").directory
    result = runner.invoke(app, ["bench", str(merged), "--iters", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, SCHEMA)
    assert [(row["runtime"], row["r"], row["final_tokens"]) for row in report["results"]] == [
        ("ort", 0, 37), ("ort", 4, 21)]
    assert {row["runner"]["merge_kernel"] for row in report["results"]} == {"fused" if c_compiler() else "graph"}
    baseline = list((tmp_path / "cache" / "exports").iterdir())
    assert len(baseline) == 1 and json.loads((baseline[0] / "turbo.json").read_text())["plan"]["r"] == [0] * 4
    again = runner.invoke(app, ["bench", str(merged), "--baseline", str(baseline[0]), "--iters", "2", "--warmup", "0",
                                "--ort-merge", "graph", "--json"])
    assert again.exit_code == 0, again.output
    assert {row["runner"]["merge_kernel"] for row in json.loads(again.stdout)["results"]} == {"graph"}


def test_a_runtime_that_is_not_here_exits_4(tmp_path):
    result = runner.invoke(app, ["bench", "-m", str(model_dir(tmp_path, "vit-b16")), "--runtime", "trt",
                                 "--random-weights"])
    assert result.exit_code == 4
    assert result.output.strip().startswith("error: trt: TensorRT is not installed")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [[], ["--torch-merge", "fused", "--precision", "fp16"]])  # Triton's on CUDA
def test_cuda_without_a_gpu_exits_4(tmp_path, args):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the missing-GPU path cannot be exercised here")
    result = runner.invoke(app, ["bench", "-m", str(model_dir(tmp_path, "vit-b16")), "--runtime", "torch",
                                 "--device", "cuda", "--random-weights", *args])
    assert result.exit_code == 4 and "no CUDA device" in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--r", "x"], 2, "--r takes comma-separated non-negative integers, e.g. 0,8,16"),
        (["--batch", "0"], 2, "--batch takes comma-separated integers of at least 1, e.g. 1,8,64"),
        (["--runtime", "tvm"], 2, "unknown runtime 'tvm'"),
        (["--precision", "int8"], 2, "unknown precision 'int8'"),
        (["--device", "tpu"], 2, "unknown device 'tpu'"),
        (["--ort-merge", "fast"], 2, "unknown --ort-merge 'fast'; choose one of auto, fused, graph"),
        (["--ort-merge", "fused", "--device", "cuda"], 2, "--ort-merge fused runs on ONNX Runtime's CPU provider only"),
        (["--torch-merge", "fast"], 2, "unknown --torch-merge 'fast'; choose one of auto, fused, ops"),
        (["--torch-merge", "fused", "--precision", "bf16"], 2,
         "--torch-merge fused runs float32 (fp32) models only on the CPU (any precision on CUDA)"),
        (["--no-cuda-graph"], 2, "--cuda-graph and --no-cuda-graph belong to --device cuda"),
        (["{missing}"], 2, "export directories carry their model, r and merge; drop --model, --r, --method"),
    ],
)
def test_bad_bench_input_is_one_line(tmp_path, args, code, message):
    args = [a.format(missing=tmp_path) for a in args]
    result = runner.invoke(app, ["bench", "-m", str(model_dir(tmp_path, "vit-b16")), "--random-weights", *args])
    assert result.exit_code == code, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
