"""`turbo plan`."""

from rich.table import Table

from turbo.cli.output import print_json, stderr


def run_plan(model: str, r: int | None, method: str | None, alpha: float | None, schedule: str,
             threshold: int | None, image_size: tuple[int, int] | None, tiny: bool, json_output: bool) -> None:
    from turbo.models.build import build_plan
    from turbo.tools.merge_choice import Candidate

    built = build_plan(model, r, method, alpha, schedule, threshold, tiny=tiny, image_size=image_size)
    plan = built.plan
    if json_output:
        print_json(built.to_dict())
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
