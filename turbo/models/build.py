"""From user choices to a plan and a patched model: the one path export, bench and plan share."""

import warnings
from dataclasses import dataclass

from torch import nn

from turbo.core.errors import TurboNote, UsageError
from turbo.merging.matching import CLS_METHODS, MergeConfig
from turbo.merging.plan import TokenPlan, make_plan
from turbo.merging.schedule import parse_schedule
from turbo.models.adapters import as_pair
from turbo.models.loading import ModelSource, load_model, resolve_source
from turbo.models.patch import TurboState, apply_turbo


@dataclass
class BuiltPlan:
    source: ModelSource
    plan: TokenPlan
    merge_config: MergeConfig
    schedule: str | list[int]
    r_requested: int
    image_size: tuple[int, int]  # the exported (height, width): the model's input size unless overridden

    @property
    def interpolate_pos_encoding(self) -> bool:
        """Whether the position embeddings must be resized to `image_size`."""
        return self.image_size != self.source.adapter.image_size(self.source.config)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input image, from the config and the export's size."""
        return self.source.adapter.arch_spec(self.source.config).channels, *self.image_size

    @property
    def r_text(self) -> str:
        """How the user asked for r: `16`, `8 (decreasing)` or the explicit list."""
        if isinstance(self.schedule, list):
            return ",".join(map(str, self.schedule))
        return str(self.r_requested) if self.schedule == "constant" else f"{self.r_requested} ({self.schedule})"

    def to_dict(self) -> dict:
        return {
            "model": self.source.name,
            "hf_id": self.source.location,
            "architecture": self.source.architecture,
            "alpha": self.merge_config.alpha,
            "fusion": self.merge_config.fusion,
            "schedule": self.schedule,
            "r_requested": self.r_requested,
            "image_size": list(self.image_size),
            **self.plan.to_dict(),
        }


def build_plan(model: str, r: int | None = None, method: str | None = None, alpha: float | None = None,
               schedule: str = "constant", threshold: int | None = None, fusion: str = "s1",
               tiny: bool = False, image_size: int | tuple[int, int] | None = None) -> BuiltPlan:
    """Resolve the model and the user's choices into a plan; bad choices raise UsageError."""
    source = resolve_source(model, tiny=tiny)
    r = source.default_r if r is None else r
    method = method or source.method
    if method in CLS_METHODS and not source.adapter.has_cls_token(source.config):
        raise UsageError(f"--method {method} needs a CLS token, whose attention gives the semantic term; "
                         f"{source.adapter.family} models have none: use --method tome")
    image_size = _check_image_size(source, image_size)
    try:
        config = MergeConfig(method, source.alpha if alpha is None else alpha, fusion)
        parsed = parse_schedule(schedule)
        plan = make_plan(source.adapter.arch_spec(source.config, image_size), r, parsed,
                         source.threshold if threshold is None else threshold, method)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if r > 0 and method != "none" and not any(plan.r):
        warnings.warn(f"nothing merges: every layer enters with fewer than --threshold {plan.threshold} tokens "
                      f"({plan.tokens_in} at most); lower --threshold to merge", TurboNote, stacklevel=2)
    return BuiltPlan(source, plan, config, parsed, r, image_size)


def _check_image_size(source: ModelSource, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The export's (height, width): the model's input size, or the user's if the model can take it.
    A size the patch size does not divide loses its remainder rows and columns, as upstream does."""
    if image_size is None:
        image_size = source.input_size
    height, width = as_pair(image_size)
    native = source.adapter.image_size(source.config)
    patch = source.adapter.patch_size(source.config)
    if height < patch[0] or width < patch[1]:
        raise UsageError(f"--image-size {height}x{width} is smaller than one patch ({patch[0]}x{patch[1]}); "
                         f"the model's own size is {native[0]}x{native[1]}")
    grid = (native[0] // patch[0], native[1] // patch[1])
    if (height, width) != native and grid[0] != grid[1]:
        raise UsageError(f"--image-size {height}x{width}: the model's {grid[0]}x{grid[1]} position embeddings are "
                         f"not square, so transformers cannot resize them; export at its own size "
                         f"{native[0]}x{native[1]}")
    return height, width


def build_merged_model(built: BuiltPlan, random_weights: bool = False, kernel: str = "matmul",
                       seed: int = 0) -> tuple[nn.Module, TurboState]:
    """Load (or randomly initialise) the model and patch it with the plan."""
    model = load_model(built.source, random_weights=random_weights, seed=seed)
    state = apply_turbo(model, built.source.adapter, built.plan, built.merge_config, kernel)
    return model, state
