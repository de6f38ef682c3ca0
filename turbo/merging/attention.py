"""Proportional attention and the CLS-row semantic value, from q, k, v."""

import torch
import torch.nn.functional as F


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    scale: float,
    fused: bool = True,
    cls_row: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with +log(size) on the key axis; also the CLS row's attention.

    q, k, v: (B, H, N, d); size: (B, N, 1) or None (every token stands for one patch).
    fused: scaled_dot_product_attention, with the CLS row recomputed on its own (one query row,
    the full map is never materialised for it); otherwise the explicit softmax map, as eager
    upstream models do, whose CLS row is then free. Use the form the upstream model uses, so a
    merged-vs-unmerged comparison measures merging and not an attention kernel change.
    Returns the context (B, N, H*d) and the CLS query's attention averaged over heads (B, N),
    or None for it when cls_row is false (the fused path then skips its extra row).
    """
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
    if fused:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, N, d)
        cls_attn = _cls_row_attention(q, k, bias, scale) if cls_row else None
    else:
        logits = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, N)
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(dim=-1)
        context = attn @ v
        cls_attn = attn[:, :, 0].mean(dim=1) if cls_row else None  # (B, N)
    batch, heads, tokens, dim = q.shape
    # An explicit clone, not .contiguous(): the latter is elided when tracing sees a contiguous SDPA
    # output, and the ONNX exporter's re-trace of a masked SDPA then fails on the reshape (view).
    context = context.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B, N, H, d)
    return context.reshape(batch, tokens, heads * dim), cls_attn


def cls_attention(q: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The CLS query's attention in a block with proportional attention, averaged over heads: q, k
    (B, H, N, d), size (B, N, 1) or None -> (B, N)."""
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
    return _cls_row_attention(q, k, bias, scale)


def _cls_row_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax of the CLS query row alone, averaged over heads: (B, N)."""
    # k @ qᵀ rather than q @ kᵀ: exported graphs then need no transposed copy of k for one row.
    logits = (k @ q[:, :, :1].transpose(-1, -2))[..., 0].float() * scale  # (B, H, N)
    if bias is not None:
        logits = logits + bias[:, :, 0].float()
    return logits.softmax(dim=-1).mean(dim=1).to(q.dtype)
