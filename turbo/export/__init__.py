"""The export pipeline: ONNX (encoder and decoder), quantization stage, TensorRT engines, validation."""
