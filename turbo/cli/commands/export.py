"""`turbo export`: stages with progress on stderr, the validation table, the manifest as JSON."""

import contextlib
import shlex
import sys
import time
from collections.abc import Iterator

from rich.markup import escape
from rich.table import Table

from turbo.cli.output import fail, print_json, stderr


def _digits(text: str) -> bool:
    """Only 0-9 ('²'.isdigit() is True, but int('²') fails)."""
    return text.isascii() and text.isdigit()


def parse_batch(text: str) -> int | None:
    """'dynamic' -> None (dynamic batch axis); a positive integer -> a static batch."""
    from turbo.core.errors import UsageError

    if text == "dynamic":
        return None
    if not _digits(text) or int(text) < 1:
        raise UsageError(f"--batch takes a positive integer or 'dynamic', not {text!r}")
    return int(text)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'224' -> (224, 224), '224x320' -> (224, 320) (height x width), None -> None (the model's)."""
    from turbo.core.errors import UsageError

    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(_digits(part) and int(part) > 0 for part in parts):
        raise UsageError(f"--image-size takes H or HxW in pixels (like 224 or 224x320), not {text!r}")
    height, width = (int(parts[0]), int(parts[-1]))
    return height, width


def given(**options) -> dict:
    """The options the user gave (those not left at None)."""
    return {name: value for name, value in options.items() if value is not None}


def parse_r(r: str | None, data: str | None, max_drop: float | None, metric: str | None = None,
            choosing: bool = False) -> int | str | None:
    """`--r N` -> N, `--r auto` -> "auto" (with --data and --max-drop), no --r -> None (the model's).
    `choosing`: --method auto or --alpha auto, which need --data too."""
    from turbo.core.errors import UsageError

    if r != "auto":
        if max_drop is not None:
            raise UsageError("--max-drop belongs to --r auto")
        if not choosing and (data is not None or metric is not None):
            raise UsageError("--data and --metric belong to --r auto, --method auto and --alpha auto")
        if choosing and data is None:
            raise UsageError("--method auto and --alpha auto need --data IMAGES to choose on")
        if r is not None and not _digits(r):
            raise UsageError(f"--r takes a non-negative integer or 'auto', not {r!r}")
        return None if r is None else int(r)
    if data is None or max_drop is None:
        raise UsageError("--r auto needs --data IMAGES and --max-drop X")
    return "auto"


def _progress(message: str) -> None:
    stderr.print(f"[dim]{escape(message)}[/]", highlight=False)


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    begin = time.perf_counter()
    with stderr.status(f"[bold]{name}[/] …"):
        yield
    stderr.print(f"[green]✓[/] {name} ({time.perf_counter() - begin:.1f} s)", highlight=False)


def _validation_table(validation: dict) -> Table:
    table = Table(title=f"validation: {validation['candidate']} vs {validation['reference']}")
    for column in ("run", "check", "batch", "shape", "max abs diff", "atol", "result"):
        table.add_column(column, justify="right" if column in ("batch", "max abs diff", "atol") else "left")

    def verdict(passed: bool) -> str:
        return "[green]PASSED[/]" if passed else "[bold red]FAILED[/]"

    for check in validation["outputs"]:
        shape = "×".join(map(str, check["actual_shape"]))
        if check["actual_shape"] != check["expected_shape"]:
            shape += f" (expected {'×'.join(map(str, check['expected_shape']))})"
        name = check["name"]
        if check["flipped_samples"]:
            name += f" ({check['flipped_samples']} flipped: {check['flipped_max_abs_diff']:.1e}, not gated)"
        table.add_row(check["run"], name, str(check["batch"]), shape, f"{check['max_abs_diff']:.2e}",
                      f"{check['atol']:.0e}", verdict(check["passed"]))
    for check in validation["merge_decisions"]:
        gate = "0" if check["gated"] else "not gated"
        table.add_row(check["run"], "merge decisions", str(check["batch"]), "",
                      f"{check['tokens_differing']} of {check['tokens']} sizes differ", gate, verdict(check["passed"]))
    for check in validation.get("captions", []):
        gate = "0" if check["gated"] else "not gated"
        table.add_row(check["run"], "generated tokens", str(check["batch"]), "",
                      f"{check['sequences_differing']} of {check['batch']} sequences differ", gate,
                      verdict(check["passed"]))
    for check in validation.get("quality", []):
        gate = f"≥ {check['minimum']:g}" if check["gated"] else "not gated (random weights)"
        table.add_row("quantized vs fp32", check["name"], "", "", f"{check['value']:.4f}", gate,
                      verdict(check["passed"]))
    table.add_row("", "output names", "", "", "", "", verdict(validation["names_match"]))
    table.add_row("", "onnx.checker (full)", "", "", "", "", verdict(validation["onnx_checker"] == "passed"))
    table.add_row("", "graph vs plan", "", "", "", "", verdict(not validation["graph_problems"]))
    return table


def run_export_command(options, auto, output: str, force: bool, json_output: bool) -> None:
    from turbo.core.errors import EXIT_MISSING_RUNTIME, EXIT_VALIDATION
    from turbo.tools.eval import export_with_choice

    result = export_with_choice(options, output, auto, force, _stage, shlex.join(["turbo", *sys.argv[1:]]), _progress)
    manifest = result.manifest
    if manifest.turbo.merge_auto:
        from turbo.cli.commands.eval import print_choice

        print_choice(manifest.turbo.merge_auto)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    validation = manifest.validation
    if not validation.get("skipped"):
        stderr.print(_validation_table(validation))
        for problem in [validation["onnx_checker"], validation["runtime_error"], *validation["graph_problems"]]:
            if problem and problem != "passed":
                stderr.print(f"[red]•[/] {escape(problem)}", highlight=False)
    plan = manifest.plan
    status = {"passed": "validation PASSED", "failed": "validation FAILED"}.get(
        manifest.status, "not validated (--no-validate)")
    decoder = " + question encoder and answer decoder (fp32, with past)" if manifest.question is not None else \
        " + text decoder (fp32, with past)" if manifest.decoder is not None else \
        " + text encoder (fp32)" if manifest.text is not None else ""
    onnx_info = manifest.onnx
    stderr.print(f"wrote {result.directory}{decoder}: {onnx_info.precision}, opset {onnx_info.opset}, "
                 f"{plan.final_tokens} of {plan.tokens_in} tokens, FLOPs bound {plan.speedup_bound:.2f}x, "
                 f"{status}", highlight=False)
    engine = manifest.tensorrt
    if engine is not None and engine.built:
        build = engine.build
        if build.get("validation"):
            stderr.print(_validation_table(build["validation"]))
        stderr.print(f"wrote {result.directory}/{engine.file}: TensorRT {build['tensorrt']} on {build['device']}, "
                     f"merge {build['merge']}, batch {'/'.join(map(str, build['batch_profile']))}, "
                     f"built in {build['build_seconds']} s", highlight=False)
        decoder = engine.decoder
        if decoder and decoder["built"]:
            files = ", ".join(e["file"] for e in decoder["engines"].values())
            stderr.print(f"wrote decoder engines {files}: profile "
                         + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in decoder["ranges"].items()),
                         highlight=False)
        elif decoder:
            stderr.print(f"no decoder engines: {decoder['reason']}", highlight=False)
    if json_output:
        print_json(manifest.to_dict())
    if not result.passed:
        fail(f"validation failed; {result.directory}/turbo.json records the failure", EXIT_VALIDATION)
    if result.engine_missing:
        fail(f"no TensorRT engine: {result.engine_missing}; the validated ONNX is in {result.directory}",
             EXIT_MISSING_RUNTIME)
