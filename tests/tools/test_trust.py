"""Nothing on disk is believed: every command verifies an export before use (its files against
the SHA-256 the manifest recorded, its graph against the manifest), and corrupting any file or
manifest field, swapping graphs between exports or passing another model as the baseline ends in
one line on stderr, a non-zero exit, empty stdout and nothing written. Outputs never replace the
model being read, one run at a time owns an output path, and dead runs' staging is cleaned."""

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.core.integrity import IntegrityError
from turbo.core.staging import HOST
from turbo.graph.export_dir import open_export

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Static-batch exports (several times faster to make than a dynamic batch axis)."""
    return {"r0": tiny_export(tmp_path_factory, "vit-b16", 0, batch=2).directory,
            "r4": tiny_export(tmp_path_factory, "vit-b16", 4, batch=2).directory,
            "deit": tiny_export(tmp_path_factory, "deit-b16", 0, batch=2).directory}


def one_line_error(result, code: int | tuple[int, ...] = (2, 3)) -> str:
    codes = code if isinstance(code, tuple) else (code,)
    assert result.exit_code in codes, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


COMMANDS = {
    "bench": lambda d, images: ["bench", str(d), "--batch", "2", "--iters", "1", "--warmup", "0", "--json"],
    "eval": lambda d, images: ["eval", str(d), "--data", str(images), "--json"],
}


def _corrupt(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x00garbage" * 16)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_corrupted_file_is_one_line_and_exit_3(exports, images, tmp_path_factory, data):
    directory = Path(shutil.copytree(exports["r4"], tmp_path_factory.mktemp("corrupt") / "export"))
    recorded = sorted(json.loads((directory / "turbo.json").read_text())["files"])
    name = data.draw(st.sampled_from(recorded), label="file")
    how = data.draw(st.sampled_from(["delete", "truncate", "garbage"]), label="how")
    command = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
    _corrupt(directory / name, how)
    before = sorted(p.name for p in directory.parent.iterdir())
    line = one_line_error(runner.invoke(app, COMMANDS[command](directory, images)), 3)
    assert name in line and "re-export" in line
    assert sorted(p.name for p in directory.parent.iterdir()) == before


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_manifest_field_is_one_line(exports, images, tmp_path_factory, data):
    """Any recorded file's hash, the plan's r, the input shape, or a manifest that is not an object."""
    directory = Path(shutil.copytree(exports["r4"], tmp_path_factory.mktemp("edit") / "export"))
    manifest = json.loads((directory / "turbo.json").read_text())
    edit = data.draw(st.sampled_from(["hash", "size", "plan r", "input", "not an object", "no files", "outside"]),
                     label="edit")
    if edit == "hash":
        manifest["files"]["model.onnx"]["sha256"] = "0" * 64
    elif edit == "size":
        manifest["files"]["preprocessor_config.json"]["bytes"] += 1
    elif edit == "plan r":
        manifest["plan"]["r"] = [data.draw(st.integers(0, 3)), 0, 0, 0]
    elif edit == "input":
        manifest["onnx"]["inputs"][0]["shape"] = [2, 1, 48, 48]
    elif edit == "no files":
        del manifest["files"]
    elif edit == "outside":  # a recorded name that would hash a file outside the export
        manifest["files"]["../" + directory.parent.name + "/export/model.onnx"] = manifest["files"]["model.onnx"]
    else:
        manifest = data.draw(st.sampled_from([[], "text", 3, None]), label="not an object")
    (directory / "turbo.json").write_text(json.dumps(manifest))
    command = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
    one_line_error(runner.invoke(app, COMMANDS[command](directory, images)))


def test_a_graph_swapped_in_with_its_hash_is_caught_by_the_graph_check(exports, tmp_path):
    """An r=0 graph under a manifest saying r=4, even with the hashes rewritten to match."""
    directory = Path(shutil.copytree(exports["r4"], tmp_path / "export"))
    shutil.copy(exports["r0"] / "model.onnx", directory / "model.onnx")
    with pytest.raises(IntegrityError, match="model.onnx is not the file the export wrote"):
        open_export(directory)
    manifest = json.loads((directory / "turbo.json").read_text())
    manifest["files"]["model.onnx"] = json.loads((exports["r0"] / "turbo.json").read_text())["files"]["model.onnx"]
    (directory / "turbo.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"merge blocks have r \[\], the plan \[4, 4, 4, 4\]"):
        open_export(directory)


def test_a_baseline_of_another_model_is_refused(exports):
    result = runner.invoke(app, ["bench", str(exports["r4"]), "--baseline", str(exports["deit"]), "--batch", "2",
                                 "--iters", "1"])
    line = one_line_error(result, 2)
    assert "is another model" in line and "DeiTForImageClassificationWithTeacher" in line


def test_the_output_never_replaces_the_model_being_read(tmp_path):
    from turbo.models.loading import load_model, resolve_source

    checkpoint = tmp_path / "checkpoint"
    load_model(resolve_source("vit-b16", tiny=True), random_weights=True).save_pretrained(checkpoint)
    before = sorted(p.name for p in checkpoint.iterdir())
    for output in (checkpoint, tmp_path):
        result = runner.invoke(app, ["export", "-m", str(checkpoint), "--r", "4", "-o", str(output), "--force"])
        assert "would replace the model being read" in one_line_error(result, 2)
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_one_run_at_a_time_owns_an_output_path_and_dead_runs_are_cleaned(tmp_path):
    out = tmp_path / "out"
    args = ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--r", "4", "--no-validate", "--batch", "2",
            "-o", str(out)]
    lock = tmp_path / ".out.lock"
    lock.write_text(f"{HOST}-{os.getpid()}\n")  # a live run (this one) holds it
    assert "another turbo run" in one_line_error(runner.invoke(app, args), 2)
    assert not out.exists()
    lock.write_text(f"{HOST}-{2 ** 22 + 12345}\n")  # a pid that does not exist: its run died
    dead = tmp_path / f".out.{HOST}-{2 ** 22 + 12345}.abc.partial"
    live = tmp_path / f".out.{HOST}-{os.getpid()}.abc.partial"
    elsewhere = tmp_path / f".out.0000beef-{2 ** 22 + 12345}.abc.partial"  # another host's: not ours to judge
    for staging in (dead, live, elsewhere):
        staging.mkdir()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not dead.exists() and live.exists() and elsewhere.exists() and not lock.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700


@pytest.mark.parametrize("args, message", [
    (["--alpha", "nan"], "--alpha 'nan': expected a number >= 0"),
    (["--alpha", "inf"], "--alpha 'inf': expected a number >= 0"),
    (["-o", "{file}/out"], "cannot create"),
])
def test_bad_values_and_places_are_refused_before_any_work(tmp_path, args, message):
    (tmp_path / "file").write_text("a regular file")
    args = [a.format(file=tmp_path / "file") for a in args]
    out = ["-o", str(tmp_path / "out")] if "-o" not in args else []
    result = runner.invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", *out, *args])
    assert message in one_line_error(result, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_replaced_checkpoint_gets_a_new_bench_cache_entry(tmp_path):
    from turbo.models.loading import content_fingerprint, load_model, resolve_source

    checkpoint = tmp_path / "checkpoint"
    load_model(resolve_source("vit-b16", tiny=True), random_weights=True, seed=1).save_pretrained(checkpoint)
    first = content_fingerprint(resolve_source(str(checkpoint)), random_weights=False)
    shutil.rmtree(checkpoint)
    load_model(resolve_source("vit-b16", tiny=True), random_weights=True, seed=2).save_pretrained(checkpoint)
    second = content_fingerprint(resolve_source(str(checkpoint)), random_weights=False)
    assert first != second
    assert content_fingerprint(resolve_source(str(checkpoint)), random_weights=False) == second


@pytest.fixture
def bad_inputs(tmp_path, images) -> dict[str, Path]:
    from turbo.models.loading import resolve_source

    config = resolve_source("vit-b16", tiny=True).config.to_dict()
    config.update(hidden_size="big", architectures=["ViTForImageClassification"])
    (tmp_path / "badtype").mkdir()
    (tmp_path / "badtype" / "config.json").write_text(json.dumps(config))
    linked = Path(shutil.copytree(images, tmp_path / "linked"))
    (linked / "gone.png").symlink_to(tmp_path / "nowhere.png")
    return {"badtype": tmp_path / "badtype", "linked": linked, "images": images}


@pytest.mark.parametrize("args, message", [
    (["plan", "-m", "{badtype}"], "Field 'hidden_size' expected int"),
    (["plan", "-m", "./no/such/dir"], "no such model directory"),
    (["plan", "-m", "/no/such/dir"], "no such model directory"),
    (["eval", "-m", "vit-b16", "--tiny", "--random-weights", "--data", "{images}", "--batch", "0"], "--batch must be"),
    (["eval", "-m", "vit-b16", "--tiny", "--random-weights", "--data", "{images}", "--limit", "-1"], "--limit must be"),
    (["eval", "-m", "vit-b16", "--tiny", "--random-weights", "--data", "{linked}"], "gone.png is a broken link"),
])
def test_user_errors_are_one_line(bad_inputs, args, message):
    result = runner.invoke(app, [a.format(**bad_inputs) for a in args])
    assert message in one_line_error(result, 2)


def test_bench_batch_errors_are_in_its_own_words(exports):
    for value in ("x", "0"):
        result = runner.invoke(app, ["bench", str(exports["r4"]), "--batch", value])
        assert f"--batch takes comma-separated integers of at least 1, e.g. 1,8,64; got '{value}'" in one_line_error(
            result, 2)


def test_check_iters_zero_is_a_usage_error(exports):
    assert "--iters must be at least 1" in one_line_error(runner.invoke(app, ["check", str(exports["r4"]),
                                                                              "--iters", "0"]), 2)


def test_what_silently_did_less_is_said(images):
    from turbo.data.images import calibration_set
    from turbo.models.build import build_plan
    from turbo.models.vit import VIT

    with pytest.warns(UserWarning, match="nothing merges: every layer enters with fewer than --threshold 100"):
        build_plan("vit-b16", tiny=True, r=4, threshold=100)
    with pytest.warns(UserWarning, match="--calib-size 9 but .* holds 2 images: calibrating on 2"):
        calibration = calibration_set(str(images), 9, 0, VIT.image_processor((8, 8)), (3, 8, 8))
    assert calibration.pixels.shape == (2, 3, 8, 8) and calibration.info.count == 2


def test_a_relative_model_path_is_recorded_absolute(tmp_path, monkeypatch):
    from turbo.models.loading import load_model, resolve_source

    load_model(resolve_source("vit-b16", tiny=True), random_weights=True).save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert resolve_source("ckpt").location == str((tmp_path / "ckpt").resolve())


def _leaves(value, path=()):
    """Every (path, value) of a JSON document's leaves and containers."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _leaves(item, (*path, key))


OTHER_TYPES = {"null": None, "text": "x", "number": -7, "fraction": 0.5, "list": [], "object": {}, "true": True}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_value_of_another_type_is_refused_in_one_line_or_harmless(exports, images, tmp_path_factory,
                                                                               data):
    """Every field, at any depth, replaced by a value of another JSON type: the command either runs
    (the field is free-form, e.g. the validation report) or ends in one error line, never a traceback."""
    directory = Path(shutil.copytree(exports["r4"], tmp_path_factory.mktemp("retype") / "export"))
    manifest = json.loads((directory / "turbo.json").read_text())
    paths = [path for path, _ in _leaves(manifest) if path]
    path = data.draw(st.sampled_from(paths), label="field")
    old = functools.reduce(lambda node, key: node[key], path, manifest)
    new = data.draw(st.sampled_from([v for v in OTHER_TYPES.values() if type(v) is not type(old)]), label="value")
    functools.reduce(lambda node, key: node[key], path[:-1], manifest)[path[-1]] = new
    (directory / "turbo.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, COMMANDS["bench"](directory, images))
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    if result.exit_code != 0:
        one_line_error(result)
