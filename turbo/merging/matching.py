"""Information degree (redundancy minus semantic value) and the bipartite merge choice.

Tokens are split by position: CLS at 0 (protected, never merged), side A = even positions
2, 4, …, side B = odd positions 1, 3, …. Only A-side tokens merge, each into its most similar
B-side token.
"""

import math
from dataclasses import dataclass

import torch

METHODS = ("turbo", "tome", "semantic", "pitome", "none")
CLS_METHODS = ("turbo", "semantic")  # the methods whose semantic term reads the CLS token's attention
FUSIONS = ("s1", "s2")
# The authors' code multiplies the CLS-attention term by a hidden 30: their alpha=5 is 150·A.
# `alpha` here has their meaning, so `--alpha 5` reproduces their caption setting.
ALPHA_SCALE = 30.0


@dataclass(frozen=True)
class MergeConfig:
    """How one merge step ranks tokens: method, α (authors' scale) and fusion rule."""

    method: str = "turbo"
    alpha: float = 5.0
    fusion: str = "s1"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")


def information_degree(
    metric: torch.Tensor, cls_attn: torch.Tensor | None, config: MergeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every A-side token and find its best B-side match.

    metric: (B, N, d) head-averaged keys; cls_attn: (B, N) CLS-row attention (unused by tome).
    Returns E (B, Na), larger merges first, and the best match's B-side index (B, Na).
    """
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    a, b = metric[:, 2::2], metric[:, 1::2]  # (B, Na, d), (B, Nb, d)
    redundancy, dst_idx = (a @ b.transpose(-1, -2)).max(dim=-1)  # (B, Na)
    if config.method == "tome":
        return redundancy, dst_idx
    semantic = cls_attn[:, 2::2].to(redundancy.dtype)  # (B, Na)
    if config.method == "semantic":
        return -semantic, dst_idx
    if config.fusion == "s2":
        return redundancy / semantic.clamp_min(torch.finfo(semantic.dtype).tiny), dst_idx
    return redundancy - ALPHA_SCALE * config.alpha * semantic, dst_idx


def select_merges(
    degree: torch.Tensor, dst_idx: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the r A-side tokens with the largest degree, with static shapes (r a Python int).

    Returns src_idx (B, r) and dst_idx (B, r) for the merged tokens, and unm_idx (B, Na - r):
    the unmerged A-side tokens in their original order (deterministic across backends).
    """
    num_a = degree.shape[-1]
    order = degree.topk(num_a, dim=-1).indices  # (B, Na), the largest degree first
    src_idx, unm_idx = order[:, :r], order[:, r:]  # (B, r), (B, Na - r)
    return src_idx, dst_idx.gather(-1, src_idx), ascending(unm_idx)


def ascending(index: torch.Tensor) -> torch.Tensor:
    """Token numbers (B, K) sorted ascending: when exporting, by a TopK of static K (exact in fp32);
    eagerly by one sort launch instead of two casts and a TopK."""
    if index.shape[-1] == 0:
        return index
    if torch.compiler.is_exporting():
        return index.float().topk(index.shape[-1], dim=-1, largest=False).values.long()
    return index.sort(dim=-1).values
