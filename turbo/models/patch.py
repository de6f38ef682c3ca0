"""Patch a transformers encoder so each block runs proportional attention and a TokenMerge.

Like ToMe's patches, blocks get a subclass (state-dict names unchanged). A block whose r is 0
and that sees unmerged tokens runs the upstream forward untouched, so r=0 equals upstream
bit for bit.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from turbo.core.errors import PatchError
from turbo.merging.attention import proportional_attention
from turbo.merging.matching import MergeConfig
from turbo.merging.module import TokenMerge
from turbo.merging.pitome import layer_margin
from turbo.merging.plan import TokenPlan
from turbo.merging.protect import full_sequence, merge_view, set_aside
from turbo.models.adapters import FamilyAdapter


@dataclass
class TurboState:
    """Shared by the blocks of one model during a forward; reset by block 0."""

    size: torch.Tensor | None = None  # (B, N, 1): patches each token stands for
    token_counts: list[tuple[int, int]] = field(default_factory=list)  # (entering, leaving) per block
    protected: int = 1  # leading tokens never merged (the plan's protected_tokens)

    def reset(self) -> None:
        self.size = None
        self.token_counts = []


_TURBO_CLASSES: dict[type, type] = {}


def _turbo_class(base: type[nn.Module], adapter: FamilyAdapter) -> type[nn.Module]:
    if base in _TURBO_CLASSES:
        return _TURBO_CLASSES[base]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state: TurboState = self.turbo_state
        if self.turbo_index == 0:
            state.reset()
        tokens_in = hidden_states.shape[1]
        if self.turbo_merge.r == 0 and state.size is None:
            out = base.forward(self, hidden_states, *args, **kwargs)
        else:
            out = turbo_block(self, adapter, hidden_states, state)
        state.token_counts.append((tokens_in, out.shape[1]))
        return out

    cls = type(f"Turbo{base.__name__}", (base,), {"forward": forward, "turbo_family": adapter.family})
    _TURBO_CLASSES[base] = cls
    return cls


def turbo_block(layer: nn.Module, adapter: FamilyAdapter, hidden: torch.Tensor, state: TurboState) -> torch.Tensor:
    """Pre-norm block: x + attn(norm1(x)) → merge → x + mlp(norm2(x))."""
    parts = adapter.block_parts(layer)
    q, k, v = parts.qkv(parts.norm1(hidden))  # 3×(B, H, N, d)
    merge = layer.turbo_merge
    # Whole-step kernels protect CLS alone; other protected counts run the merge's ops.
    fused_step = merge.fused_step_for(hidden) if state.protected == 1 else None  # computes the CLS row itself
    context, cls_attn = proportional_attention(q, k, v, state.size, parts.scale, parts.fused_attention,
                                               cls_row=merge.needs_cls_attention and fused_step is None)
    hidden = hidden + parts.out_proj(context)
    if fused_step is not None:
        hidden, state.size = fused_step(hidden, state.size, q, k, merge.r, merge.config, parts.scale)
    elif state.protected == 1:
        hidden, state.size = merge(hidden, state.size, k, cls_attn)  # (B, N - r, C)
    else:
        hidden, state.size = _merge_around_protected(merge, hidden, state.size, k, cls_attn, state.protected)
    return hidden + parts.mlp(parts.norm2(hidden))


def _merge_around_protected(merge: TokenMerge, hidden: torch.Tensor, size: torch.Tensor | None, keys: torch.Tensor,
                            cls_attn: torch.Tensor | None, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge with `protected` leading tokens kept as they are: (B, N, C) -> (B, N - r, C)."""
    if size is None:
        size = hidden[..., :1] * 0 + 1  # (B, N, 1), a run-time tensor as in TokenMerge
    metric = keys.mean(dim=1)  # (B, N, d)
    view_cls = None if cls_attn is None else merge_view(cls_attn, protected)
    merged, merged_size = merge(merge_view(hidden, protected), merge_view(size, protected),
                                merge_view(metric, protected), view_cls)
    return (full_sequence(merged, set_aside(hidden, protected), protected),
            full_sequence(merged_size, set_aside(size, protected), protected))


def is_patched(layer: nn.Module) -> bool:
    return type(layer) in _TURBO_CLASSES.values()


def apply_turbo(
    model: nn.Module, adapter: FamilyAdapter, plan: TokenPlan, config: MergeConfig, kernel: str = "matmul"
) -> TurboState:
    """Patch every encoder block with its planned r; prove that each block was patched."""
    layers = adapter.encoder_layers(model)
    if len(layers) != len(plan.layers):
        raise PatchError(f"the plan has {len(plan.layers)} layers but the model has {len(layers)} encoder blocks")
    expected = adapter.layer_class()
    expected = expected if isinstance(expected, tuple) else (expected,)
    state = TurboState(protected=plan.protected_tokens)
    for index, layer in enumerate(layers):
        base = type(layer).__mro__[1] if is_patched(layer) else type(layer)
        if base not in expected:
            raise PatchError(
                f"encoder block {index} is {base.__name__}, not {' or '.join(c.__name__ for c in expected)}: "
                "this transformers version is not supported by the turbo patch"
            )
        layer.__class__ = _turbo_class(base, adapter)
        layer.turbo_index = index
        layer.turbo_state = state
        layer.turbo_merge = TokenMerge(plan.layers[index].r, config, kernel, layer_margin(index, len(layers)))
    patched = sum(is_patched(module) for module in model.modules())
    if patched != len(plan.layers):
        raise PatchError(f"patched {patched} blocks but the model has {len(plan.layers)} layers")
    model.turbo_state = state
    model.turbo_plan = plan
    return state
