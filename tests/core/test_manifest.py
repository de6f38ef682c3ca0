"""The typed manifest: what the pipeline writes reads back as the same record; older manifests
load; newer, incomplete or mistyped ones are refused with one line naming the fix."""

import json

import pytest

from tests.conftest import manifest_json, tiny_export
from turbo.core.manifest import SCHEMA_VERSION, Manifest, ManifestError, read_export_manifest


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    return manifest_json(tiny_export(tmp_path_factory, "blip-caption", 4, decoder=True).directory)  # shared export


def test_a_written_manifest_reads_back_unchanged(written):
    manifest = Manifest.from_dict(written)
    assert manifest.to_dict() == written
    assert manifest.schema_version == SCHEMA_VERSION and manifest.decoder.image_tokens == manifest.plan.final_tokens
    assert manifest.onnx.static_batch is None and manifest.model.seed == 0


def test_a_manifest_without_a_schema_version_is_version_1_and_loads(written):
    older = {key: value for key, value in written.items() if key != "schema_version"}
    del older["onnx"]["merge_op"], older["onnx"]["turbo_merge_nodes"]  # written before function nodes
    manifest = Manifest.from_dict(older)
    assert manifest.onnx.merge_op == "inline" and manifest.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), "newer than this turbo's"),
    (lambda m: m.pop("plan"), "lacks plan"),
    (lambda m: m["onnx"].pop("opset"), "onnx lacks opset"),
    (lambda m: m["plan"].update(final_tokens="21"), "plan: final_tokens is str, not int"),
    (lambda m: m["decoder"].update(prompt=None), "decoder: prompt is NoneType, not str"),
    (lambda m: m.update(model=[]), "model is list"),
])
def test_a_bad_manifest_is_refused_in_one_line(written, edit, message):
    bad = json.loads(json.dumps(written))
    edit(bad)
    with pytest.raises(ManifestError, match="re-export|upgrade") as error:
        Manifest.from_dict(bad, "turbo.json")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_reading_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match="not a turbo export directory"):
        read_export_manifest(tmp_path)
    (tmp_path / "turbo.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError, match="not readable JSON"):
        read_export_manifest(tmp_path)
    (tmp_path / "turbo.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="not a turbo manifest"):
        read_export_manifest(tmp_path)
