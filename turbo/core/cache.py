"""Where turbo keeps what it builds (exports for bench, engines, compiled kernels)."""

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TURBO_CACHE", Path.home() / ".cache" / "turbo"))
