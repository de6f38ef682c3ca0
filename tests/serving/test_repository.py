"""`turbo deploy triton`: the repository's configs pass Triton's schema and say what the exports
are; bad exports and options are one line with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.serving import repository as repository_module
from turbo.serving.model_config import ModelConfigError, check_config, check_repository, pb

runner = CliRunner()


def deploy(*args: str):
    return runner.invoke(app, ["deploy", "triton", *map(str, args)])


def config_of(repo, model: str):
    return check_config(repo / model / "config.pbtxt")


def test_every_config_passes_the_schema_and_describes_its_export(repository, served_exports):
    configs = {config.name: config for config in check_repository(repository)}
    assert set(configs) == {"vit", "vit-encoder", "blip", "blip-encoder", "blip-decoder-first", "blip-decoder-next",
                            "llava", "llava-encoder", "llava-prefill", "llava-decode"}
    encoder = configs["vit-encoder"]
    assert encoder.backend == "python" and encoder.max_batch_size == 4 and encoder.HasField("dynamic_batching")
    assert [(i.name, list(i.dims), i.data_type) for i in encoder.input] == [("pixel_values", [3, 48, 48],
                                                                             pb.TYPE_FP32)]
    assert [o.name for o in encoder.output] == ["logits", "last_hidden_state", "token_sizes"]
    assert list(encoder.output[1].dims) == [21, 32]  # the merged token count, from the manifest
    assert encoder.parameters["turbo_r"].string_value == "4" and len(encoder.model_warmup) == 1
    decoder = configs["blip-decoder-next"]
    assert decoder.max_batch_size == 0 and not decoder.HasField("dynamic_batching")  # past length varies
    assert -1 in decoder.input[1].dims  # the cache length
    blip = configs["blip"]
    assert [(i.name, i.data_type, i.optional) for i in blip.input] == [("image", pb.TYPE_STRING, False),
                                                                       ("prompt", pb.TYPE_STRING, True)]
    assert (repository / "blip-decoder-first" / "1" / "decoder.onnx.data").is_file()  # its external weights
    llava, decode = configs["llava"], configs["llava-decode"]
    assert [(i.name, i.data_type, i.optional) for i in llava.input] == [
        ("image", pb.TYPE_STRING, False), ("prompt", pb.TYPE_STRING, False), ("max_new_tokens", pb.TYPE_INT32, True)]
    assert llava.parameters["sample_prompt"].string_value.startswith("USER: <image>")
    assert decode.max_batch_size == 0 and [i.name for i in decode.input][:5] == [
        "input_ids", "positions", "image_start", "prompt_tokens", "past.image_kept"]  # DyRate's step
    assert all(-1 in i.dims for i in decode.input if i.name.startswith("past."))  # the caches' lengths vary
    assert (repository / "llava-prefill" / "1" / "llm.onnx.data").is_file()
    assert "turbo serve" in (repository / "README.md").read_text() and "InferenceService" in (
        repository / "README.md").read_text()


def test_the_onnxruntime_backend_and_batching_options(served_exports, tmp_path):
    out = tmp_path / "repo"
    result = deploy(served_exports["vit"], "-o", out, "--max-batch", "16", "--instances", "2", "--preferred-batch",
                    "4,8", "--max-queue-delay-us", "500", "--no-warmup", "--json")
    assert result.exit_code == 0, result.output
    encoder = config_of(out, "vit-encoder")
    assert encoder.platform == "onnxruntime_onnx" and encoder.default_model_filename == "model.onnx"
    version = out / "vit-encoder" / "1"
    assert (version / "model.onnx").is_file() and not (version / "model.py").exists()
    assert encoder.max_batch_size == 16 and encoder.instance_group[0].count == 2
    assert list(encoder.dynamic_batching.preferred_batch_size) == [4, 8]
    assert encoder.dynamic_batching.max_queue_delay_microseconds == 500 and not encoder.model_warmup


def test_a_static_batch_export_takes_whole_batches(tmp_path_factory, tmp_path):
    static = shutil.copytree(tiny_export(tmp_path_factory, "vit-b16", 4, batch=2).directory, tmp_path / "vit-static")
    result = deploy(static, "-o", tmp_path / "repo", "--backend", "python")
    assert result.exit_code == 0, result.output
    encoder = config_of(tmp_path / "repo", "vit-static-encoder")
    assert encoder.max_batch_size == 0 and list(encoder.input[0].dims) == [2, 3, 48, 48]
    assert not encoder.HasField("dynamic_batching")
    assert config_of(tmp_path / "repo", "vit-static").max_batch_size == 8  # the image model pads to the static batch
    assert "static batch 2" in result.output


def test_check_config_refuses_what_triton_would(tmp_path):
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    cases = {
        'name: "m" backend: "python" max_batch_size: 0 input {name: "x" data_type: TYPE_FP32 dims: 1} '
        'dynamic_batching {}': "dynamic batching needs max_batch_size",
        'name: "other" backend: "python"': "is not its directory",
        'name: "m" platform: "onnxruntime_onnx" max_batch_size: 2 dynamic_batching {preferred_batch_size: 4}':
            "exceeds max_batch_size",
        'name: "m" backend: "python" inputs {name: "x"}': "not a Triton model config",
        'name: "m"': "neither a platform nor a backend",
    }
    for text, says in cases.items():
        (model / "config.pbtxt").write_text(text)
        with pytest.raises(ModelConfigError, match=says):
            check_config(model / "config.pbtxt")
    good = pb.ModelConfig(name="m", backend="python")
    (model / "config.pbtxt").write_text(text_format.MessageToString(good))
    assert check_config(model / "config.pbtxt").backend == "python"


def test_bad_exports_and_options_are_one_line_and_write_nothing(served_exports, tmp_path):
    out = tmp_path / "repo"
    corrupt = shutil.copytree(served_exports["vit"], tmp_path / "corrupt")
    with open(corrupt / "model.onnx", "r+b") as handle:  # one flipped byte
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))
    twin = shutil.copytree(served_exports["vit"], tmp_path / "other" / "vit")
    cases = [
        ((served_exports["blip"], corrupt), 3, "corrupt"),
        ((served_exports["vit"], twin), 2, "both be served as 'vit'"),
        ((served_exports["vit"], "--backend", "tensorrt"), 2, "has no TensorRT engine"),
        ((served_exports["vit"], "--backend", "tvm"), 2, "--backend must be one of"),
        ((served_exports["vit"], "--preferred-batch", "16"), 2, "outside 1..--max-batch 8"),
        ((tmp_path / "missing",), 2, "missing"),
    ]
    for args, code, says in cases:
        result = deploy(*args, "-o", out)
        assert result.exit_code == code, (args, result.output)
        assert says in result.output and "Traceback" not in result.output and len(result.output.splitlines()) == 1
        assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("")
    result = deploy(served_exports["vit"], "-o", out)
    assert result.exit_code == 2 and "--force" in result.output and (out / "keep").exists()


def test_a_failure_while_writing_leaves_no_repository(served_exports, tmp_path, monkeypatch):
    written = repository_module.deploy_export

    def fail_on_the_second(directory, *args):
        if directory.name == "blip":
            raise OSError("disk full")
        return written(directory, *args)

    monkeypatch.setattr("turbo.tools.deploy.deploy_export", fail_on_the_second)
    with pytest.raises(OSError):
        from turbo.serving.repository import DeployOptions
        from turbo.tools.deploy import deploy_triton

        deploy_triton([served_exports["vit"], served_exports["blip"]], tmp_path / "repo", DeployOptions())
    assert not (tmp_path / "repo").exists() and list(tmp_path.iterdir()) == []


def _with_engine(export, tmp_path, **build) -> Path:
    """An export as `--trt` leaves it: an engine file, the manifest's tensorrt entry and hashes.
    (The engine's bytes are not a real engine: deploying only copies it.)"""
    from turbo.core.integrity import record_files

    directory = shutil.copytree(export, tmp_path / "vit-trt")
    (directory / "model.plan").write_bytes(b"engine bytes")
    manifest = json.loads((directory / "turbo.json").read_text())
    manifest["tensorrt"] = {"built": True, "file": "model.plan", "tensorrt": "10.13.2", "device": "NVIDIA H200",
                            "merge": "plugin", **build}
    manifest["files"] = record_files(directory)
    (directory / "turbo.json").write_text(json.dumps(manifest))
    return directory


def test_an_export_with_an_engine_is_served_by_tensorrt(served_exports, tmp_path):
    exported = _with_engine(served_exports["vit"], tmp_path, plugin="aot")
    result = deploy(exported, "-o", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    encoder = config_of(tmp_path / "repo", "vit-trt-encoder")
    assert encoder.platform == "tensorrt_plan" and encoder.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "vit-trt-encoder" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert "TensorRT engines" in (tmp_path / "repo" / "README.md").read_text()
    python = deploy(exported, "-o", tmp_path / "repo-python", "--backend", "python")
    assert python.exit_code == 0 and config_of(tmp_path / "repo-python", "vit-trt-encoder").backend == "python"


def test_an_engine_whose_plugin_needs_python_is_refused(served_exports, tmp_path):
    result = deploy(_with_engine(served_exports["vit"], tmp_path, plugin="jit"), "-o", tmp_path / "repo")
    assert result.exit_code == 2 and "runs its TurboMerge plugin in Python" in result.output
    assert not (tmp_path / "repo").exists()
