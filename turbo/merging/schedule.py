"""r schedules: how many tokens each layer is asked to merge."""

from collections.abc import Sequence

SCHEDULES = ("constant", "decreasing")


def resolve_schedule(num_layers: int, r: int, schedule: str | Sequence[int] = "constant") -> list[int]:
    """Per-layer requested r, before the plan's caps and threshold.

    constant: r in every layer. decreasing: ToMe's linear ramp from 2r down to 0 (inflection −1),
    about r per layer on average. A sequence: one r per layer, given explicitly.
    """
    if not isinstance(schedule, str):
        values = [int(v) for v in schedule]
        if len(values) != num_layers:
            raise ValueError(f"the schedule lists {len(values)} values but the model has {num_layers} layers")
    elif schedule == "constant":
        values = [r] * num_layers
    elif schedule == "decreasing":
        step = 2 * r / max(num_layers - 1, 1)
        values = [int(2 * r - step * i) for i in range(num_layers)]
    else:
        raise ValueError(
            f"unknown schedule {schedule!r}; use {', '.join(SCHEDULES)} or a comma-separated list of per-layer r"
        )
    if any(v < 0 for v in values):
        raise ValueError(f"r must be >= 0 in every layer, got {values}")
    return values


def parse_schedule(text: str) -> str | list[int]:
    """`constant`, `decreasing`, or `8,8,4,…` from the command line."""
    if text in SCHEDULES:
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--schedule {text!r} is neither {' nor '.join(SCHEDULES)} nor a comma-separated list of integers"
        ) from None
