"""Fused Turbo steps outside the ONNX graph: a C kernel (the ONNX Runtime op, eager PyTorch on the CPU)
and Triton kernels (CUDA, and the TensorRT plugin's merge)."""
