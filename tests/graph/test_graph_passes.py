"""Graph passes on small hand-built graphs: the fp16 upcast computes what numpy computes in fp32."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from turbo.graph.precision import upcast_fp16


def fp16_graph():
    weight = np.array([[0.1, -2.0], [3.3333, 0.5]], dtype=np.float16)
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "w"], ["y"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([1e-3], np.float16))),
        helper.make_node("Add", ["y", "c"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), weight


def test_upcast_removes_every_float16_and_computes_in_fp32():
    model, weight = fp16_graph()
    upcast = upcast_fp16(model)
    text = str(upcast)
    assert "data_type: 10" not in text and "elem_type: 10" not in text and "i: 10" not in text
    x = np.array([[1.0001, 2.0]], dtype=np.float32)
    session = ort.InferenceSession(upcast.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert got.dtype == np.float32
    expected = x @ weight.astype(np.float32) + np.float32(np.float16(1e-3))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    half = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert half.dtype == np.float16 and not np.allclose(half, expected, rtol=1e-6, atol=0)  # the pass mattered
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT16  # the input model is untouched


def lint_graph(tmp_path, nodes, initializers=(), opset=20):
    from onnx import save

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              list(initializers))
    path = tmp_path / "g.onnx"
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("turbo", 1)]
    save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))
    from turbo.graph.trt_lint import lint

    return lint(path)


def test_trt_lint_flags_what_the_parser_rejects(tmp_path):
    k_const = numpy_helper.from_array(np.array([4], np.int64), "k")
    big_k = numpy_helper.from_array(np.array([4000], np.int64), "big")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "one", "two"], ["k_dyn"]),
        helper.make_node("TopK", ["x", "k_dyn"], ["v1", "i1"]),
        helper.make_node("TopK", ["x", "big"], ["v2", "i2"]),
        helper.make_node("TopK", ["x", "k"], ["v3", "i3"], sorted=0),
        helper.make_node("ReduceMax", ["x", "k_dyn"], ["m"]),
        helper.make_node("ScatterElements", ["x", "i3", "v3"], ["s"], axis=1, reduction="add"),
    ]
    inits = [k_const, big_k, numpy_helper.from_array(np.array([0], np.int64), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "two")]
    findings = lint_graph(tmp_path, nodes, inits, opset=21)
    messages = [(f.severity, f.op_type, f.message) for f in findings]
    assert ("error", "TopK", "TopK K is computed at run time; TensorRT needs a constant K") in messages
    assert ("error", "TopK", "TopK K=4000 is not below 3840") in messages
    assert ("error", "TopK", "TopK with sorted=0 is not supported") in messages
    assert any(s == "error" and op == "ReduceMax" for s, op, _ in messages)
    assert any(s == "warning" and op == "ScatterElements" and "bundled plugin" in m for s, op, m in messages)
    assert any("opset 21" in m for _, _, m in messages)
    assert [f.severity for f in findings] == sorted((f.severity for f in findings), key=lambda s: s != "error")


def test_trt_lint_passes_a_clean_graph(tmp_path):
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"]), helper.make_node("Relu", ["v"], ["y"])]
    assert lint_graph(tmp_path, nodes, [numpy_helper.from_array(np.array([4], np.int64), "k")]) == []


def test_trt_lint_wants_a_plugin_or_a_local_function_for_custom_ops(tmp_path):
    nodes = [helper.make_node("TurboMerge", ["x"], ["y"], domain="turbo")]
    findings = lint_graph(tmp_path, nodes)
    assert [(f.severity, f.op_type) for f in findings] == [("warning", "TurboMerge")]
    assert "no local function" in findings[0].message
