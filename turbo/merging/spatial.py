"""MustDrop's vision-stage spatial merge (Liu et al., 2024): after the tower's first block, each
w×w window of adjacent patch tokens whose mean pairwise cosine similarity reaches a threshold
becomes one token, their mean. Pure torch, no model knowledge."""

import torch
import torch.nn.functional as F
from torch import nn


def window_similarity(patches: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """patches (B, H·W, C) in row-major grid order -> (B, H/w · W/w): each w×w window's mean
    cosine similarity over its ordered pairs of distinct tokens, windows in row-major order."""
    batch, _, channels = patches.shape
    height, width = grid
    tiles = patches.view(batch, height // window, window, width // window, window, channels)
    tiles = tiles.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)  # (B, windows, w², C)
    unit = F.normalize(tiles, dim=-1)
    similarity = unit @ unit.transpose(-1, -2)  # (B, windows, w², w²)
    pairs = window * window * (window * window - 1)
    return (similarity.sum(dim=(-1, -2)) - similarity.diagonal(dim1=-2, dim2=-1).sum(dim=-1)) / pairs


def window_members(grid: tuple[int, int], window: int, device: torch.device | None = None) -> torch.Tensor:
    """(windows, w²): each window's patch indices in the row-major grid, row-major inside it."""
    height, width = grid
    index = torch.arange(height * width, device=device).view(height // window, window, width // window, window)
    return index.permute(0, 2, 1, 3).reshape(-1, window * window)


def spatial_merge(hidden: torch.Tensor, grid: tuple[int, int], window: int, threshold: float) -> torch.Tensor:
    """hidden (B, 1 + H·W, C): the CLS token, then the patch grid. The windows whose similarity
    reaches `threshold` (as many as in the batch's row with fewest, the most similar first) each
    become their tokens' mean. Returns (B, 1 + n_merged + n_rest, C): CLS, the merged windows in
    that order, the other patches in grid order, as MustDrop's code lays them out."""
    cls, patches = hidden[:, :1], hidden[:, 1:]
    batch, tokens, channels = patches.shape
    similarity = window_similarity(patches, grid, window)  # (B, windows)
    count = (similarity >= threshold).sum(dim=1).min()  # a 0-d tensor: one graph serves every count
    ranked = similarity.topk(similarity.shape[1], dim=1).indices  # (B, windows) most similar first; a constant K
    chosen = ranked[:, torch.arange(ranked.shape[1], device=hidden.device) < count]  # (B, n)
    members = window_members(grid, window, hidden.device)[chosen].flatten(1)  # (B, n · w²)
    merged = patches.gather(1, members[..., None].expand(-1, -1, channels))
    merged = merged.view(batch, -1, window * window, channels).mean(dim=2)  # (B, n, C)
    inside = torch.zeros(batch, tokens, dtype=torch.long, device=hidden.device).scatter(1, members, tokens)
    order = inside + torch.arange(tokens, device=hidden.device)  # distinct keys: the others first, in grid order
    rest = order.topk(tokens, dim=1, largest=False).indices[:, :tokens - members.shape[1]]
    others = patches.gather(1, rest[..., None].expand(-1, -1, channels))
    return torch.cat([cls, merged, others], dim=1)


class SpatialMerge(nn.Module):
    """spatial_merge as a module, so an exported graph names the nodes it emits (their counts are
    decided per image, unlike the merge blocks' plan constants)."""

    def __init__(self, window: int, threshold: float) -> None:
        super().__init__()
        self.window, self.threshold = window, threshold

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return spatial_merge(hidden, grid, self.window, self.threshold)
