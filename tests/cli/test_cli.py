"""The CLI as users run it: help, JSON, exit codes and one-line errors."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from turbo.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("command", [[], ["models"], ["plan"], ["export"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_models_json_lists_the_registry_and_the_families():
    listing = json.loads(invoke("models", "--json").stdout)
    models = {m["name"]: m for m in listing["models"]}
    assert {"vit-b16", "vit-l16", "deit-b16", "clip-b16", "siglip-b16", "dinov2-b14", "blip-caption"} <= set(models)
    blip = models["blip-caption"]
    assert (blip["hf_id"], blip["image_size"], blip["tokens"], blip["layers"], blip["default_r"], blip["alpha"]) == (
        "Salesforce/blip-image-captioning-base", [384, 384], 577, 12, 30, 5.0)
    assert models["vit-l16"]["layers"] == 24
    dinov2 = models["dinov2-b14"]  # exported at its image processor's 224, not its config's 518
    assert (dinov2["image_size"], dinov2["tokens"], dinov2["protected_tokens"]) == ([224, 224], 257, 1)
    assert (models["siglip-b16"]["method"], models["siglip-b16"]["protected_tokens"]) == ("tome", 0)
    assert models["deit-b16"]["protected_tokens"] == 2
    families = {f["family"]: f for f in listing["families"]}
    assert {m["family"] for m in models.values()} == set(families)
    assert families["siglip"]["methods"] == ["tome", "pitome", "none"]
    assert families["deit"]["protected"] == "CLS, distillation"


def test_plan_json_for_the_default_model():
    result = invoke("plan", "--json")
    assert result.exit_code == 0
    plan = json.loads(result.stdout)
    assert (plan["model"], plan["r"], plan["final_tokens"]) == ("blip-caption", [30] * 12, 217)
    assert plan["speedup_bound"] == pytest.approx(1.50, abs=0.01)
    assert [layer["tokens_out"] for layer in plan["layers"]] == [577 - 30 * (i + 1) for i in range(12)]


def test_plan_takes_the_export_model_options():
    """--tiny and --image-size plan what `turbo export` with the same options exports."""
    tiny = json.loads(invoke("plan", "--model", "vit-b16", "--tiny", "--r", "4", "--json").stdout)
    assert (tiny["tokens_in"], tiny["final_tokens"], len(tiny["layers"])) == (37, 21, 4)
    large = json.loads(invoke("plan", "--model", "vit-b16", "--image-size", "384", "--r", "16", "--json").stdout)
    assert (large["image_size"], large["tokens_in"]) == ([384, 384], 577)
    wide = json.loads(invoke("plan", "--model", "vit-b16", "--image-size", "224x320", "--r", "8", "--json").stdout)
    assert (wide["image_size"], wide["tokens_in"]) == ([224, 320], 14 * 20 + 1)
    assert invoke("plan", "--model", "vit-b16", "--image-size", "224x").exit_code == 2
    assert invoke("plan", "--model", "org/name", "--tiny").exit_code == 2


def test_plan_table_shows_the_clamp():
    result = invoke("plan", "--model", "vit-b16", "--r", "16")
    assert result.exit_code == 0
    assert "10 (asked 16)" in result.output and "2.00x" in result.output


def test_plan_on_a_local_directory(tmp_path):
    from turbo.models.loading import resolve_source

    resolve_source("vit-b16", tiny=True).config.save_pretrained(tmp_path)
    plan = json.loads(invoke("plan", "--model", str(tmp_path), "--r", "4", "--json").stdout)
    assert plan["tokens_in"] == 37 and plan["final_tokens"] == 21


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["plan", "--model", "nope"], 2, "unknown model 'nope'"),
        (["plan", "--r", "-1"], 2, "--r must be at least 0, got -1"),
        (["plan", "--model", "vit-b16", "--r", "99"], 2, "at most r=98"),
        (["plan", "--schedule", "1,2"], 2, "lists 2 values but the model has 12 layers"),
        (["plan", "--method", "fast"], 2, "unknown method 'fast'"),
        (["plan", "--alpha", "-1"], 2, "--alpha must be at least 0, got -1.0"),
        (["plan", "--model", "nobody/no-such-model"], 1, "cannot get its config"),
    ],
)
def test_user_errors_are_one_line_with_exit_codes(args, code, message):
    result = invoke(*args)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "turbo", "plan", "--model", "vit-b16", "--r", "8", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["final_tokens"] == 101


def test_the_cli_starts_without_the_heavy_libraries():
    """`turbo --help` stays fast: the CLI layer imports torch, transformers and ONNX only inside commands."""
    heavy = ("torch", "transformers", "onnx", "onnxruntime")
    code = f"import sys, turbo.cli.app; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
