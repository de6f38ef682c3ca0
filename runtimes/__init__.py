"""One runner interface over PyTorch, ONNX Runtime and TensorRT (used by export validation, bench, eval, check)."""
