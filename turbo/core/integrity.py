"""What an export directory held when it was written, and proof that it still holds it.

The manifest records every file's size and SHA-256 (`record_files`); every command that reads an
export checks them first (`verify_files`), so a truncated, replaced or missing file is one line
and exit 3, never a wrong result or a traceback from deep inside a runtime.
"""

import hashlib
from pathlib import Path

from turbo.core.errors import EXIT_VALIDATION, TurboError
from turbo.core.files import MANIFEST_FILE

CHUNK = 1 << 20


class IntegrityError(TurboError):
    """An export's files differ from what its manifest recorded."""

    exit_code = EXIT_VALIDATION


_digests: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> SHA-256, for files read again unchanged


def file_record(path: Path) -> dict[str, int | str]:
    """{"bytes": size, "sha256": hex digest} of one file. A file already hashed by this process
    and unchanged since (same inode, size, mtime and ctime; any write moves ctime) is not read again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return {"bytes": stat.st_size, "sha256": _digests[key]}


def record_files(directory: Path) -> dict[str, dict[str, int | str]]:
    """Every file under `directory` but the manifest, by its relative POSIX path."""
    return {path.relative_to(directory).as_posix(): file_record(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}


def verify_files(directory: Path, files: dict[str, dict]) -> None:
    """IntegrityError naming the first file that is missing, of another size or another content."""
    if not files:
        raise IntegrityError(f"{directory}/{MANIFEST_FILE} records no file hashes (an export by an older turbo); "
                             "re-export the directory")
    for name, recorded in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{directory}/{MANIFEST_FILE} records a file outside the export ({name}); "
                                 "re-export the directory")
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the export recorded it); re-export the directory")
        try:
            found = file_record(path) if path.stat().st_size == recorded.get("bytes") else {"bytes": -1}
        except OSError as exc:
            raise IntegrityError(f"{path} cannot be read ({exc.strerror or exc}); re-export the directory") from None
        if found != {"bytes": recorded.get("bytes"), "sha256": recorded.get("sha256")}:
            raise IntegrityError(f"{path} is not the file the export wrote (its size or SHA-256 differs from "
                                 f"{MANIFEST_FILE}); re-export the directory")
