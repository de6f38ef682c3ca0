"""Precision passes over ONNX graphs."""

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def _upcast_tensor(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _upcast_graph(graph: onnx.GraphProto) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            graph.initializer[index].CopyFrom(_upcast_tensor(init))
    _upcast_nodes(graph.node)


def _upcast_nodes(nodes) -> None:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(_upcast_tensor(attr.t))
            elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") \
                    and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.GRAPH:
                _upcast_graph(attr.g)


def upcast_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float32 wherever `model` computes in float16: tensor types,
    initializers, constants and Cast targets. Run on the upcast copy, an fp16 export must match
    the PyTorch model with fp16-rounded weights to fp32 tolerance, merge decisions included.
    """
    upcast = onnx.ModelProto()
    upcast.CopyFrom(model)
    _upcast_graph(upcast.graph)
    for function in upcast.functions:  # folded merge blocks
        _upcast_nodes(function.node)
    return upcast
