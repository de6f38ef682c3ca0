"""Which runtimes can run here, and if not, why (one line each)."""

import importlib.util

RUNTIMES = ("torch", "ort", "trt")
DEVICES = ("cpu", "cuda")


def cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def unavailable_reason(runtime: str, device: str) -> str | None:
    """None when `runtime` can run on `device` here; otherwise what is missing."""
    if runtime == "torch":
        return cuda_reason() if device == "cuda" else None
    if runtime == "ort":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if device == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return None
    if runtime == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install -e '.[trt]' with NVIDIA's package index)"
        if device != "cuda":
            return "TensorRT runs on CUDA only (use --device cuda)"
        return cuda_reason() or "the TensorRT runner is not built yet (issue 8)"
    raise ValueError(f"unknown runtime {runtime!r}")
