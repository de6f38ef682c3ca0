"""The `turbo` command line. Commands parse, call and present; heavy imports stay inside them."""

import typer

from turbo_cli import __version__
from turbo_cli.output import user_errors

app = typer.Typer(
    help="Turbo token merging for ViT and BLIP: plan, export and profile merged models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"turbo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Exit codes: 0 ok, 1 error, 2 usage, 3 validation failed, 4 missing GPU or TensorRT."""


@app.command("models")
@user_errors
def models_command(
    json_output: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the model registry: name, HF id, image size, tokens, layers, default r and alpha."""
    from turbo_cli.commands.models import run_models

    run_models(json_output)


@app.command("plan")
@user_errors
def plan_command(
    model: str = typer.Option("blip-caption", "--model", "-m", help="Registry name, HF id or local model directory."),
    r: int | None = typer.Option(None, "--r", help="Tokens merged per layer (default: the model's)."),
    method: str = typer.Option("turbo", "--method", help="turbo | tome | semantic | none."),
    alpha: float | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing | per-layer list like 8,8,4,4."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Per-layer tokens and FLOPs, final tokens and the FLOPs speedup bound. Needs no weights."""
    from turbo_cli.commands.plan import run_plan

    run_plan(model, r, method, alpha, schedule, threshold, json_output)


@app.command("export")
@user_errors
def export_command(
    output: str = typer.Option(..., "--output", "-o", help="Output directory (refused if not empty, unless --force)."),
    model: str = typer.Option("blip-caption", "--model", "-m", help="Registry name, HF id or local model directory."),
    r: int | None = typer.Option(None, "--r", help="Tokens merged per layer (default: the model's)."),
    method: str = typer.Option("turbo", "--method", help="turbo | tome | semantic | none."),
    alpha: float | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's)."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing | per-layer list like 8,8,4,4."),
    merge_kernel: str = typer.Option("matmul", "--merge-kernel", help="matmul (no scatter ops) | scatter."),
    opset: int = typer.Option(20, "--opset", help="ONNX opset, 18..23."),
    batch: str = typer.Option("dynamic", "--batch", help="Static batch size, or 'dynamic' for a dynamic batch axis."),
    image_size: int | None = typer.Option(None, "--image-size", help="Input resolution (default: the model's)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 (half-precision graph for GPU runtimes)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights from the config (speed work)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime with PyTorch."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest (turbo.json) on stdout."),
) -> None:
    """Export the merged model to validated, static-shape ONNX with a turbo.json manifest.

    Exit code 3 when validation fails (the directory is still written, its manifest says failed).
    """
    from exporters.export import ExportOptions
    from turbo_cli.commands.export import parse_batch, run_export_command

    options = ExportOptions(model=model, r=r, method=method, alpha=alpha, threshold=threshold, schedule=schedule,
                            kernel=merge_kernel, opset=opset, batch=parse_batch(batch), image_size=image_size,
                            precision=precision, random_weights=random_weights, validate=validate)
    run_export_command(options, output, force, json_output)


def main() -> None:
    app(prog_name="turbo")
