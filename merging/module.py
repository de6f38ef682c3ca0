"""TokenMerge: one layer's merge step as its own module (so exported graphs can find it)."""

import torch
from torch import nn

from merging.matching import MergeConfig, information_degree, select_merges
from merging.merge import KERNELS, merge_tokens


class TokenMerge(nn.Module):
    """Merges a fixed number r of tokens; r is a Python int fixed at build time."""

    def __init__(self, r: int, config: MergeConfig, kernel: str = "matmul") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.r = r
        self.config = config
        self.kernel = kernel

    def forward(
        self, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, cls_attn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C), size: (B, N, 1) or None, metric: (B, N, d), cls_attn: (B, N)."""
        if size is None:
            size = torch.ones_like(x[..., :1])
        cap = (x.shape[1] - 1) // 2
        if not 0 <= self.r <= cap:
            raise ValueError(f"r={self.r} outside 0..{cap} for {x.shape[1]} tokens")
        if self.r == 0:
            return x, size
        degree, best = information_degree(metric, cls_attn, self.config)
        src_idx, dst_idx, unm_idx = select_merges(degree, best, self.r)
        return merge_tokens(x, size, src_idx, dst_idx, unm_idx, self.kernel)  # (B, N - r, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"r={self.r}, method={c.method}, alpha={c.alpha}, fusion={c.fusion}, kernel={self.kernel}"
