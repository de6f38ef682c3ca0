"""`turbo export` on the tiny registry models: ONNX Runtime equals PyTorch (independently of the
exporter's own validation), the graph agrees with the plan, the manifest records it."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import encoder_output, pixels, tiny_export, tiny_pair
from turbo.core.files import MODEL_FILE
from turbo.export.validate import graph_problems
from turbo.graph.summary import summarize
from turbo.kernels.cpu_kernels import c_compiler
from turbo.kernels.ort_merge_kernel import register_merge_kernel
from turbo.merging.plan import make_plan
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

FAMILIES = ["vit-b16", "blip-caption"]
CASES = [(0, "matmul"), (4, "matmul"), (4, "scatter")]
SCATTER_EXTERNAL = {"matmul": {}, "scatter": {"external_data": True}}  # the scatter cases also write external data


def ort_outputs(directory: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(directory / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x})


# CI time: BLIP's scatter-kernel cases run with -m slow (ViT's cover the scatter kernel in CI)
EXPORT_CASES = [(name, r, kernel) if (name, kernel) != ("blip-caption", "scatter") else
                pytest.param(name, r, kernel, marks=pytest.mark.slow) for name in FAMILIES for r, kernel in CASES]


@pytest.mark.parametrize("name, r, kernel", EXPORT_CASES)
def test_ort_equals_torch_at_batch_1_and_3(tmp_path_factory, name, r, kernel):
    result = tiny_export(tmp_path_factory, name, r, kernel, **SCATTER_EXTERNAL[kernel])
    assert result.passed and result.manifest.status == "passed"
    merged, _, upstream, built = tiny_pair(name, r=r, kernel=kernel)
    reference = upstream if r == 0 else merged  # r=0 must equal upstream transformers
    for batch in (1, 3):
        x = pixels(name, batch=batch, seed=10 + batch)
        got = ort_outputs(result.directory, x.numpy())[0]  # logits / image embeds
        expected = encoder_output(reference, x).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert not list(result.directory.parent.glob(".*partial"))  # the staging directory is gone


@pytest.mark.parametrize("name, r, kernel", EXPORT_CASES)
def test_graph_agrees_with_the_plan(tmp_path_factory, name, r, kernel):
    result = tiny_export(tmp_path_factory, name, r, kernel, **SCATTER_EXTERNAL[kernel])
    plan = tiny_pair(name, r=r)[3].plan
    model = onnx.load(str(result.directory / MODEL_FILE), load_external_data=False)
    graph = model.graph
    nodes = [*graph.node, *(node for function in model.functions for node in function.node)]
    ops = [node.op_type for node in nodes]
    merging = [layer for layer in plan.layers if layer.r > 0]
    merge_nodes = [node for node in graph.node if node.op_type == "TurboMerge"]
    assert [onnx.helper.get_attribute_value(a) for n in merge_nodes for a in n.attribute if a.name == "r"] == [
        layer.r for layer in merging]  # one turbo::TurboMerge node per merging layer, carrying its r
    assert all(n.domain == "turbo" for n in merge_nodes) and len(model.functions) == len(merging)
    assert ops.count("TopK") == 2 * len(merging)
    gathers = [node for node in nodes if node.op_type == "GatherND"]  # turbo::gather_tokens, 2-4 per block
    assert len(gathers) >= 2 * len(merging)
    assert all(any(a.name == "batch_dims" and a.i == 1 for a in n.attribute) for n in gathers)
    assert "ScatterND" not in ops
    scatters = [node for node in nodes if node.op_type == "ScatterElements"]
    if kernel == "matmul":
        assert not scatters
    else:
        assert scatters and all(attr.s == b"add" for node in scatters for attr in node.attribute
                                if attr.name == "reduction")
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value")  # only the batch axis is dynamic
        assert all(d.HasField("dim_value") for d in dims[1:])
        if len(dims) == 3 or output.name == "token_sizes":
            assert dims[1].dim_value == plan.final_tokens
    onnx_manifest = result.manifest.onnx
    assert onnx_manifest.merge_r == [layer.r for layer in merging]
    assert [(layer["tokens_in"], layer["r"]) for layer in result.manifest.plan.layers] == [
        (layer.tokens_in, layer.r) for layer in plan.layers]
    assert ("token_sizes" in [o.name for o in graph.output]) == bool(merging)
    assert (onnx_manifest.external_data != []) == (kernel == "scatter")


def test_graph_check_catches_a_plan_that_differs(tmp_path_factory):
    result = tiny_export(tmp_path_factory, "vit-b16", 4)
    summary = summarize(result.directory / MODEL_FILE)
    built = tiny_pair("vit-b16", r=4)[3]
    assert graph_problems(summary, built.plan, "matmul", None) == []
    other = make_plan(built.source.adapter.arch_spec(built.source.config), 3, "constant")
    problems = graph_problems(summary, other, "matmul", None)
    assert any("r=4 of 18 ranked tokens, but the plan has r=3" in p for p in problems)
    assert any("token dim 21 but the plan ends with 25" in p for p in problems)
    assert any("expected 2" in p for p in graph_problems(summary, built.plan, "matmul", 2))


def test_clamped_layers_export_their_clamped_r(tmp_path_factory):
    """r=8 on 37 tokens is clamped to 6 in the last layer, where the kept-token TopK has K=0."""
    result = tiny_export(tmp_path_factory, "vit-b16", 8)
    assert result.passed
    assert result.manifest.onnx.merge_r == [8, 8, 8, 6]
    assert result.manifest.plan.final_tokens == 7


@pytest.mark.parametrize("name", ["vit-b16", pytest.param("blip-caption", marks=pytest.mark.slow)])  # CI time
def test_fp16_export_is_half_precision_and_validates(tmp_path_factory, name):
    result = tiny_export(tmp_path_factory, name, 4, precision="fp16")
    assert result.passed, result.manifest.validation
    model = onnx.load(str(result.directory / MODEL_FILE))
    weights = [init for init in model.graph.initializer if init.data_type in (onnx.TensorProto.FLOAT,
                                                                              onnx.TensorProto.FLOAT16)]
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) > 0.9 * len(weights)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    checks = result.manifest.validation["outputs"]
    exact = [c for c in checks if c["run"] == "fp16 graph in fp32"]
    half = [c for c in checks if c["run"] == "fp16"]
    assert exact and half and len(exact) == len(half)
    assert {c["atol"] for c in exact} == {1e-3} and {c["atol"] for c in half} == {1e-2}
    assert max(c["max_abs_diff"] for c in half) > 1e-4  # really computed in half precision
    decisions = result.manifest.validation["merge_decisions"]
    assert all(d["tokens_differing"] == 0 for d in decisions if d["run"] == "fp16 graph in fp32")


def test_static_batch_and_a_non_square_image_size(tmp_path_factory):
    """--image-size 40x64 on a 48x48 model: interpolated position embeddings, validated against
    PyTorch, and the processor saved with the export makes 40x64 images."""
    result = tiny_export(tmp_path_factory, "vit-b16", 4, batch=2, image_size=(40, 64))
    assert result.passed
    manifest = result.manifest.to_dict()
    assert manifest["plan"]["tokens_in"] == 5 * 8 + 1 and manifest["onnx"]["image_size"] == [40, 64]
    assert manifest["onnx"]["inputs"][0]["shape"] == [2, 3, 40, 64]
    assert {c["batch"] for c in manifest["validation"]["outputs"]} == {2}
    processor = json.loads((result.directory / "preprocessor_config.json").read_text())
    assert (processor["size"]["height"], processor["size"]["width"]) == (40, 64)


def test_manifest_records_the_export(tmp_path_factory):
    result = tiny_export(tmp_path_factory, "blip-caption", 4, decoder=True)
    manifest = json.loads((result.directory / "turbo.json").read_text())
    assert manifest == result.manifest.to_dict() and manifest["schema_version"] == 3
    assert manifest["model"]["random_weights"] is True and manifest["model"]["revision"] is None
    assert manifest["turbo"] == {"method": "turbo", "alpha": 5.0, "fusion": "s1", "threshold": 0,
                                 "schedule": "constant", "r_requested": 4, "merge_kernel": "matmul",
                                 "r_auto": None, "merge_auto": None}
    plan = manifest["plan"]
    assert plan["final_tokens"] == 21 and plan["speedup_bound"] > 1
    assert plan["flops"] < plan["baseline_flops"]
    assert (manifest["onnx"]["opset"], manifest["onnx"]["precision"], manifest["onnx"]["batch"]) == (20, "fp32",
                                                                                                  "dynamic")
    assert set(manifest["versions"]) >= {"turbo", "torch", "transformers", "onnx", "onnxruntime"}
    assert all(manifest["versions"][k] for k in ("torch", "transformers", "onnx", "onnxruntime"))
    assert manifest["started"] <= manifest["finished"]
    assert set(manifest["stage_seconds"]) == {"load", "patch", "export", "decoder", "validate"}
    assert manifest["image_processor"]["origin"] == "blip default"
    processor = (result.directory / "preprocessor_config.json").read_text()
    assert "BlipImageProcessor" in processor and '"height": 48' in processor


def test_function_nodes_compute_exactly_what_plain_ops_do(tmp_path_factory):
    folded = tiny_export(tmp_path_factory, "vit-b16", 4)
    inline = tiny_export(tmp_path_factory, "vit-b16", 4, merge_op="inline")
    assert inline.manifest.onnx.turbo_merge_nodes == 0 and folded.manifest.onnx.turbo_merge_nodes == 4
    assert inline.manifest.onnx.merge_r == folded.manifest.onnx.merge_r == [4, 4, 4, 4]
    x = pixels("vit-b16", batch=3, seed=5).numpy()
    for got, want in zip(ort_outputs(folded.directory, x), ort_outputs(inline.directory, x)):
        np.testing.assert_array_equal(got, want)


def profiled_op_counts(path: Path, x: np.ndarray, merge_kernel: str, tmp_path: Path) -> dict[str, int]:
    """Operator type -> nodes ONNX Runtime ran for one inference."""
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / merge_kernel)
    register_merge_kernel(options, merge_kernel, ("CPUExecutionProvider",))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixel_values": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return Counter(e["args"]["op_name"] for e in kernels)


@pytest.mark.skipif(c_compiler() is None, reason="no C compiler to build the fused kernel")
@pytest.mark.parametrize("name, precision", [("vit-b16", "fp32"), ("blip-caption", "fp32"), ("vit-b16", "fp16")])
def test_fused_kernel_runs_every_merge_and_equals_the_function(tmp_path_factory, tmp_path, name, precision):
    options = {"precision": "fp16"} if precision == "fp16" else {}  # other tests' exports
    result = tiny_export(tmp_path_factory, name, 4, **options)
    path, dtype = result.directory / MODEL_FILE, np.float16 if precision == "fp16" else np.float32
    x = pixels(name, batch=3, seed=3).numpy().astype(dtype)
    fused = OnnxRuntimeRunner(path, merge_kernel="fused")
    graph = OnnxRuntimeRunner(path, merge_kernel="graph")
    assert (fused.describe()["merge_kernel"], graph.describe()["merge_kernel"]) == ("fused", "graph")
    want = graph.run({"pixel_values": x})
    for output, got in fused.run({"pixel_values": x}).items():
        np.testing.assert_allclose(got, want[output], **({"atol": 2e-2} if precision == "fp16" else {"atol": 1e-5}))
    merges = result.manifest.onnx.turbo_merge_nodes
    ran = profiled_op_counts(path, x, "fused", tmp_path)
    assert merges == 4 and ran["TurboMerge"] == merges and ran["GatherND"] == 0  # one kernel per merge, no function
    assert profiled_op_counts(path, x, "graph", tmp_path)["GatherND"] == 4 * merges  # the function, inlined
