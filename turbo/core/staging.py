"""Safe output directories: build beside the target, move into place only when complete.

An output path is claimed by one run at a time (a lock file beside it naming the run), the model
being read is never the output, a parent turbo cannot write to is refused before any work, and
staging directories left by dead runs (SIGKILL, a power cut) are removed by the next run that
writes beside them: never another live run's.
"""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from turbo.core.errors import TurboError, UsageError

OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # runs on shared storage tell hosts apart


def check_target(target: Path, force: bool, protect: Path | None = None) -> None:
    """Refuse a file, a non-empty directory without --force, or a target that is (or holds) the
    model being read, before any work starts."""
    if protect is not None and protect.exists():
        resolved, source = target.resolve(), protect.resolve()
        if resolved == source or resolved in source.parents:
            raise UsageError(f"--output {target} would replace the model being read ({protect}); choose another "
                             "--output")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory; choose another --output")
    if target.is_dir() and _contents(target) and not force:
        raise UsageError(f"{target} exists and is not empty; pass --force to replace it or choose another --output")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"cannot replace {target} (permission denied, read-only or immutable); choose another "
                         "--output")


def is_mount_point(path: Path) -> bool:
    """Whether `path` is mounted on (a container volume), including a bind mount of a directory of
    the same file system, which `os.path.ismount` does not see."""
    if os.path.ismount(path):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    resolved = os.path.realpath(path)
    # field 5 is the mount point, with space, tab, newline and backslash written as \ooo octal
    points = (OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), line.split(" ")[4]) for line in lines
              if line.count(" ") >= 4)
    return any(point == resolved for point in points)


@contextlib.contextmanager
def _interrupts() -> Iterator[list[int]]:
    """Ctrl-C and a terminated job (CI cancel) both raise KeyboardInterrupt, and are recorded: an
    interrupt raised where Python swallows exceptions (a finalizer, a callback from C) still stops
    the output from being moved into place."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staged_directory(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside `target`; on success it replaces `target` in one rename
    (inside it, entry by entry, when `target` is a mount point, which cannot be renamed).

    Any exception, Ctrl-C or SIGTERM removes the staging directory (and any parent
    directories created for it) and leaves an existing `target` untouched.
    """
    target = Path(target).absolute()
    check_target(target, force)
    with _interrupts() as received:
        created = [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]
        staging = lock = None
        try:
            home = _make_parents(target)
            lock = _claim(target, home)
            _remove_dead_stagings(home, target.name)
            staging = _make_staging(home, target.name)
            yield staging
            if received:
                raise KeyboardInterrupt(f"signal {received[0]}")
            try:
                _replace(staging, target, force, home == target)
            except OSError as exc:
                raise TurboError(f"cannot move the finished output into {target} ({exc.strerror or exc})") from None
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if lock is not None:
                lock.unlink(missing_ok=True)
            for parent in created:  # deepest first
                with contextlib.suppress(OSError):
                    parent.rmdir()
            raise
        lock.unlink(missing_ok=True)


def _make_parents(target: Path) -> Path:
    """Create the parents; a parent that is a file or not writable is one line, before any work.
    Returns where staging goes: beside `target`, or inside it when it is a mount point."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {target.parent} ({exc.strerror or exc}); choose another --output") from None
    home = target if is_mount_point(target) else target.parent
    if not os.access(home, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {home} (permission denied or read-only); choose another --output")
    return home


def _make_staging(home: Path, name: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{name}.{HOST}-{os.getpid()}.", suffix=".partial", dir=home))
    except OSError as exc:  # a full disk, an immutable folder
        raise UsageError(f"cannot write in {home} ({exc.strerror or exc}); choose another --output") from None


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a run, from a staging directory or lock name `.NAME.HOST-PID.*`."""
    parts = name.split(".")
    host, _, pid = (parts[-3] if name.endswith(".partial") else parts[-1]).partition("-")
    return (host, int(pid)) if pid.isdigit() else None


