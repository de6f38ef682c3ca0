"""The merge's view of a token sequence whose first `protected` tokens are never merged.

Merge steps protect exactly one leading token (CLS, position 0). A model with more (DeiT's
distillation token, DINOv2's registers) sets the extra ones aside around the merge; a model with
none (SigLIP) gets a zero placeholder in front, dropped again after the merge.
"""

import torch


def merge_view(x: torch.Tensor, protected: int) -> torch.Tensor:
    """x (B, N, ...) -> (B, N - protected + 1, ...): the leading token (or a zero one) and the mergeable ones."""
    if protected == 1:
        return x
    if protected == 0:
        return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
    return torch.cat([x[:, :1], x[:, protected:]], dim=1)


def set_aside(x: torch.Tensor, protected: int) -> torch.Tensor:
    """x (B, N, ...) -> (B, max(protected - 1, 0), ...): the protected tokens `merge_view` leaves out."""
    return x[:, 1:max(protected, 1)]


def full_sequence(view: torch.Tensor, aside: torch.Tensor, protected: int) -> torch.Tensor:
    """The inverse of `merge_view` after a merge: (B, M, ...) -> (B, M + protected - 1, ...)."""
    if protected == 1:
        return view
    if protected == 0:
        return view[:, 1:]
    return torch.cat([view[:, :1], aside, view[:, 1:]], dim=1)
