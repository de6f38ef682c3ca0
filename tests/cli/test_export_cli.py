"""`turbo export` as users run it: JSON on stdout, exit 3 on a failed validation, safe writes,
one-line errors that leave no files behind, Ctrl-C and SIGTERM cleanup."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import turbo.export.pipeline
from tests.conftest import manifest_json
from turbo.cli.app import app
from turbo.export.onnx_export import ExportError
from turbo.models.loading import resolve_source

runner = CliRunner()


def model_dir(tmp_path: Path, name: str = "vit-b16") -> Path:
    """A local model directory holding only the tiny variant's config.json."""
    path = tmp_path / f"tiny-{name}"
    resolve_source(name, tiny=True).config.save_pretrained(path)
    return path


def export(tmp_path: Path, *extra: str, name: str = "vit-b16"):
    """A tiny export at a static batch (several times faster to export than a dynamic axis)."""
    args = ["export", "-m", str(model_dir(tmp_path, name)), "--r", "4", "--random-weights", "--batch", "2", *extra]
    return runner.invoke(app, args)


def leftovers(parent: Path) -> list[Path]:
    return list(parent.glob(".*.partial")) + list(parent.glob(".*.old"))


def test_json_manifest_on_stdout_and_the_table_on_stderr(tmp_path):
    out = tmp_path / "out"
    result = export(tmp_path, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == manifest_json(out)
    assert "validation PASSED" in result.stderr and "FAILED" not in result.stderr
    assert all(f"✓ {stage}" in result.stderr for stage in ("load", "patch", "export", "validate"))
    manifest = manifest_json(out)
    assert manifest["status"] == "passed" and manifest["command"].split()[0] == "turbo"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "preprocessor_config.json", "turbo.json"]


def test_a_perturbed_model_fails_validation_with_exit_3(tmp_path, monkeypatch):
    """The ONNX graph is written, then the PyTorch weights change: validation must catch it."""
    real_export = turbo.export.pipeline.export_onnx

    def export_then_perturb(module, *args, **kwargs):
        names = real_export(module, *args, **kwargs)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.mul_(1.01)
        return names

    monkeypatch.setattr(turbo.export.pipeline, "export_onnx", export_then_perturb)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    result = export(tmp_path, "-o", str(out), "--force")
    assert result.exit_code == 3, result.output
    assert "FAILED" in result.stderr and "validation failed" in result.stderr
    assert manifest_json(out)["status"] == "failed" and not (out / "old.txt").exists()
    assert not leftovers(tmp_path)


def test_no_validate_says_so(tmp_path):
    out = tmp_path / "out"
    result = export(tmp_path, "-o", str(out), "--no-validate", "--merge-kernel", "scatter")
    assert result.exit_code == 0, result.output
    manifest = manifest_json(out)
    assert manifest["status"] == "not validated" and manifest["validation"] == {"skipped": True}
    assert "not validated (--no-validate)" in result.stderr and "PASSED" not in result.stderr


def test_an_export_error_keeps_the_previous_directory(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise ExportError("torch.onnx.export failed: simulated")

    monkeypatch.setattr(turbo.export.pipeline, "export_onnx", broken_export)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    result = export(tmp_path, "-o", str(out), "--force")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "error: torch.onnx.export failed: simulated"
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not leftovers(tmp_path)


def test_refuses_a_non_empty_directory_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = export(tmp_path, "-o", str(out))
    assert result.exit_code == 2
    assert "exists and is not empty; pass --force" in result.output and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "nope"], "unknown model 'nope'"),
        (["-m", "{empty}"], "cannot read config.json"),
        (["-m", "{bad_json}"], "cannot read config.json"),
        (["--batch", "0"], "--batch takes a positive integer or 'dynamic'"),
        (["--batch", "many"], "--batch takes a positive integer or 'dynamic'"),
        (["--opset", "17"], "--opset 17 is not supported; use 18..23"),
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--image-size", "4"], "--image-size 4x4 is smaller than one patch (8x8)"),
        (["--image-size", "48x"], "--image-size takes H or HxW in pixels"),
        (["--merge-kernel", "gather"], "unknown merge kernel 'gather'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    args = [a.format(empty=tmp_path / "empty", bad_json=tmp_path / "bad_json") for a in args]
    out = tmp_path / "nested" / "out"
    local = ["-m", str(model_dir(tmp_path)), "--random-weights"] if "-m" not in args else ["--random-weights"]
    result = runner.invoke(app, ["export", "-o", str(out), *local, *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not (tmp_path / "nested").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_directory(tmp_path, sig):
    out = tmp_path / "nested" / "out"
    command = [sys.executable, "-m", "turbo", "export", "-m", str(model_dir(tmp_path)), "--r", "4",
               "-o", str(out), "--random-weights"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "nested").glob(".out.*.partial")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # well inside load or export
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not (tmp_path / "nested").exists()


def test_a_local_model_with_weights_and_processor(tmp_path):
    """The path real users take: weights and the image processor come from the model directory."""
    import numpy as np
    import onnxruntime as ort

    from tests.conftest import encoder_output, pixels
    from turbo.models.build import build_merged_model, build_plan
    from turbo.models.loading import load_model

    source = resolve_source("blip-caption", tiny=True)
    model = load_model(source, random_weights=True, seed=7)
    local = tmp_path / "my-blip"
    model.save_pretrained(local)
    processor = source.adapter.image_processor((48, 48))
    processor.image_mean = [0.1, 0.2, 0.3]
    processor.save_pretrained(local)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "-m", str(local), "--r", "4", "-o", str(out), "--no-decoder",
                                 "--batch", "2"])
    assert result.exit_code == 0, result.output  # no tokenizer needed: the vision encoder only
    manifest = manifest_json(out)
    assert "decoder" not in manifest and not list(out.glob("decoder*"))
    assert manifest["model"]["random_weights"] is False and manifest["image_processor"]["origin"] == str(local)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.1, 0.2, 0.3]
    x = pixels("blip-caption", batch=2, seed=3)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    merged, _ = build_merged_model(build_plan(str(local), r=4))  # the saved weights, merged in PyTorch
    np.testing.assert_allclose(got, encoder_output(merged, x).numpy(), atol=1e-4, rtol=0)
    other, _ = build_merged_model(build_plan(str(local), r=4), random_weights=True)
    assert not np.allclose(got, encoder_output(other, x).numpy(), atol=1e-2)
