"""Proportional attention and the CLS-row semantic value, from q, k, v."""

import torch
import torch.nn.functional as F


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with +log(size) on the key axis; also the CLS row's attention.

    q, k, v: (B, H, N, d); size: (B, N, 1) or None (every token stands for one patch).
    Returns the context (B, N, H*d) and the CLS query's attention averaged over heads (B, N),
    computed from the CLS row only (the full attention map is never materialised for it).
    """
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, N, d)
    cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)).float() * scale  # (B, H, 1, N)
    if bias is not None:
        cls_logits = cls_logits + bias.float()
    cls_attn = cls_logits.softmax(dim=-1)[:, :, 0].mean(dim=1).to(q.dtype)  # (B, N)
    batch, heads, tokens, dim = q.shape
    return context.transpose(1, 2).reshape(batch, tokens, heads * dim), cls_attn
