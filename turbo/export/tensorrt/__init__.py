"""TensorRT: the TurboMerge plugin and its Triton kernel, builder settings, engine build."""
