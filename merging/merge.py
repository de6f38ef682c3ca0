"""Size-weighted merge of chosen A-side tokens into B-side tokens; two equivalent kernels."""

import torch

KERNELS = ("matmul", "scatter")


def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    unm_idx: torch.Tensor,
    kernel: str = "matmul",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by `sum(x·size) / sum(size)`; sizes add.

    x: (B, N, C); size: (B, N, 1); src_idx, dst_idx: (B, r); unm_idx: (B, Na - r).
    Returns x (B, N - r, C) and size (B, N - r, 1), ordered [CLS, unmerged A, B].
    `scatter` uses gather + scatter-add; `matmul` builds one-hot matrices and uses batched
    MatMul (no ScatterElements in ONNX, so TensorRT needs no plugin for it).
    """
    channels = x.shape[-1]
    weighted = torch.cat([x * size, size], dim=-1)  # (B, N, C+1)
    cls, a, b = weighted[:, :1], weighted[:, 2::2], weighted[:, 1::2]
    unm = a.gather(1, unm_idx.unsqueeze(-1).expand(-1, -1, channels + 1))  # (B, Na-r, C+1)
    if kernel == "scatter":
        src = a.gather(1, src_idx.unsqueeze(-1).expand(-1, -1, channels + 1))  # (B, r, C+1)
        b = b.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, channels + 1), src)
    elif kernel == "matmul":
        src_onehot = (src_idx.unsqueeze(-1) == torch.arange(a.shape[1], device=x.device)).to(x.dtype)
        dst_onehot = (dst_idx.unsqueeze(-1) == torch.arange(b.shape[1], device=x.device)).to(x.dtype)
        b = b + dst_onehot.transpose(1, 2) @ (src_onehot @ a)  # (B, Nb, r) @ (B, r, C+1)
    else:
        raise ValueError(f"unknown merge kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    merged = torch.cat([cls, unm, b], dim=1)  # (B, N - r, C+1)
    new_size = merged[..., channels:]
    return merged[..., :channels] / new_size, new_size
