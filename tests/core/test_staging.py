"""Output directories on real mount points, read-only and immutable places, and a shared cache
entry being built by another run."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from turbo.core.errors import UsageError
from turbo.core.staging import HOST, OutputClaimed, is_mount_point, staged_directory, wait_for_other_run


def _can(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        return False


MOUNT_NAMESPACE = ["unshare", "--map-root-user", "--mount"]


@pytest.mark.skipif(not _can([*MOUNT_NAMESPACE, "true"]), reason="no user and mount namespaces (unshare) here")
def test_a_bind_mounted_volume_is_written_inside_and_a_read_only_one_refused_first(tmp_path):
    """A container volume is often a bind mount of the same file system, which cannot be renamed
    (EBUSY) and which os.path.ismount does not see."""
    (tmp_path / "volume").mkdir()
    (tmp_path / "volume" / "old.txt").write_text("old")
    (tmp_path / "target").mkdir()
    script = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        from turbo.core.errors import UsageError
        from turbo.core.staging import is_mount_point, staged_directory
        target = Path({str(tmp_path / "target")!r})
        subprocess.run(["mount", "--bind", {str(tmp_path / "volume")!r}, str(target)], check=True)
        assert is_mount_point(target)
        try:
            with staged_directory(target):
                raise SystemExit("ran without --force over a non-empty volume")
        except UsageError as error:
            print("refused:", error)
        with staged_directory(target, force=True) as staging:
            (staging / "model.onnx").write_text("new")
        print("mounted after:", is_mount_point(target), sorted(p.name for p in target.iterdir()))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        try:
            with staged_directory(target, force=True):
                raise SystemExit("the body ran on a read-only volume")
        except UsageError as error:
            print("read-only:", error)
    """)
    result = subprocess.run([*MOUNT_NAMESPACE, sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused:") and "is not empty" in lines[0]
    assert lines[1] == "mounted after: True ['model.onnx']"
    assert lines[2].startswith("read-only:") and "read-only" in lines[2]
    assert sorted(p.name for p in (tmp_path / "volume").iterdir()) == ["model.onnx"]  # the namespace is gone


def test_a_same_file_system_directory_is_not_a_mount_point(tmp_path):
    assert not is_mount_point(tmp_path) and is_mount_point(Path("/"))


@pytest.fixture
def immutable(tmp_path) -> Path:
    folder = tmp_path / "immutable"
    folder.mkdir()
    if not _can(["chattr", "+i", str(folder)]):
        pytest.skip("chattr +i is not permitted here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_immutable_targets_and_parents_are_refused_before_any_work(immutable):
    for target, message in ((immutable, "cannot replace"), (immutable / "out", "cannot write in")):
        with pytest.raises(UsageError, match=message), staged_directory(target, force=True):
            raise AssertionError("the body ran")
    assert list(immutable.iterdir()) == []


@pytest.fixture
def holder():
    """A live process on this host (its pid names a lock's holder)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_cache_entry_being_built_is_waited_for_then_given_up_on(tmp_path, holder):
    target = tmp_path / "entry"
    lock = tmp_path / ".entry.lock"
    lock.write_text(f"{HOST}-{holder.pid}\n")
    with pytest.raises(OutputClaimed, match=f"{HOST}-{holder.pid}.* for over 0 s"):
        wait_for_other_run(target, timeout_s=0.2, poll_s=0.05)
    threading.Timer(0.3, lock.unlink).start()  # the other run finishes
    begin = time.monotonic()
    wait_for_other_run(target, timeout_s=30, poll_s=0.05)
    assert 0.25 < time.monotonic() - begin < 5
    lock.write_text(f"{HOST}-{2 ** 22 + 12345}\n")  # a run that died: not waited for
    wait_for_other_run(target, timeout_s=0)
