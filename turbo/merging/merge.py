"""Size-weighted merge of chosen A-side tokens into B-side tokens; two equivalent kernels."""

import torch

KERNELS = ("matmul", "scatter")


def pack_indices(src_idx: torch.Tensor, dst_idx: torch.Tensor, unm_idx: torch.Tensor) -> torch.Tensor:
    """(B, r), (B, r), (B, Na - r) -> (B, Na + r): one index input for the TurboMerge node."""
    return torch.cat([src_idx, dst_idx, unm_idx], dim=-1)


def _gather_tokens_eager(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One row index_select on the flattened batch: in eager PyTorch on CPU several times faster
    than gather with an index expanded over the channels."""
    batch, tokens, channels = x.shape
    rows = index.view(batch, -1) + torch.arange(0, batch * tokens, tokens, device=x.device).unsqueeze(-1)  # (B, K)
    return x.reshape(batch * tokens, channels).index_select(0, rows.view(-1)).view(batch, -1, channels)


@torch.library.custom_op("turbo::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _gather_tokens_eager(x, index)


@_gather_tokens_op.register_fake
def _(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty(index.shape[0], index.shape[1], x.shape[-1])


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, K, 1) token numbers -> (B, K, C).

    Exported as one GatherND with batch_dims=1 (turbo.export.onnx_export translates the custom op):
    torch's gather would export as GatherElements over an index expanded to C channels, and row
    indexing of the flattened batch as a chain of batch-offset nodes in every layer.
    """
    if torch.compiler.is_exporting():
        return _gather_tokens_op(x, index)
    return _gather_tokens_eager(x, index)


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, kernel: str = "matmul"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by `sum(x·size) / sum(size)`; sizes add.

    x: (B, N, C); size: (B, N, 1); index: (B, Na + r) from `pack_indices`, whose src_idx (B, r),
    dst_idx (B, r) and unm_idx (B, Na - r) index the A side (positions 2, 4, …) and B side
    (positions 1, 3, …). Returns x (B, N - r, C) and size (B, N - r, 1), ordered [CLS, unmerged
    A, B]. CLS and unmerged A-side tokens are copied, B-side tokens re-weighted. `scatter`
    accumulates with a scatter-add, `matmul` with a one-hot batched MatMul (no ScatterElements
    in ONNX, so TensorRT needs no plugin for it). Exported graphs get `merge_tokens_graph`, eager
    PyTorch `merge_tokens_eager`: the same arithmetic in the form each runs fastest.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    form = merge_tokens_graph if torch.compiler.is_exporting() else merge_tokens_eager
    return form(x, size, index, kernel)


def merge_tokens_graph(
    x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_tokens` as exported: few ONNX nodes (one GatherND per gather). Sizes are accumulated
    apart from x: a joint (C + 1)-channel tensor costs ONNX Runtime a Concat and a Split per layer,
    which are slower than the extra (B, Nb, r) @ (B, r, 1) MatMul."""
    r = index.shape[-1] - (x.shape[1] - 1) // 2
    positions = (2 * index + 2).unsqueeze(-1)  # (B, Na + r, 1); A-side index i is token 2i + 2
    src_pos, dst_idx, unm_pos = positions[:, :r], index[:, r:2 * r], positions[:, 2 * r:]
    unm_x, unm_size = gather_tokens(x, unm_pos), gather_tokens(size, unm_pos)  # (B, Na-r, C), (B, Na-r, 1)
    src_size = gather_tokens(size, src_pos)  # (B, r, 1)
    src_x = gather_tokens(x, src_pos) * src_size  # (B, r, C)
    new_b, new_b_size = merge_into(x[:, 1::2], size[:, 1::2], src_x, src_size, dst_idx, kernel)  # (B, Nb, ·)
    merged = torch.cat([x[:, :1], unm_x, new_b], dim=1)  # (B, N - r, C)
    return merged, torch.cat([size[:, :1], unm_size, new_b_size], dim=1)


def merge_into(dst_x: torch.Tensor, dst_size: torch.Tensor, src_x: torch.Tensor, src_size: torch.Tensor,
               dst_idx: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The size-weighted merge as exported: dst_x (B, D, C) and dst_size (B, D, 1) take src_x
    (B, r, C, already times its sizes) and src_size (B, r, 1) at dst_idx (B, r). `scatter` adds with
    a scatter-add, `matmul` with a one-hot (B, D, r) batched MatMul. Returns (B, D, C), (B, D, 1)."""
    if kernel == "scatter":
        added_x = torch.zeros_like(dst_x).scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, dst_x.shape[-1]), src_x)
        added_size = torch.zeros_like(dst_size).scatter_add(1, dst_idx.unsqueeze(-1), src_size)
    else:
        onehot = (torch.arange(dst_x.shape[1], device=dst_x.device).unsqueeze(-1) == dst_idx.unsqueeze(1))
        onehot = onehot.to(dst_x.dtype)  # (B, D, r)
        added_x, added_size = onehot @ src_x, onehot @ src_size
    new_size = dst_size + added_size
    return (dst_x * dst_size + added_x) / new_size, new_size


def merge_tokens_eager(
    x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_tokens` for eager PyTorch, which pays for every kernel launch (CPU dispatch, CUDA
    launch) and every large new tensor: one index_select each for x and size fetches the merged and
    the kept A-side tokens, multiply-adds are fused (baddbmm, index_add), the division in place."""
    batch, tokens, channels = x.shape
    r = index.shape[-1] - (tokens - 1) // 2
    first_a = torch.arange(2, batch * tokens + 2, tokens, device=x.device).unsqueeze(-1)  # (B, 1): row of token 2
    rows = torch.add(first_a, index, alpha=2)  # (B, Na + r): A-side index i of batch row b is row b·N + 2i + 2
    a_rows = torch.cat([rows[:, :r], rows[:, 2 * r:]], dim=1).view(-1)  # (B·Na): src then unm of each batch row
    a_x = x.reshape(batch * tokens, channels).index_select(0, a_rows).view(batch, -1, channels)  # (B, Na, C)
    a_size = size.reshape(batch * tokens, 1).index_select(0, a_rows).view(batch, -1, 1)  # (B, Na, 1)
    src_size, unm_x, unm_size, dst_idx = a_size[:, :r], a_x[:, r:], a_size[:, r:], index[:, r:2 * r]
    src_x = a_x[:, :r] * src_size  # (B, r, C)
    b_x, b_size = x[:, 1::2], size[:, 1::2]  # (B, Nb, C), (B, Nb, 1)
    num_b = b_x.shape[1]
    if kernel == "scatter":
        dst_rows = (dst_idx + torch.arange(0, batch * num_b, num_b, device=x.device).unsqueeze(-1)).view(-1)
        new_b_size = b_size.reshape(batch * num_b, 1).index_add(0, dst_rows, src_size.reshape(-1, 1))
        new_b = (b_x * b_size).view(batch * num_b, channels).index_add_(0, dst_rows, src_x.view(-1, channels))
        new_b_size, new_b = new_b_size.view(batch, num_b, 1), new_b.view(batch, num_b, channels)
    else:
        dst_onehot = x.new_zeros(batch, num_b, r).scatter_(1, dst_idx.unsqueeze(1), 1.0)  # (B, Nb, r)
        new_b_size = torch.baddbmm(b_size, dst_onehot, src_size)
        new_b = torch.baddbmm(b_x * b_size, dst_onehot, src_x)
    new_b.div_(new_b_size)  # (B, Nb, C)
    merged = torch.cat([x[:, :1], unm_x, new_b], dim=1)  # (B, N - r, C)
    return merged, torch.cat([size[:, :1], unm_size, new_b_size], dim=1)
