"""The fused TurboMerge kernel for ONNX Runtime's CPU provider (ort_merge_kernel.c).

Exports keep each layer's weighted merge as a `turbo::TurboMerge` node backed by an ONNX function
that any runtime can run (~26 small nodes once inlined). With the kernel library (cpu_kernels.py)
registered, ONNX Runtime on CPU runs each such node as one kernel instead; where the library cannot
be built, "auto" runs the function and says why.
"""

from turbo.core.errors import UsageError
from turbo.kernels.cpu_kernels import MergeKernelUnavailable, kernel_library

MERGE_KERNELS = ("auto", "fused", "graph")


def check_merge_kernel(choice: str, providers: tuple[str, ...], flag: str = "merge kernel") -> None:
    """UsageError unless `choice` is known and, when "fused", the session runs on the CPU provider."""
    if choice not in MERGE_KERNELS:
        raise UsageError(f"unknown {flag} {choice!r}; choose one of {', '.join(MERGE_KERNELS)}")
    if choice == "fused" and providers[:1] != ("CPUExecutionProvider",):
        raise UsageError(f"{flag} fused runs on ONNX Runtime's CPU provider only")


def register_merge_kernel(options, choice: str, providers: tuple[str, ...]) -> tuple[str, str | None]:
    """Register the fused kernel with ONNX Runtime session `options` when `choice` calls for it.

    Returns how the session runs TurboMerge nodes, "fused" or "graph" (their ONNX function), and
    why "auto" chose "graph" (None otherwise). "fused" raises when it cannot be had.
    """
    check_merge_kernel(choice, providers)
    if choice == "graph":
        return "graph", None
    if providers[:1] != ("CPUExecutionProvider",):
        return "graph", "the fused kernel is CPU-only"
    try:
        library = kernel_library()
    except MergeKernelUnavailable as error:
        if choice == "fused":
            raise
        return "graph", str(error)
    options.register_custom_ops_library(str(library))
    return "fused", None
