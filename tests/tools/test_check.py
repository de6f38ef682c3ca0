"""`turbo check` as a CI gate: a fresh export passes; a corrupted manifest, an edited manifest,
an edited graph, a missing file or directory are each caught with a clear message."""

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from turbo.cli.app import app

WORKFLOW = Path(__file__).parents[2] / ".github" / "workflows" / "export-check.yml"
runner = CliRunner()


def workflow_commands() -> list[list[str]]:
    """The `turbo ...` commands of the example workflow, as argument lists."""
    lines = [line.strip() for line in WORKFLOW.read_text().splitlines()]
    return [shlex.split(line.removeprefix("run:").strip())[1:] for line in lines
            if line.removeprefix("run:").strip().startswith("turbo ")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The workflow's export command, run in a temporary directory."""
    export_args = workflow_commands()[0]
    out = tmp_path_factory.mktemp("ci") / "exports" / "vit-tiny-r4"
    export_args[export_args.index("-o") + 1] = str(out)
    result = runner.invoke(app, export_args)
    assert result.exit_code == 0, result.output
    return out


def copy_of(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def check(directory: Path, *extra: str):
    return runner.invoke(app, ["check", str(directory), *extra])


def detail_of(result, name: str) -> str:
    """One check's detail, from the JSON report (the table wraps long paths anywhere)."""
    return next(item["detail"] for item in json.loads(result.stdout)["checks"] if item["name"] == name)


def test_the_workflow_commands_pass(exported):
    assert [args[0] for args in workflow_commands()] == ["export", "check"]
    check_args = workflow_commands()[1]
    check_args[1] = str(exported)
    result = runner.invoke(app, check_args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = {item["name"]: item for item in report["checks"]}
    assert report["passed"] and set(names) >= {"manifest", "plan vs manifest", "files", "onnx.checker (full)",
                                                "graph vs manifest", "graph vs plan", "TensorRT lint",
                                                "ORT vs PyTorch", "gate: max diff", "gate: agreement"}
    assert all(item["passed"] for item in report["checks"])


def test_an_impossible_speed_gate_fails(exported):
    result = check(exported, "--min-speedup", "100", "--iters", "2")
    assert result.exit_code == 3
    assert "gate: speedup" in result.output and "limit 100x" in result.output


def test_a_corrupted_manifest(exported, tmp_path):
    directory = copy_of(exported, tmp_path)
    (directory / "turbo.json").write_text('{"status": "passed", "plan": ')
    result = check(directory, "--json")
    assert result.exit_code == 3
    detail = detail_of(result, "manifest")
    assert "turbo.json is not readable JSON" in detail and "re-export" in detail
    assert "error:" in result.output and "Traceback" not in result.output


def test_an_edited_manifest(exported, tmp_path):
    directory = copy_of(exported, tmp_path)
    manifest = json.loads((directory / "turbo.json").read_text())
    manifest["plan"]["final_tokens"] = 5
    manifest["onnx"]["merge_r"] = [4, 4, 4]
    (directory / "turbo.json").write_text(json.dumps(manifest))
    result = check(directory, "--json")
    assert result.exit_code == 3
    failed = {item["name"] for item in json.loads(result.stdout)["checks"] if item["passed"] is False}
    assert failed == {"plan vs manifest", "graph vs manifest"}


def test_a_graph_edited_after_export(exported, tmp_path):
    """The first block's ranking TopK changed from K=Na=18 to 17, which reads as r=3 (K minus the
    14 kept): the graph no longer matches manifest or plan."""
    directory = copy_of(exported, tmp_path)
    model = onnx.load(str(directory / "model.onnx"))
    topk = next(node for node in model.graph.node if node.op_type == "TopK")  # the first layer's K = Na
    constant = next(init for init in model.graph.initializer if init.name == topk.input[1])
    assert numpy_helper.to_array(constant).tolist() == [18]
    constant.CopyFrom(numpy_helper.from_array(np.array([17], np.int64), constant.name))
    onnx.save(model, str(directory / "model.onnx"))
    result = check(directory, "--json")
    assert result.exit_code == 3
    checks = {item["name"]: item for item in json.loads(result.stdout)["checks"]}
    assert checks["files"]["passed"] is False and "SHA-256" in checks["files"]["detail"]
    assert checks["onnx.checker (full)"]["passed"] is False  # shape inference disagrees with the stored shapes
    assert checks["graph vs manifest"]["passed"] is False
    assert checks["graph vs plan"]["passed"] is False and "r=3" in checks["graph vs plan"]["detail"]


def test_weights_edited_after_export(exported, tmp_path):
    directory = copy_of(exported, tmp_path)
    model = onnx.load(str(directory / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.05, weight.name))
    onnx.save(model, str(directory / "model.onnx"))
    result = check(directory, "--json")
    assert result.exit_code == 3
    checks = {item["name"]: item for item in json.loads(result.stdout)["checks"]}
    assert checks["ORT vs PyTorch"]["passed"] is False and checks["graph vs plan"]["passed"] is True


def test_missing_model_file_and_missing_directory(exported, tmp_path):
    directory = copy_of(exported, tmp_path)
    (directory / "model.onnx").unlink()
    result = check(directory, "--json")
    assert result.exit_code == 3 and "model.onnx is missing" in detail_of(result, "files")
    missing = check(tmp_path / "nowhere")
    assert missing.exit_code == 2 and "is not a directory" in missing.output
    assert len(missing.output.strip().splitlines()) == 1


def test_tiny_needs_a_registry_model(tmp_path):
    result = runner.invoke(app, ["export", "-m", "org/name", "--tiny", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--tiny needs a registry model" in result.output
