"""TokenMerge: one layer's merge step as its own module (so exported graphs can find it), with
the weighted merge itself as a child module: the subgraph the TurboMerge node and plugin replace."""

from typing import Protocol

import torch
from torch import nn

from turbo.merging.matching import MergeConfig, information_degree, select_merges
from turbo.merging.merge import KERNELS, merge_tokens, pack_indices
from turbo.merging.pitome import merge_sets, pitome_sets


class FusedStep(Protocol):
    """A whole-step kernel a runtime may install on TokenMerge (turbo/kernels/torch_merge_kernel.py): the
    CLS attention row, scores, selection and weighted merge in one call, for the inputs it accepts."""

    def accepts(self, x: torch.Tensor, config: MergeConfig) -> bool: ...

    def __call__(self, x: torch.Tensor, size: torch.Tensor | None, query: torch.Tensor, keys: torch.Tensor, r: int,
                 config: MergeConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...


# The method codes of the fused steps (turbo/kernels/merge_core.c METHOD_*, turbo/kernels/triton_turbo_step.py METHOD).
FUSED_METHODS = {("tome", "s1"): 0, ("tome", "s2"): 0, ("semantic", "s1"): 1, ("semantic", "s2"): 1,
                 ("turbo", "s1"): 2, ("turbo", "s2"): 3}


def fused_step_may_run(x: torch.Tensor, config: MergeConfig) -> bool:
    """Whether a fused step may replace the ops for x at all: a known method, no autograd, not
    exporting or compiling (each step adds its own device and dtype rules)."""
    return ((config.method, config.fusion) in FUSED_METHODS and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_exporting() and not torch.compiler.is_compiling())


def check_step_inputs(x: torch.Tensor, size: torch.Tensor | None, query: torch.Tensor, keys: torch.Tensor, r: int,
                      step: str) -> None:
    """ValueError unless x (B, N, C), size (B, N, 1) or None, query and keys (B, H, N, d) and r fit."""
    batch, tokens, _ = x.shape
    if (query.shape != keys.shape or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != tokens
            or (size is not None and size.shape != (batch, tokens, 1)) or not 0 < r <= (tokens - 1) // 2):
        sizes = None if size is None else tuple(size.shape)
        raise ValueError(f"{step}: x {tuple(x.shape)}, size {sizes}, query {tuple(query.shape)}, "
                         f"keys {tuple(keys.shape)} and r={r} do not fit")


class WeightedMerge(nn.Module):
    """(x, size, packed indices) -> merged x and size; the kernel form is fixed at build time (r
    follows from the shapes)."""

    def __init__(self, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor, size: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C), size: (B, N, 1), index: (B, Na + r) from `pack_indices`."""
        return merge_tokens(x, size, index, self.kernel)  # (B, N - r, C), (B, N - r, 1)


class SetMerge(nn.Module):
    """(x, size, explicit positions) -> merged x and size: PiToMe's merge, whose sides are chosen
    per image (turbo/merging/pitome.py); exported as plain ops, not as a TurboMerge node."""

    def __init__(self, kernel: str) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor, size: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C), size: (B, N, 1), index: (B, N - 1 + r) from `pitome_sets`."""
        return merge_sets(x, size, index, index.shape[-1] - x.shape[1] + 1, self.kernel)  # (B, N - r, ·)


class TokenMerge(nn.Module):
    """Merges a fixed number r of tokens; r is a Python int fixed at build time. `margin` is PiToMe's
    energy margin for this layer (turbo.merging.pitome.layer_margin; unused by the other methods)."""

    def __init__(self, r: int, config: MergeConfig, kernel: str = "matmul", margin: float = 0.9) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.r = r
        self.config = config
        self.kernel = kernel
        self.margin = margin
        self.merge = SetMerge(kernel) if config.method == "pitome" else WeightedMerge(kernel)
        self.fused_step: FusedStep | None = None

    def fused_step_for(self, x: torch.Tensor) -> FusedStep | None:
        """The installed whole-step kernel when it runs this input, else None (forward's ops run)."""
        step = self.fused_step
        return step if step is not None and self.r > 0 and step.accepts(x, self.config) else None

    @property
    def needs_cls_attention(self) -> bool:
        """Whether forward reads cls_attn (callers may skip computing it otherwise)."""
        return self.r > 0 and self.config.method in ("turbo", "semantic")

    def forward(
        self, x: torch.Tensor, size: torch.Tensor | None, keys: torch.Tensor, cls_attn: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C), size: (B, N, 1) or None, keys: (B, H, N, d) or head-averaged (B, N, d),
        cls_attn: (B, N), or None when `needs_cls_attention` is false."""
        if size is None:  # every token stands for one patch; computed from x so that exporters
            size = x[..., :1] * 0 + 1  # keep it a run-time input of the merge, even with static shapes
        cap = (x.shape[1] - 1) // 2
        if not 0 <= self.r <= cap:
            raise ValueError(f"r={self.r} outside 0..{cap} for {x.shape[1]} tokens")
        if self.r == 0:
            return x, size
        metric = keys.mean(dim=1) if keys.dim() == 4 else keys  # (B, N, d)
        if self.config.method == "pitome":
            return self.merge(x, size, pitome_sets(metric, self.r, self.margin))  # (B, N - r, C)
        degree, best = information_degree(metric, cls_attn, self.config)
        src_idx, dst_idx, unm_idx = select_merges(degree, best, self.r)
        return self.merge(x, size, pack_indices(src_idx, dst_idx, unm_idx))  # (B, N - r, C)

    def extra_repr(self) -> str:
        c = self.config
        if c.method == "pitome":
            return f"r={self.r}, method=pitome, margin={self.margin:.3f}, kernel={self.kernel}"
        return f"r={self.r}, method={c.method}, alpha={c.alpha}, fusion={c.fusion}, kernel={self.kernel}"
