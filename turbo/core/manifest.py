"""turbo.json: everything needed to reproduce and trust an export."""

import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from turbo.core.errors import UsageError

MANIFEST_FILE = "turbo.json"
PACKAGES = {"turbo": "turbo-vlm", "torch": "torch", "transformers": "transformers", "onnx": "onnx",
            "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


def versions() -> dict[str, str | None]:
    found = {}
    for name, distribution in PACKAGES.items():
        try:
            found[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict:
    return json.loads((Path(directory) / MANIFEST_FILE).read_text())


def read_export_manifest(directory: str | Path) -> dict:
    """An export directory's turbo.json; a UsageError when DIR is not an export."""

    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"{directory} has no {MANIFEST_FILE}: not a turbo export directory")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); re-export the directory") from None
