"""The token plan: per-layer r, token counts and analytic FLOPs, resolved at build time.

The plan is the single source of truth for what a merged model does: adapters build their
TokenMerge modules from it, and export, manifest and bench report it.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from turbo.merging.matching import METHODS
from turbo.merging.schedule import resolve_schedule


@dataclass(frozen=True)
class ArchSpec:
    """What the plan needs to know of a ViT-style encoder."""

    num_layers: int
    num_tokens: int  # patches + protected tokens
    hidden_size: int
    mlp_size: int
    patch_area: int  # pixels per patch and channel (patch height × width)
    channels: int = 3
    protected_tokens: int = 1  # leading tokens never merged (CLS, distillation, registers); 0: none


@dataclass(frozen=True)
class LayerPlan:
    index: int
    tokens_in: int
    r_requested: int
    r: int  # after the cap and the threshold
    tokens_out: int
    flops: int


@dataclass(frozen=True)
class TokenPlan:
    method: str
    threshold: int
    layers: tuple[LayerPlan, ...]
    patch_embed_flops: int
    baseline_flops: int
    protected_tokens: int = 1

    @property
    def r(self) -> list[int]:
        return [layer.r for layer in self.layers]

    @property
    def tokens_in(self) -> int:
        return self.layers[0].tokens_in

    @property
    def final_tokens(self) -> int:
        return self.layers[-1].tokens_out

    @property
    def flops(self) -> int:
        return self.patch_embed_flops + sum(layer.flops for layer in self.layers)

    @property
    def speedup_bound(self) -> float:
        return self.baseline_flops / self.flops

    @property
    def clamped_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.r != layer.r_requested]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "protected_tokens": self.protected_tokens,
            "r": self.r,
            "tokens_in": self.tokens_in,
            "final_tokens": self.final_tokens,
            "flops": self.flops,
            "baseline_flops": self.baseline_flops,
            "speedup_bound": round(self.speedup_bound, 4),
            "clamped_layers": self.clamped_layers,
            "layers": [asdict(layer) for layer in self.layers],
        }


def layer_flops(arch: ArchSpec, tokens_in: int, tokens_out: int) -> int:
    """Multiply-adds ×2 of one block: qkv, attention and projection on the tokens entering,
    the MLP on the tokens left after the merge (the merge itself is not counted)."""
    n, c = tokens_in, arch.hidden_size
    qkv_and_proj = 2 * n * c * 4 * c
    attention = 2 * 2 * n * n * c  # q·kᵀ and attn·v
    mlp = 2 * 2 * tokens_out * c * arch.mlp_size
    return qkv_and_proj + attention + mlp


def max_r(tokens: int, protected: int = 1) -> int:
    """ToMe's cap: at most the A-side size of the mergeable tokens, (tokens − protected) // 2."""
    return max((tokens - protected) // 2, 0)


def make_plan(
    arch: ArchSpec,
    r: int,
    schedule: str | Sequence[int] = "constant",
    threshold: int = 0,
    method: str = "turbo",
) -> TokenPlan:
    """Resolve a schedule into per-layer ints with the caps and the minimum-token threshold.

    Raises ValueError for r < 0, an unknown schedule, or a layer asking for more than its cap
    at the very first layer (no input could ever merge that many); later layers are clamped
    to their cap and the clamp is reported in `clamped_layers`. Method `none` merges nothing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    requested = resolve_schedule(arch.num_layers, r, schedule)
    if method == "none":
        requested = [0] * arch.num_layers
    first_cap = max_r(arch.num_tokens, arch.protected_tokens)
    if requested[0] > first_cap:
        raise ValueError(
            f"r={requested[0]} is more than one layer can merge: {arch.num_tokens} tokens allow at most "
            f"r={first_cap} (use a smaller r)"
        )
    layers, tokens = [], arch.num_tokens
    for index, want in enumerate(requested):
        allowed = 0 if tokens < threshold else min(want, max_r(tokens, arch.protected_tokens))
        layers.append(LayerPlan(index, tokens, want, allowed, tokens - allowed,
                                layer_flops(arch, tokens, tokens - allowed)))
        tokens -= allowed
    patches = arch.num_tokens - arch.protected_tokens
    patch_embed = 2 * patches * arch.channels * arch.patch_area * arch.hidden_size
    baseline = patch_embed + arch.num_layers * layer_flops(arch, arch.num_tokens, arch.num_tokens)
    return TokenPlan(method, threshold, tuple(layers), patch_embed, baseline, arch.protected_tokens)
