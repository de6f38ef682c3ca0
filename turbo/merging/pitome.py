"""PiToMe (Tran et al., NeurIPS 2024, "Accelerating Transformers with Spectrum-Preserving Token
Merging"): protect the informative tokens, merge the ones in large clusters.

Each mergeable token's energy is the mean over all mergeable tokens j of ELU(cos(i, j) − m): high
for a token with many near-duplicates, low for a distinctive one. The 2r highest-energy tokens
are dealt alternately, by energy rank, to sides A and B; every A token merges (size-weighted)
into its most similar B token, and the remaining tokens are kept as they are. The margin m falls
with depth, 0.9 − 0.8·l/L (the authors' ViT setting), since later layers' tokens are more alike.

The energy is the authors' published form, ELU(cos − m) (their code), which differs from the
paper's equation 4 (cos itself above the margin) by m on the terms above it.

Unlike ToMe and Turbo, the two sides are chosen per image rather than by position, so the merge
takes explicit token positions (`merge_sets`) and exports as plain ONNX ops: the TurboMerge node
and the fused kernels implement the position-split step and are not used for this method.
"""

import torch
import torch.nn.functional as F

from turbo.merging.matching import ascending
from turbo.merging.merge import gather_tokens, merge_into

ELU_ALPHA = 1.0


def layer_margin(layer: int, num_layers: int) -> float:
    """The energy margin of block `layer` (0-based) of `num_layers`: 0.9 at the first, falling by 0.8/L."""
    return 0.9 - 0.8 * layer / num_layers


def energy_scores(metric: torch.Tensor, margin: float) -> torch.Tensor:
    """metric (B, T, d) of the mergeable tokens -> energy (B, T) and the cosine matrix (B, T, T)."""
    unit = F.normalize(metric, dim=-1)
    cosine = unit @ unit.transpose(-1, -2)  # (B, T, T)
    return F.elu(cosine - margin, alpha=ELU_ALPHA).mean(dim=-1), cosine


def pitome_sets(metric: torch.Tensor, r: int, margin: float) -> torch.Tensor:
    """Choose PiToMe's merges for x whose token 0 is protected.

    metric: (B, N, d) head-averaged keys. Returns the packed positions (B, N − 1 + r) that
    `merge_sets` takes: src (r), each src's slot among the B side (r), the kept tokens (N − 1 − 2r)
    and the B side (r), kept and B side in ascending position (deterministic across backends).
    """
    tokens = metric.shape[1] - 1
    energy, cosine = energy_scores(metric[:, 1:], margin)  # (B, T), (B, T, T)
    order = energy.topk(tokens, dim=-1).indices  # (B, T), the highest energy first
    src, dst_side, kept = order[:, 0:2 * r:2], ascending(order[:, 1:2 * r:2]), ascending(order[:, 2 * r:])
    rows = cosine.gather(1, src.unsqueeze(-1).expand(-1, -1, tokens))  # (B, r, T)
    slot = rows.gather(2, dst_side.unsqueeze(1).expand(-1, r, -1)).argmax(dim=-1)  # (B, r)
    return torch.cat([src + 1, slot, kept + 1, dst_side + 1], dim=-1)


def merge_sets(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, r: int,
               kernel: str = "matmul") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by `sum(x·size) / sum(size)` over explicit positions; sizes add.

    x (B, N, C), size (B, N, 1), index (B, N − 1 + r) from `pitome_sets`. Returns x and size
    (B, N − r, ·) ordered [token 0, kept tokens, B side]. `scatter` adds with a scatter-add,
    `matmul` with a one-hot (B, r, r) batched MatMul.
    """
    src, slot = index[:, :r].unsqueeze(-1), index[:, r:2 * r]  # (B, r, 1), (B, r)
    kept, dst = index[:, 2 * r:-r].unsqueeze(-1), index[:, -r:].unsqueeze(-1)  # (B, K, 1), (B, r, 1)
    src_size = gather_tokens(size, src)  # (B, r, 1)
    src_x = gather_tokens(x, src) * src_size  # (B, r, C)
    new_x, new_size = merge_into(gather_tokens(x, dst), gather_tokens(size, dst), src_x, src_size, slot, kernel)
    merged = torch.cat([x[:, :1], gather_tokens(x, kept), new_x], dim=1)  # (B, N − r, C)
    return merged, torch.cat([size[:, :1], gather_tokens(size, kept), new_size], dim=1)
