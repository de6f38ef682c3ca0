"""Errors meant for the user: one line, and the exit code the CLI returns for them."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VALIDATION = 3
EXIT_MISSING_RUNTIME = 4


class TurboError(Exception):
    """A problem the user can fix; its message is the whole story."""

    exit_code = EXIT_ERROR


class UsageError(TurboError):
    """Bad arguments: unknown model, impossible r, malformed schedule."""

    exit_code = EXIT_USAGE


class TurboNote(UserWarning):
    """Something the user should know once that is not an error (the CLI prints it as a note)."""


class ModelLoadError(TurboError):
    """Weights or config could not be loaded."""


class PatchError(TurboError):
    """The Turbo patch did not apply to every encoder block."""


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """`Class: first line of the message`, for errors whose full text is long (exporter, checker,
    ONNX Runtime, compilers): enough to say what failed in one line."""
    first = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__
