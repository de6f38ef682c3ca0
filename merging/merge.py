"""Size-weighted merge of chosen A-side tokens into B-side tokens; two equivalent kernels."""

import torch

KERNELS = ("matmul", "scatter")


def row_offsets(index: torch.Tensor, tokens: int, first: int = 0) -> torch.Tensor:
    """(B, K) indices of tokens -> (B, 1): the row of token `first` of each batch row in the batch
    flattened to (B*N, ·)."""
    # Computed from `index` (not arange(B)) so that exported graphs cannot share one offsets
    # tensor between layers: each merge block stays self-contained.
    return torch.full_like(index[:, :1], tokens).cumsum(0) - (tokens - first)


def pack_indices(src_idx: torch.Tensor, dst_idx: torch.Tensor, unm_idx: torch.Tensor) -> torch.Tensor:
    """(B, r), (B, r), (B, Na - r) -> (B, Na + r): one index input for the TurboMerge node."""
    return torch.cat([src_idx, dst_idx, unm_idx], dim=-1)


def unpack_indices(index: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack_indices`: src_idx, dst_idx, unm_idx."""
    return index[:, :r], index[:, r:2 * r], index[:, 2 * r:]


def gather_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat (B*N, C), rows (B, K) flat row numbers -> (B, K, C): one row Gather, cheaper than
    GatherElements with an index expanded over C."""
    return flat[rows.reshape(-1)].view(rows.shape[0], rows.shape[1], flat.shape[-1])


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
    size (B, N - r, 1), ordered [CLS, unmerged A, B]. CLS and unmerged A-side tokens are copied,
    B-side tokens re-weighted. `scatter` accumulates with scatter-add; `matmul` with a one-hot
    batched MatMul (no ScatterElements in ONNX, so TensorRT needs no plugin for it). Sizes are
    accumulated apart from x: a joint (C + 1)-channel tensor costs ONNX Runtime a Concat and a
    Split per layer, which are slower than the extra (B, Nb, r) @ (B, r, 1) MatMul.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    batch, tokens, channels = x.shape
    offsets = row_offsets(src_idx, tokens, first=2)  # (B, 1); A-side index i is token 2i + 2
    unm_rows, src_rows = 2 * unm_idx + offsets, 2 * src_idx + offsets
    flat_x, flat_size = x.reshape(batch * tokens, channels), size.reshape(batch * tokens, 1)
    unm_x, unm_size = gather_rows(flat_x, unm_rows), gather_rows(flat_size, unm_rows)  # (B, Na-r, C), (B, Na-r, 1)
    src_size = gather_rows(flat_size, src_rows)  # (B, r, 1)
    src_x = gather_rows(flat_x, src_rows) * src_size  # (B, r, C)
    b_x, b_size = x[:, 1::2], size[:, 1::2]  # (B, Nb, C), (B, Nb, 1)
    if kernel == "scatter":
        added_x = torch.zeros_like(b_x).scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, channels), src_x)
        added_size = torch.zeros_like(b_size).scatter_add(1, dst_idx.unsqueeze(-1), src_size)
    else:
        dst_onehot = (torch.arange(b_x.shape[1], device=x.device).unsqueeze(-1) == dst_idx.unsqueeze(1)).to(x.dtype)
        added_x, added_size = dst_onehot @ src_x, dst_onehot @ src_size  # (B, Nb, r) @ (B, r, ·)
    new_b_size = b_size + added_size
    new_b = (b_x * b_size + added_x) / new_b_size  # (B, Nb, C)
    merged = torch.cat([x[:, :1], unm_x, new_b], dim=1)  # (B, N - r, C)
    return merged, torch.cat([size[:, :1], unm_size, new_b_size], dim=1)
