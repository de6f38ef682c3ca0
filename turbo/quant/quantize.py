"""Quantize a (merged) model's encoder Linears block by block, as the GPTQ reference does: the
Hessian of block i comes from calibration inputs that already went through the quantized
blocks 0..i-1, so each block corrects the error of the ones before it."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from turbo.graph.weight_quant import QuantizedWeight
from turbo.quant.gptq import HessianAccumulator, gptq, quantize_rtn

WEIGHT_ONLY = {"gptq-int4": (4, "gptq"), "gptq-int8": (8, "gptq"), "rtn-int4": (4, "rtn")}


class _BlockDone(Exception):
    """Stops a calibration forward once the block being measured has run."""


@dataclass
class LayerReport:
    name: str
    relative_error: float  # ‖X(W − Wq)ᵀ‖² / ‖XWᵀ‖² over the calibration inputs, from the Hessian


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = weight - quantized
    return float(torch.trace(delta @ hessian @ delta.T) / torch.trace(weight @ hessian @ weight.T).clamp(min=1e-30))


def quantize_blocks(blocks: nn.ModuleList, run: Callable[[object], object], batches: Iterable[object],
                    mode: str, group: int, act_order: bool = False,
                    prefix: str = "") -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Quantize every Linear inside `blocks` in place (weights become their dequantized values).

    `run` is the model's forward on one batch; it is cut short after the block being calibrated.
    Returns the quantized weights by module name (`prefix` + name inside `blocks`) and per-layer
    errors.
    """
    batches = list(batches)

    def calibrate(block: nn.Module) -> None:
        def stop(*_):
            raise _BlockDone

        handle = block.register_forward_hook(stop)
        try:
            for batch in batches:
                try:
                    run(batch)
                except _BlockDone:
                    pass
        finally:
            handle.remove()

    return _quantize_each(blocks, calibrate, lambda _: None, mode, group, act_order, prefix)


def quantize_sequential(blocks: nn.ModuleList, inputs: Iterable[object], step: Callable[[nn.Module, object], object],
                        mode: str, group: int, act_order: bool = False,
                        prefix: str = "") -> tuple[dict[str, QuantizedWeight], list[LayerReport], list[object]]:
    """quantize_blocks for blocks run one after another: `inputs` are the first block's, one per
    calibration batch, and `step(block, x)` runs one block, giving the next one's input. Each block
    runs twice per batch (to calibrate, then quantized, to feed the next), not the whole model.
    Also returns the last block's outputs."""
    states = list(inputs)

    def calibrate(block: nn.Module) -> None:
        for x in states:
            step(block, x)

    def advance(block: nn.Module) -> None:
        with torch.inference_mode():
            states[:] = [step(block, x) for x in states]

    weights, reports = _quantize_each(blocks, calibrate, advance, mode, group, act_order, prefix)
    return weights, reports, states


def _quantize_each(blocks: nn.ModuleList, calibrate: Callable[[nn.Module], None], after: Callable[[nn.Module], None],
                   mode: str, group: int, act_order: bool,
                   prefix: str) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Per block: `calibrate` feeds it (its Linears' inputs give their Hessians), its Linears are
    quantized in place, then `after` sees the quantized block."""
    bits, method = WEIGHT_ONLY[mode]
    weights, reports = {}, []
    for index, block in enumerate(blocks):
        linears = {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        accumulators = {name: HessianAccumulator(m.in_features) for name, m in linears.items()}
        hooks = [m.register_forward_pre_hook(lambda _, args, a=accumulators[name]: a.add(args[0]))
                 for name, m in linears.items()]
        try:
            with torch.inference_mode():
                calibrate(block)
        finally:
            for hook in hooks:
                hook.remove()
        for name, module in linears.items():
            weight, hessian = module.weight.data.float(), accumulators[name].hessian
            quantized = (gptq(weight, hessian, bits, group, act_order) if method == "gptq"
                         else quantize_rtn(weight, bits, group))
            dequantized = quantized.dequantize()
            full_name = f"{prefix}{index}" + (f".{name}" if name else "")
            reports.append(LayerReport(full_name, _relative_error(weight, dequantized, hessian)))
            module.weight.data = dequantized.to(module.weight.dtype)
            weights[full_name] = quantized
        after(block)
    return weights, reports
