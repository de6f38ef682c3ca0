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


def main() -> None:
    app(prog_name="turbo")
