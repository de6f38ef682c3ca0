"""ONNX graph passes: TurboMerge function nodes, TensorRT lint, precision, Q/DQ (issue 3 onwards)."""
