"""Open an export directory the way every command must: its manifest typed, its files the ones
the export wrote, its graph the one the manifest describes."""

from pathlib import Path

from turbo.core.files import MANIFEST_FILE, TOKEN_SIZES
from turbo.core.integrity import IntegrityError, verify_files
from turbo.core.manifest import Manifest, read_export_manifest
from turbo.graph.summary import GraphSummary, summarize


def open_export(directory: str | Path) -> Manifest:
    """The manifest of a verified export; ManifestError (exit 2) or IntegrityError (exit 3), in one
    line, when the directory is not an export, a file changed, or the graph is not the manifest's."""
    directory = Path(directory)
    manifest = read_export_manifest(directory)
    verify_files(directory, manifest.files)
    problems = manifest_mismatches(summarize(directory / manifest.onnx.file), manifest)
    if problems:
        raise IntegrityError(f"{directory / manifest.onnx.file} is not the graph {MANIFEST_FILE} describes "
                             f"({problems[0]}); re-export the directory")
    return manifest


def manifest_mismatches(summary: GraphSummary, manifest: Manifest) -> list[str]:
    """Where the graph disagrees with the manifest: its onnx record (merge r, inputs, outputs,
    opset) and its plan (merge r per block, token dims)."""
    problems = []
    planned = [r for r in manifest.plan.r if r > 0]
    found = [block.r for block in summary.merge_blocks]
    if found != planned:
        problems.append(f"its merge blocks have r {found}, the plan {planned}")
    graph = summary.to_dict()
    problems += [f"its {key} differ from the manifest's onnx.{key}" for key in ("merge_r", "inputs", "outputs")
                 if graph[key] != getattr(manifest.onnx, key)]
    if summary.opset != manifest.onnx.opset:
        problems.append(f"its opset is {summary.opset}, the manifest's {manifest.onnx.opset}")
    held, final = manifest.onnx.output_tokens, manifest.plan.final_tokens
    for output in summary.outputs:
        tokens = output.shape[1] if len(output.shape) == 3 or output.name == TOKEN_SIZES else None
        expected = held.expected(output.name, final)
        if tokens is not None and not held.holds(output.name, tokens, final):
            problems.append(f"output {output.name} has {tokens} tokens, the plan "
                            f"{'a count decided per image' if expected is None else expected}")
    return problems
