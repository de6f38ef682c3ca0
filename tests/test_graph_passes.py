"""Graph passes on small hand-built graphs: the fp16 upcast computes what numpy computes in fp32."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graph_passes.precision import upcast_fp16


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
