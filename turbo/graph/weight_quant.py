"""Weight-only quantization in ONNX: a MatMul weight becomes INT4/INT8 integers and fp32 group
scales feeding an opset-21 blocked `DequantizeLinear` (axis 0, block_size = group), symmetric,
no zero point — the standard form ONNX Runtime runs and TensorRT parses.

The model is exported with its Linear weights already fake-quantized (dequantized values), so
each quantized weight is found among the initializers by value: the exporter renames
initializers (`val_13`) and stores Linear weights transposed, (in, out).
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from turbo.core.errors import TurboError

MIN_OPSET = 21  # blocked DequantizeLinear and INT4


@dataclass
class QuantizedWeight:
    """q (out, in) integers in [-2^(bits-1), 2^(bits-1)-1]; scales (out, in // group)."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.repeat_interleave(self.group, dim=1)  # (out, in)


def value_key(array: np.ndarray) -> tuple:
    return array.shape, hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).digest()


def _raw(values: np.ndarray, bits: int) -> bytes:
    """ONNX raw_data: INT8 as bytes; INT4 two per byte, the first in the low nibble."""
    flat = values.astype(np.int8).flatten()
    if bits == 8:
        return flat.tobytes()
    nibbles = (flat & 0x0F).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def insert_dequantize(model, weights: dict[str, QuantizedWeight]) -> tuple[object, list[str]]:
    """Replace every MatMul (or Gemm) weight initializer equal to a quantized Linear's dequantized
    weight by integers + scales + DequantizeLinear. Returns the model and the Linear names
    that were not found (the caller decides whether that is an error)."""

    by_value = {}  # the weight as MatMul stores it (in, out), axis 0; as Gemm with transB=1 does (out, in), axis 1
    for name, w in weights.items():
        by_value[value_key(w.dequantize().T.numpy())] = (name, 0)
        by_value[value_key(w.dequantize().numpy())] = (name, 1)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    replaced: dict[str, str] = {}  # initializer -> its DequantizeLinear output
    found, nodes = set(), []
    for node in model.graph.node:
        weight = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 else None
        if weight in initializers and weight not in replaced:
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            match = by_value.get(value_key(numpy_helper.to_array(initializers[weight])))
            if match is not None and match[1] == int(transposed):
                name, axis = match
                quantized = weights[name]
                kind = TensorProto.INT4 if quantized.bits == 4 else TensorProto.INT8
                q, scales = quantized.q.numpy().astype(np.int8), quantized.scales.numpy().astype(np.float32)
                if axis == 0:
                    q, scales = q.T, scales.T  # (in, out), (in // group, out)
                model.graph.initializer.remove(initializers[weight])
                model.graph.initializer.extend([
                    helper.make_tensor(f"{weight}_q", kind, q.shape, _raw(q, quantized.bits), raw=True),
                    numpy_helper.from_array(np.ascontiguousarray(scales), f"{weight}_scale"),
                ])
                nodes.append(helper.make_node("DequantizeLinear", [f"{weight}_q", f"{weight}_scale"],
                                              [f"{weight}_dq"], name=f"{weight}_DequantizeLinear", axis=axis,
                                              block_size=quantized.group))
                replaced[weight] = f"{weight}_dq"
                found.add(name)
        nodes.append(node)
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in replaced and node.op_type != "DequantizeLinear":
                node.input[index] = replaced[name]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < MIN_OPSET:
            opset.version = MIN_OPSET
    model.ir_version = max(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model, sorted(set(weights) - found)


def dequantizing(weights: dict[str, QuantizedWeight] | None, what: str) -> Callable[[dict], None] | None:
    """For graphs sharing weights (path -> model, replaced in place): insert_dequantize in each,
    every quantized Linear found in one of them (a with-past graph lacks what it caches). None
    without weights."""
    if not weights:
        return None

    def rewrite(protos: dict) -> None:
        missing = set(weights)
        for path, proto in protos.items():
            protos[path], absent = insert_dequantize(proto, weights)
            missing &= set(absent)
        if missing:
            raise TurboError(f"{len(missing)} quantized {what} Linears were not found in its graphs "
                             f"(first: {sorted(missing)[0]}); report this with the model name")

    return rewrite
