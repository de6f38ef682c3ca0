"""Weight-only quantization of one Linear: round-to-nearest and GPTQ (Frantar et al. 2022,
following the reference IST-DASLab `gptq.py`), symmetric, no zero point, one scale per group
of `group` input columns and output row — the form of ONNX blocked DequantizeLinear.
"""

import torch

from turbo.graph.weight_quant import QuantizedWeight

BLOCK = 128  # columns processed together before the lazy batch update
DAMP = 0.01  # damping, a fraction of the mean Hessian diagonal


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def group_scales(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """(out, in) -> (out, in // group): max |w| of each group maps to the largest level."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"group size {group} does not divide {in_features} input features")
    peak = weight.abs().reshape(out_features, in_features // group, group).amax(dim=-1)
    return (peak / _qmax(bits)).clamp(min=torch.finfo(torch.float32).tiny)


def _round(column: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(column / scale), -_qmax(bits) - 1, _qmax(bits))


def quantize_rtn(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """Plain rounding to the nearest level: the comparison point for GPTQ."""
    weight = weight.float()
    scales = group_scales(weight, bits, group)
    q = _round(weight, scales.repeat_interleave(group, dim=1), bits)
    return QuantizedWeight(q.to(torch.int8), scales, bits, group)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, act_order: bool = False,
         damp: float = DAMP, block: int = BLOCK) -> QuantizedWeight:
    """Quantize columns one at a time, spreading each column's rounding error over the columns
    not yet quantized through the inverse Hessian of the layer's inputs (H = 2·XᵀX / n).

    act_order quantizes columns by decreasing H diagonal; group scales still come from the
    original column order ("static groups"), so one blocked DequantizeLinear expresses the result.
    """
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.detach().float().clone()  # (in, in)
    in_features = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = group_scales(w, bits, group)  # static groups: fixed before any column moves
    column_scales = scales.repeat_interleave(group, dim=1)  # (out, in)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    w, h, column_scales = w[:, order], h[order][:, order], column_scales[:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block, errors = w[:, start:end].clone(), torch.zeros_like(w[:, start:end])
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column, d = w_block[:, i], hinv_block[i, i]
            quantized = _round(column, column_scales[:, start + i], bits)
            q[:, start + i] = quantized
            error = (column - quantized * column_scales[:, start + i]) / d
            w_block[:, i:] -= error.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    restore = torch.argsort(order)
    return QuantizedWeight(q[:, restore].to(torch.int8), scales, bits, group)


class HessianAccumulator:
    """Running H = 2·XᵀX / n over every token a Linear sees (a forward pre-hook)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()  # (tokens, in)
        total = self.count + len(x)
        self.hessian *= self.count / total
        x = x * (2 / total) ** 0.5
        self.hessian += x.T @ x
        self.count = total
