"""Presentation helpers: Rich on stderr, JSON on stdout, one-line errors with exit codes."""

import functools
import json
import math
import sys
import warnings
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from turbo.core.manifest import finite

# typer's parse errors (its vendored click's, or click's in older typer), found without private imports
CLICK_ERROR = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")

stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def print_json(payload: dict) -> None:
    """Strict JSON on stdout: a non-finite number (a NaN metric) is written as null."""
    sys.stdout.write(json.dumps(finite(payload), indent=2, allow_nan=False) + "\n")


def fail(message: str, exit_code: int) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code)


# int options where 0 means something
ZERO_IS_VALID = {"r", "threshold", "min_length", "calib_seed", "itm_rerank", "max_queue_delay_us"}
POSITIVE = {"duration", "workspace"}  # float options where 0 does not


def check_numbers(options: dict) -> None:
    """Refuse, at parse time and naming the option, a non-finite float, a negative number, and a
    zero count or size (every number an option takes is a count, a size, a time, a weight or a
    bound)."""
    from turbo.core.errors import UsageError

    for name, value in options.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if isinstance(value, int) and name not in ZERO_IS_VALID and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
        if value < 0 or (name in POSITIVE and value == 0):
            raise UsageError(f"{flag} must be {'above' if name in POSITIVE else 'at least'} 0, got {value}")


def user_errors(command: Callable) -> Callable:
    """Turn TurboError into one line on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from turbo.core.errors import TurboError, TurboNote

        def show(message, category, *_args, **_kwargs) -> None:
            if issubclass(category, TurboNote):
                stderr.print(f"[yellow]note:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

        try:
            check_numbers(kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("once", TurboNote)
                warnings.showwarning = show
                return command(*args, **kwargs)
        except TurboError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


class OneLineUsageErrors(TyperGroup):
    """Typer's own errors (an unknown option, a value that is not a number) as one line, like ours:
    `error: MESSAGE (see turbo CMD --help)`, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `turbo` alone: its help
                exc.show()
                sys.exit(exc.exit_code)
            context = getattr(exc, "ctx", None)
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            message = " ".join(exc.format_message().split()).rstrip(".")
            stderr.print(f"[bold red]error:[/] {escape(message + hint)}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            stderr.print("Aborted!", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
