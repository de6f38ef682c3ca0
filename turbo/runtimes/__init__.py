"""One runner interface over PyTorch, ONNX Runtime and TensorRT: loaders and runners only."""
