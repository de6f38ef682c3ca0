"""Export a patched model to static-shape ONNX with torch's dynamo exporter.

Only the batch axis may be dynamic; token counts are fixed by the plan, so every token
dimension is static and every TopK K is a constant.
"""

import contextlib
import io
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnxscript import opset18 as op
from torch import nn

from turbo.core.errors import TurboError, UsageError, describe_error
from turbo.core.files import CLS_ATTENTION, IMAGE_FEATURES, INPUT_NAME, TOKEN_SIZES  # noqa: F401 (re-exported)
from turbo.graph.merge_functions import fold_merge_blocks
from turbo.graph.shared_weights import save_with_shared_weights
from turbo.merging.merge import KERNELS  # also registers turbo::gather_tokens
from turbo.merging.spatial import SpatialMerge
from turbo.models.build import BuiltPlan

MIN_OPSET, MAX_OPSET = 18, 23
DEFAULT_OPSET = 20
EXTERNAL_DATA_BYTES = 1 << 30  # weights at or above this size go to model.onnx.data
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class ExportError(TurboError):
    """torch.onnx could not export the model."""


class ExportModule(nn.Module):
    """pixel_values (B, C, H, W) -> the family's outputs, plus token_sizes when the plan merges."""

    def __init__(self, model: nn.Module, built: BuiltPlan, cls_attention: bool = False,
                 spatial: SpatialMerge | None = None) -> None:
        super().__init__()
        self.model = model
        self.adapter = built.source.adapter
        self.cls_attention = cls_attention  # MustDrop: the image features and the CLS attention on each
        self.spatial = spatial  # ...after its spatial merge in the tower, where it merges
        self.interpolate = built.interpolate_pos_encoding
        self.merges = any(built.plan.r)
        self.pixel_shape = built.pixel_shape  # (C, H, W)
        self._output_names: list[str] | None = None

    def named_outputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cls_attention:
            language = self.adapter.language_model
            outputs = dict(zip((IMAGE_FEATURES, CLS_ATTENTION),
                               language.cls_attention(self.model, pixel_values, self.interpolate, self.spatial),
                               strict=True))
        else:
            outputs = self.adapter.export_outputs(self.model, pixel_values, self.interpolate)
        if self.merges:
            outputs[TOKEN_SIZES] = self.model.turbo_state.size.squeeze(-1)  # (B, N_final)
        return outputs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.named_outputs(pixel_values).values())

    def output_names(self) -> list[str]:
        """The names forward's outputs get (found with one small dry run, once)."""
        if self._output_names is None:
            dtype = next(self.model.parameters()).dtype
            with torch.inference_mode():
                self._output_names = list(self.named_outputs(torch.zeros(1, *self.pixel_shape, dtype=dtype)))
        return self._output_names


def check_export_options(opset: int, precision: str, batch: int | None, kernel: str,
                         merge_op: str = "function") -> None:
    """Bad export options raise UsageError before anything is loaded or written."""
    if merge_op not in ("function", "inline"):
        raise UsageError(f"unknown --merge-op {merge_op!r}; choose function or inline")
    if kernel not in KERNELS:
        raise UsageError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be a positive integer or 'dynamic', not {batch}")


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(module: ExportModule, path: Path, opset: int = 20,
                batch: int | None = None, external_data: bool | None = None) -> list[str]:
    """Write `path` (+ `path.data` for external weights); returns the output names.

    batch None exports a dynamic batch axis (traced at batch 2: a size-1 example would be
    specialised); an int fixes the batch.
    """
    dtype = next(module.parameters()).dtype
    names = module.output_names()
    example = torch.randn(batch or 2, *module.pixel_shape, dtype=dtype)
    dynamic = None if batch else {INPUT_NAME: {0: torch.export.Dim("batch")}}
    if external_data is None:
        external_data = parameter_bytes(module) >= EXTERNAL_DATA_BYTES
    program = run_exporter(module, (example,), [INPUT_NAME], names, dynamic, opset)
    program.save(str(path), external_data=external_data)
    return names


def _gather_tokens_onnx(x, index):
    """turbo::gather_tokens: x (B, N, C), index (B, K, 1) -> (B, K, C) in one node."""

    return op.GatherND(x, index, batch_dims=1)


def run_exporter(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                 dynamic_shapes: dict | tuple | None, opset: int):
    """torch.onnx.export (dynamo) without its chatter; an ONNXProgram, or ExportError in one line."""
    chatter = io.StringIO()
    # e.g. "torchvision is not installed. Skipping ...", "Skipped deduplication of initializer ..."
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        # a failed first attempt (non-strict torch.export) prints its graph before the strict one succeeds
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                module.eval(), args, input_names=input_names, output_names=output_names,
                opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False,
                custom_translation_table={torch.ops.turbo.gather_tokens.default: _gather_tokens_onnx},
            )
    except Exception as exc:  # the exporter's errors are long; the first line says what failed
        sys.stderr.write(chatter.getvalue())
        raise ExportError(f"torch.onnx.export failed: {describe_error(exc)}") from exc
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


@dataclass(frozen=True)
class GraphSpec:
    """One graph of a set that shares weights: its module, example inputs and names."""

    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict | tuple | None
    file: str


def export_sharing_weights(graphs: list[GraphSpec], directory: Path, weights_file: str, opset: int,
                           transform: Callable[[dict], None] | None = None) -> dict[str, int]:
    """Export each graph into `directory`, their weights stored once in `weights_file`;
    `transform` may rewrite the loaded protos (path -> ModelProto) first. Returns the bytes
    written and shared."""
    with tempfile.TemporaryDirectory() as scratch:
        protos = {}
        for graph in graphs:
            program = run_exporter(graph.module, graph.args, graph.input_names, graph.output_names,
                                   graph.dynamic_shapes, opset)
            program.save(str(Path(scratch) / graph.file), external_data=True)
            protos[directory / graph.file] = onnx.load(str(Path(scratch) / graph.file))
        if transform is not None:
            transform(protos)
        return save_with_shared_weights(protos, directory / weights_file)


def fold_merge_ops(path: Path, kernel: str) -> None:
    """Rewrite `path` with one `turbo::TurboMerge` function node per merge block (in place;
    external weights stay external)."""

    rewrite_onnx(path, lambda model: fold_merge_blocks(model, kernel))


def rewrite_onnx(path: Path, transform) -> None:
    """Apply `transform` (ModelProto -> ModelProto) to the model at `path`, in place; weights that
    were external stay external."""

    data = path.with_name(path.name + ".data")
    model = transform(onnx.load(str(path)))
    external = data.exists()
    if external:
        data.unlink()  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)
