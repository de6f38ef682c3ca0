"""Which runtimes can run here, and if not, why (one line each)."""

import importlib.util

import onnxruntime
import torch

RUNTIMES = ("torch", "ort", "trt")
DEVICES = ("cpu", "cuda")


def cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it is not importable."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception:  # the bindings wheel without NVIDIA's libraries fails to import
        return None
    return tensorrt.__version__


def tensorrt_reason() -> str | None:
    """None when TensorRT engines can be built and run here; otherwise what is missing."""
    if tensorrt_version() is None:
        return ("TensorRT is not installed or cannot load its libraries (pip install -e '.[trt]' "
                "--extra-index-url https://pypi.nvidia.com, on a machine with an NVIDIA GPU)")
    return cuda_reason()


def unavailable_reason(runtime: str, device: str) -> str | None:
    """None when `runtime` can run on `device` here; otherwise what is missing."""
    if runtime == "torch":
        return cuda_reason() if device == "cuda" else None
    if runtime == "ort":
        if device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return None
    if runtime == "trt":
        if tensorrt_version() is None or device == "cuda":
            return tensorrt_reason()
        return "TensorRT runs on CUDA only (use --device cuda)"
    raise ValueError(f"unknown runtime {runtime!r}")
