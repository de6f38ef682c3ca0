"""The fused TurboMerge kernel for ONNX Runtime's CPU provider (ort_merge_kernel.c).

Exports keep each layer's weighted merge as a `turbo::TurboMerge` node backed by an ONNX function
that any runtime can run (~26 small nodes once inlined). With this library registered, ONNX Runtime
on CPU runs each such node as one kernel instead. It is compiled with the system C compiler ($CC,
else cc, gcc or clang) on first use and cached under $TURBO_CACHE/kernels, keyed by the source and
the compiler; without a compiler, "auto" runs the function and says why.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from exporters.errors import TurboError, UsageError
from runtimes.cache import cache_root

MERGE_KERNELS = ("auto", "fused", "graph")
SOURCE = Path(__file__).with_name("ort_merge_kernel.c")
_failures: dict[Path, str] = {}  # one compile attempt per library path and process


class MergeKernelUnavailable(TurboError):
    """The fused kernel was asked for and cannot be built here."""


def c_compiler() -> str | None:
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def fused_library() -> Path:
    """The compiled kernel library, built now unless cached; MergeKernelUnavailable says why not."""
    compiler = c_compiler()
    if compiler is None:
        raise MergeKernelUnavailable("no C compiler to build the fused TurboMerge kernel (install gcc, or set CC)")
    key = hashlib.sha256(SOURCE.read_bytes() + f"{compiler}|{platform.machine()}".encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"turbo_merge_ort-{key}.so"
    if target.exists():
        return target
    if target in _failures:
        raise MergeKernelUnavailable(_failures[target])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        command = [compiler, "-O3", "-shared", "-fPIC", "-o", str(built), str(SOURCE)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines() or [""]
            detail = next((line for line in lines if "error" in line), lines[-1])
            _failures[target] = f"{compiler} could not build the fused TurboMerge kernel: {detail.strip()}"
            raise MergeKernelUnavailable(_failures[target]) from None
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


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
        library = fused_library()
    except MergeKernelUnavailable as error:
        if choice == "fused":
            raise
        return "graph", str(error)
    options.register_custom_ops_library(str(library))
    return "fused", None
