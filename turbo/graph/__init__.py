"""ONNX graph passes: TurboMerge function nodes, summaries, TensorRT lint, precision, weight dequantization."""
