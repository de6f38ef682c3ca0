"""One runner interface over torch, ONNX Runtime and TensorRT (issue 7)."""
