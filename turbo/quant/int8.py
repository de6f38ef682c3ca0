"""INT8 weights and activations as QDQ (ONNX Runtime static quantization), calibrated on the
merged model: weight MatMuls only (MatMulConstBOnly — attention score MatMuls and the merge's
one-hot MatMuls stay float), symmetric, per-channel weights, biases left in float (TensorRT's
DequantizeLinear takes no int32). One file for ONNX Runtime and TensorRT explicit quantization."""

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from turbo.graph.weight_quant import value_key

CALIBRATION_BATCH = 8


def quantize_int8(source: Path, target: Path, input_name: str, pixels: np.ndarray,
                  keep_float: tuple[np.ndarray, ...] = ()) -> None:
    """Write the QDQ model of `source` to `target`, activation ranges from `pixels` (MinMax).
    Weights equal to one of `keep_float` (either orientation: the classifier head) stay float."""

    graph = onnx.load(str(source)).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    kept = {value_key(w) for weight in keep_float for w in (weight, weight.T)}
    weight_nodes = [node.name for node in graph.node  # listed: MatMulConstBOnly alone still rounds q·kᵀ inputs
                    if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in constants
                    and value_key(numpy_helper.to_array(constants[node.input[1]])) not in kept]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: pixels[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(pixels), CALIBRATION_BATCH)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=weight_nodes,
        use_external_data_format=source.with_name(source.name + ".data").exists(),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       "MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
    )
