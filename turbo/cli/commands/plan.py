"""`turbo plan`."""

from rich.table import Table

from turbo.cli.output import print_json, stderr
from turbo.core.errors import UsageError


def run_plan(model: str, r: int | None, method: str | None, alpha: float | None, schedule: str,
             threshold: int | None, image_size: tuple[int, int] | None, tiny: bool, llm_drop: str, prompt_tokens: int,
             json_output: bool) -> None:
    from turbo.merging.llm_drop import parse_llm_drop
    from turbo.models.build import build_plan
    from turbo.models.llm_plan import llm_plan
    from turbo.tools.merge_choice import Candidate

    built = build_plan(model, r, method, alpha, schedule, threshold, tiny=tiny, image_size=image_size)
    drop = parse_llm_drop(llm_drop)
    if prompt_tokens < 1:
        raise UsageError(f"--prompt-tokens must be at least 1, not {prompt_tokens}")
    language = None
    if built.source.adapter.language_model is not None or drop.method != "none":
        language = llm_plan(built, drop, prompt_tokens)
    plan = built.plan
    if json_output:
        print_json({**built.to_dict(), **({"llm": language.to_dict()} if language else {})})
        return
    height, width = built.image_size
    protected = built.source.adapter.protected_names
    config = built.merge_config
    merge = Candidate.of(config.method, config.alpha, config.fusion).label  # α only where the method has one
    table = Table(title=f"{model}: {merge}, r={built.r_text}, "
                        f"threshold={plan.threshold}, {height}x{width} input, protected: {protected} "
                        f"({plan.protected_tokens})")
    for column in ("layer", "tokens in", "r", "tokens out", "GFLOPs"):
        table.add_column(column, justify="right")
    for layer in plan.layers:
        r_cell = f"{layer.r} (asked {layer.r_requested})" if layer.r != layer.r_requested else str(layer.r)
        table.add_row(str(layer.index), str(layer.tokens_in), r_cell, str(layer.tokens_out), f"{layer.flops / 1e9:.2f}")
    stderr.print(table)
    stderr.print(
        f"final tokens {plan.final_tokens} of {plan.tokens_in}; "
        f"{plan.flops / 1e9:.1f} GFLOPs vs {plan.baseline_flops / 1e9:.1f} at r=0; "
        f"FLOPs speedup bound [bold]{plan.speedup_bound:.2f}x[/]"
    )
    if plan.clamped_layers:
        stderr.print(f"r was clamped to the per-layer cap (tokens - protected) // 2 or the threshold in layers "
                     f"{', '.join(map(str, plan.clamped_layers))}")
    if language:
        print_llm_plan(language)


def print_llm_plan(plan) -> None:
    """The language model's image tokens per layer (runs of equal layers folded) and its bounds."""
    table = Table(title=f"language model: {plan.drop.label}, {plan.text_tokens} text tokens")
    for column in ("LLM layers", "image tokens", "prefill GFLOPs"):
        table.add_column(column, justify="right")
    layers = plan.image_per_layer
    start = 0
    for index in range(1, len(layers) + 1):
        if index == len(layers) or layers[index] != layers[start]:
            span = str(start) if index - start == 1 else f"{start}-{index - 1}"
            each = plan.layer_flops(layers[start])
            table.add_row(span, str(layers[start]), f"{each * (index - start) / 1e9:.2f}")
            start = index
    stderr.print(table)
    if plan.drop.method == "dyrate":
        stderr.print("DyRate prunes while decoding, each step as its attention decides: the prefill keeps every "
                     "image token, and the decode FLOPs below are before any pruning", highlight=False)
    if plan.drop.method == "mustdrop":
        layers = ", ".join(map(str, plan.drop.pruning_layers))
        stderr.print(f"MustDrop drops, after layers {layers}, the image tokens each prompt's text attends to below "
                     "its thresholds (its key set stays): the counts are decided per prompt, and the figures below "
                     "are before any drop", highlight=False)
    stderr.print(f"image tokens into the LLM {plan.image_tokens} of {plan.unmerged_image_tokens}; prefill "
                 f"{plan.prefill_flops / 1e9:.1f} GFLOPs vs {plan.baseline_prefill_flops / 1e9:.1f} unreduced "
                 f"([bold]{plan.baseline_prefill_flops / plan.prefill_flops:.2f}x[/] bound); first decoded token "
                 f"{plan.decode_flops / 1e9:.2f} GFLOPs vs {plan.baseline_decode_flops / 1e9:.2f} "
                 f"({plan.baseline_decode_flops / plan.decode_flops:.2f}x)")
