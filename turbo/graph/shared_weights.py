"""Save several ONNX models whose weights are stored once, in one shared external-data file.

BLIP's first-step and with-past decoder graphs hold the same ~140M parameters; written
separately they would double the export's size. Initializers with equal type, shape and bytes
point at the same offset of the shared file (ONNX external data: location, offset, length).
"""

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

ALIGNMENT = 4096  # page-aligned offsets, so runtimes may memory-map each tensor
INLINE_BYTES = 1024  # small tensors (shapes, scalars) stay inside each model


def save_with_shared_weights(models: dict[Path, object], data_path: Path) -> dict[str, int]:
    """Write each model (onnx.ModelProto, weights loaded) to its path and the weights they hold
    to `data_path`, every distinct tensor once. Returns bytes written and bytes shared."""

    offsets: dict[tuple, tuple[int, int]] = {}
    stats = {"data_bytes": 0, "shared_bytes": 0}
    with open(data_path, "wb") as data:
        for path, model in models.items():
            for tensor in model.graph.initializer:
                raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(raw) < INLINE_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
                if key in offsets:
                    stats["shared_bytes"] += len(raw)
                else:
                    offset = -data.tell() % ALIGNMENT + data.tell()
                    data.seek(offset)
                    data.write(raw)
                    offsets[key] = (offset, len(raw))
                    stats["data_bytes"] += len(raw)
                tensor.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                for name, value in (("location", data_path.name), ("offset", offsets[key][0]),
                                    ("length", offsets[key][1])):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = name, str(value)
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(path))
    return stats
