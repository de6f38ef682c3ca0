"""Safe output directories: build beside the target, move into place only when complete."""

import contextlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from turbo.core.errors import UsageError


def check_target(target: Path, force: bool) -> None:
    """Refuse a file, or a non-empty directory without --force, before any work starts."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{target} exists and is not empty; pass --force to replace it or choose another --output")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A terminated job (CI cancel) cleans up like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_directory(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside `target`; on success it replaces `target` in one rename.

    Any exception, Ctrl-C or SIGTERM removes the staging directory (and any parent
    directories created for it) and leaves an existing `target` untouched.
    """
    target = Path(target).absolute()
    check_target(target, force)
    with _sigterm_as_interrupt():
        created = [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]
        staging = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
            yield staging
            _replace(staging, target)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            for parent in created:  # deepest first
                with contextlib.suppress(OSError):
                    parent.rmdir()
            raise


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