def _alive(owner: tuple[str, int] | None) -> bool:
    """Whether a run may still be working: a live pid here, or any run on another host."""
    if owner is None:
        return True  # not ours to judge
    host, pid = owner
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputClaimed(UsageError):
    """Another live run is writing the output path."""


def _lock_path(target: Path, home: Path | None = None) -> Path:
    """`.NAME.lock` in `home`: beside `target`, or inside it when it is a mount point (its parent
    may be read-only)."""
    if home is None:
        home = target if is_mount_point(target) else target.parent
    return home / f".{target.name}.lock"


def _live_holder(lock: Path) -> str | None:
    """The run named in `lock` while it may still be working, else None."""
    try:
        holder = lock.read_text().strip()
    except FileNotFoundError:
        return None
    return (holder or "unknown") if _alive(_owner(f".x.{holder}")) else None


def wait_for_other_run(target: str | Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once no live run holds `target` (a shared cache entry being built); one line after
    `timeout_s`."""
    target = Path(target).absolute()
    lock, deadline = _lock_path(target), time.monotonic() + timeout_s
    while (holder := _live_holder(lock)) is not None:
        if time.monotonic() > deadline:
            raise OutputClaimed(f"another turbo run ({holder}) has been writing {target} for over {timeout_s:.0f} s; "
                                f"try again later, or remove {lock} if that run is gone")
        time.sleep(poll_s)


def _claim(target: Path, home: Path) -> Path:
    """Take `.NAME.lock` in `home` (a live holder: one line naming it; a dead one: taken over)."""
    lock = _lock_path(target, home)
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if (holder := _live_holder(lock)) is not None:
                raise OutputClaimed(f"another turbo run ({holder}) is writing {target}; wait for it, or remove "
                                    f"{lock} if that run is gone") from None
            lock.unlink(missing_ok=True)  # its run died: take it over
            continue
        except OSError as exc:
            raise UsageError(f"cannot write in {lock.parent} ({exc.strerror or exc}); choose another "
                             "--output") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{HOST}-{os.getpid()}\n")
        return lock
    raise UsageError(f"cannot claim {target} ({lock} keeps reappearing); try again")


def _contents(target: Path) -> list[Path]:
    """What is in `target`, less turbo's own lock and staging directories (inside a mount point)."""
    lock = f".{target.name}.lock"
    return [entry for entry in target.iterdir() if entry.name != lock and not _is_staging(entry, target.name)]


def _is_staging(entry: Path, name: str) -> bool:
    return entry.is_dir() and entry.name.startswith(f".{name}.") and entry.name.endswith(".partial")


def _remove_dead_stagings(home: Path, name: str) -> None:
    """Remove `.NAME.*.partial` directories of this host's runs that no longer exist."""
    for stale in home.glob(f".{name}.*.partial"):
        if _is_staging(stale, name) and not _alive(_owner(stale.name)):
            shutil.rmtree(stale, ignore_errors=True)


def _replace(staging: Path, target: Path, force: bool, mounted: bool) -> None:
    _normal_permissions(staging)
    if mounted:
        _replace_contents(staging, target, force)
        return
    if not target.exists():
        staging.rename(target)
        return
    if not force and _contents(target):
        raise UsageError(f"{target} was written by another run meanwhile; kept it (pass --force to replace it)")
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _replace_contents(staging: Path, target: Path, force: bool) -> None:
    """A mount point stays: its old entries go (with --force), the staged ones move in."""
    old = _contents(target)
    if old and not force:
        raise UsageError(f"{target} was written by another run meanwhile; kept it (pass --force to replace it)")
    for entry in old:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in staging.iterdir():
        entry.rename(target / entry.name)
    staging.rmdir()


def _normal_permissions(directory: Path) -> None:
    """mkdtemp's 0700, made what a new directory gets under the umask."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        directory.chmod(0o777 & ~mask)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
