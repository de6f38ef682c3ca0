"""Size-weighted merge of chosen A-side tokens into B-side tokens; two equivalent kernels."""

import torch

KERNELS = ("matmul", "scatter")


def flat_positions(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, K) token positions -> (B*K,) rows of the batch flattened to (B*N, ·)."""
    # (B, 1) batch row offsets, computed from `positions` (not arange(B)) so that exported graphs
    # cannot share one offsets tensor between layers: each merge block stays self-contained.
    offsets = (torch.ones_like(positions[:, :1]).cumsum(0) - 1) * tokens
    return (positions + offsets).reshape(-1)


def pack_indices(src_idx: torch.Tensor, dst_idx: torch.Tensor, unm_idx: torch.Tensor) -> torch.Tensor:
    """(B, r), (B, r), (B, Na - r) -> (B, Na + r): one index input for the TurboMerge node."""
    return torch.cat([src_idx, dst_idx, unm_idx], dim=-1)


def unpack_indices(index: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack_indices`: src_idx, dst_idx, unm_idx."""
    return index[:, :r], index[:, r:2 * r], index[:, 2 * r:]


def gather_tokens(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), rows from `flat_positions` -> (B, K, C): one row Gather, cheaper than
    GatherElements with an index expanded over C."""
    batch, tokens, channels = x.shape
    return x.reshape(batch * tokens, channels)[rows].view(batch, -1, channels)


def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    unm_idx: torch.Tensor,
    kernel: str = "matmul",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by `sum(x·size) / sum(size)`; sizes add.

    x: (B, N, C); size: (B, N, 1); src_idx, dst_idx: (B, r) and unm_idx: (B, Na - r) index the
    A side (positions 2, 4, …) and B side (positions 1, 3, …). Returns x (B, N - r, C) and
    size (B, N - r, 1), ordered [CLS, unmerged A, B]. Tokens nothing merges into are copied,
    not re-weighted. `scatter` accumulates with scatter-add; `matmul` with a one-hot batched
    MatMul (no ScatterElements in ONNX, so TensorRT needs no plugin for it).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    tokens = x.shape[1]
    unm_rows = flat_positions(2 * unm_idx + 2, tokens)  # A-side index -> token position -> flat row
    src_rows = flat_positions(2 * src_idx + 2, tokens)
    unm_x, unm_size = gather_tokens(x, unm_rows), gather_tokens(size, unm_rows)  # (B, Na-r, C), (B, Na-r, 1)
    src_size = gather_tokens(size, src_rows)  # (B, r, 1)
    src = torch.cat([gather_tokens(x, src_rows) * src_size, src_size], dim=-1)  # (B, r, C+1)
    b_x, b_size = x[:, 1::2], size[:, 1::2]  # (B, Nb, C), (B, Nb, 1)
    if kernel == "scatter":
        index = dst_idx.unsqueeze(-1).expand(-1, -1, src.shape[-1])
        added = src.new_zeros(b_x.shape[0], b_x.shape[1], src.shape[-1]).scatter_add(1, index, src)
    else:
        dst_onehot = (dst_idx.unsqueeze(-1) == torch.arange(b_x.shape[1], device=x.device)).to(x.dtype)
        added = dst_onehot.transpose(1, 2) @ src  # (B, Nb, r) @ (B, r, C+1)
    channels = x.shape[-1]
    new_b_size = b_size + added[..., channels:]
    new_b = (b_x * b_size + added[..., :channels]) / new_b_size  # (B, Nb, C)
    merged = torch.cat([x[:, :1], unm_x, new_b], dim=1)  # (B, N - r, C)
    return merged, torch.cat([size[:, :1], unm_size, new_b_size], dim=1)
