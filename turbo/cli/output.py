"""Presentation helpers: Rich on stderr, JSON on stdout, one-line errors with exit codes."""

import functools
import json
import sys
import warnings
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from turbo.core.manifest import finite

stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def print_json(payload: dict) -> None:
    """Strict JSON on stdout: a non-finite number (a NaN metric) is written as null."""
    sys.stdout.write(json.dumps(finite(payload), indent=2, allow_nan=False) + "\n")


def fail(message: str, exit_code: int) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code)


def user_errors(command: Callable) -> Callable:
    """Turn TurboError into one line on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from turbo.core.errors import TurboError, TurboNote

        def show(message, category, *_args, **_kwargs) -> None:
            if issubclass(category, TurboNote):
                stderr.print(f"[yellow]note:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("once", TurboNote)
                warnings.showwarning = show
                return command(*args, **kwargs)
        except TurboError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper
