"""The CPU merge kernels (merge_core.c, ort_merge_kernel.c) as one shared library.

It holds the weighted merge as an ONNX Runtime custom op (ort_merge_kernel.py registers it) and the
whole Turbo step of a layer for eager PyTorch (torch_merge_kernel.py calls it). It is compiled
with the system C compiler ($CC, else cc, gcc or clang) on first use and cached under
$TURBO_CACHE/kernels, keyed by the sources and the compiler; callers whose choice is "auto" run
their runtime's own ops when it cannot be built, and say why.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from turbo.core.cache import cache_root
from turbo.core.errors import TurboError

SOURCES = tuple(Path(__file__).with_name(name) for name in ("merge_core.c", "ort_merge_kernel.c"))
_failures: dict[Path, str] = {}  # one compile attempt per library path and process


class MergeKernelUnavailable(TurboError):
    """A fused kernel was asked for and cannot be built here."""


def c_compiler() -> str | None:
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def kernel_library() -> Path:
    """The compiled library, built now unless cached; MergeKernelUnavailable says why not."""
    compiler = c_compiler()
    if compiler is None:
        raise MergeKernelUnavailable("no C compiler to build the fused merge kernels (install gcc, or set CC)")
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + f"{compiler}|{platform.machine()}".encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"turbo_merge-{key}.so"
    if target.exists():
        return target
    if target in _failures:
        raise MergeKernelUnavailable(_failures[target])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        command = [compiler, "-O3", "-shared", "-fPIC", "-o", str(built), *map(str, SOURCES), "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines() or [""]
            detail = next((line for line in lines if "error" in line), lines[-1])
            _failures[target] = f"{compiler} could not build the fused merge kernels: {detail.strip()}"
            raise MergeKernelUnavailable(_failures[target]) from None
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target
