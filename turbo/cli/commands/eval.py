"""`turbo eval`: a table of metrics per setting and r, the `--r auto` curve, the merge choice, JSON
on stdout, and with --sweep an optional plot."""

import math
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from turbo.cli.output import print_json, stderr


@dataclass(frozen=True)
class MergeSettings:
    method: str | None
    alpha: float | None
    candidates: list | None  # turbo.tools.merge_choice.Candidate
    choose: bool
    rs: list[int] | None  # from --sweep r=...


def merge_settings(model: str, method: str | None, alpha: str | None, sweep: list[str], tiny: bool) -> MergeSettings:
    """--method/--alpha (a setting, or 'auto') and --sweep items -> what `run_eval` compares."""
    from turbo.core.errors import UsageError
    from turbo.models.loading import resolve_source
    from turbo.tools.merge_choice import auto_candidates, parse_sweep

    if sweep:
        if method is not None or alpha is not None:
            raise UsageError("--sweep lists the methods and α values; drop --method and --alpha")
        candidates, rs = parse_sweep(sweep)
        return MergeSettings(None, None, candidates, False, rs)
    if "auto" in (method, alpha):
        source = resolve_source(model, tiny=tiny)
        chosen_alpha = "auto" if alpha == "auto" else parse_alpha(alpha)
        candidates = auto_candidates(method, chosen_alpha, source.adapter.has_cls_token(source.config))
        return MergeSettings(None if method == "auto" else method, None, candidates, True, None)
    return MergeSettings(method, parse_alpha(alpha), None, False, None)


def split_eval_arguments(arguments: list[str], sweep: str | None) -> tuple[str | None, list[str]]:
    """`turbo eval [EXPORT_DIR] [--sweep KEY=VALUES [KEY=VALUES ...]]` -> the directory and the sweep's items."""
    from turbo.core.errors import UsageError

    items = [a for a in arguments if "=" in a]
    directories = [a for a in arguments if "=" not in a]
    if items and sweep is None:
        raise UsageError(f"{items[0]}: KEY=VALUES arguments belong to --sweep")
    if len(directories) > 1:
        raise UsageError(f"one export directory at a time, not {', '.join(directories)}")
    return (directories[0] if directories else None), ([*sweep.split(), *items] if sweep is not None else [])


def parse_alpha(alpha: str | None) -> float | None:
    from turbo.core.errors import UsageError

    if alpha is None:
        return None
    try:
        value = float(alpha)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--alpha {alpha!r}: expected a number >= 0 or 'auto'")
    return value


def run_eval_command(options, json_output: bool, plot: str | None = None) -> None:
    from turbo.cli.commands.bench import check_plot_path
    from turbo.tools.eval import run_eval

    if plot and not options.candidates:
        from turbo.core.errors import UsageError

        raise UsageError("--plot draws a --sweep; add --sweep method=...")
    check_plot_path(plot)
    report = run_eval(options, lambda message: stderr.print(f"[dim]{escape(message)}[/]", highlight=False))
    stderr.print(results_table(report))
    if report.get("captions_compared_as") == "token ids":
        stderr.print("captions compared as token ids (no tokenizer in the cache)", highlight=False)
    if report.get("caption_tokenizer"):
        stderr.print(f"caption tokenizer: {report['caption_tokenizer']}", highlight=False)
    if report["auto"]:
        auto = report["auto"]
        curve = ", ".join(f"r={p['r']}: {p['drop']:.4f}{'' if p['within'] else ' (over)'}" for p in auto["curve"])
        stderr.print(f"--r auto ({auto['metric']} drop ≤ {auto['max_drop']:g}; {auto['candidates']} distinct r): "
                     f"{curve}; chosen [bold]r={auto['chosen_r']}[/]", highlight=False)
    if report["choice"]:
        print_choice(report["choice"])
    if report["random_weights"]:
        stderr.print("[yellow]random weights: these metrics say nothing about the real model[/]", highlight=False)
    if plot:
        plot_sweep(report, plot)
        stderr.print(f"wrote {plot}", highlight=False)
    if json_output:
        print_json(report)


def results_table(report: dict) -> Table:
    """One row per evaluated setting and r (the setting column only when settings were compared)."""
    keys = sorted({key for row in report["results"] for key in row["metrics"]})
    settings = any("candidate" in row for row in report["results"])
    drops = any("llm_drop" in row for row in report["results"])
    questions = f", {report['questions']} questions" if report.get("questions") else ""
    table = Table(title=f"{report['model']} on {report['data']} ({report['samples']} images{questions})")
    for column in (*(["merge"] if settings else []), "r", *(["--llm-drop"] if drops else []), "runtime", "tokens",
                   "FLOPs bound", "images/s", *keys):
        table.add_column(column, justify="left" if column in ("merge", "--llm-drop") else "right")
    for row in report["results"]:
        label = [row["candidate"]["label"] if "candidate" in row else "—"] if settings else []
        drop = [row["llm_drop"]] if drops else []
        table.add_row(*label, str(row["r"]), *drop, row["runtime"], str(row["final_tokens"]),
                      f"{row['flops_bound']:.2f}x",
                      f"{row['images_per_s']:.1f}", *(f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "—"
                                                      for k in keys))
    return table


def print_choice(choice: dict) -> None:
    """The candidates' scores at the r they were compared at, and the winner with its reason."""
    keys = [choice["score_key"], *(k for k in choice["scores"][0]["metrics"] if k != choice["score_key"])]
    table = Table(title=f"merge candidates at r={choice['scores'][0]['r']} ({choice['metric']})")
    for column in ("merge", *keys):
        table.add_column(column, justify="left" if column == "merge" else "right")
    for row in choice["scores"]:
        won = row["candidate"] == choice["candidate"]
        label = f"[bold]{row['candidate']['label']} ←[/]" if won else row["candidate"]["label"]
        table.add_row(label, *(f"{row['metrics'][k]:.4g}" for k in keys))
    stderr.print(table)
    stderr.print(f"chosen merge: [bold]{escape(choice['candidate']['label'])}[/] at r={choice['r']}: "
                 f"{escape(choice['reason'])}", highlight=False)


def plot_sweep(report: dict, path: str) -> None:
    """The sweep's task metric (accuracy when labelled, else fidelity) against the FLOPs bound, one
    line per setting, r=0 at 1.0× on each."""
    from turbo.cli.commands.bench import pyplot, save_figure
    from turbo.models.adapters import task_named

    task = task_named(report["task"])
    base = next(row for row in report["results"] if row["r"] == 0)
    key = task.accuracy_metric if task.accuracy_metric in base["metrics"] else task.fidelity_metric
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    labels = dict.fromkeys(row["candidate"]["label"] for row in report["results"] if "candidate" in row)
    for label in labels:
        rows = [base] + sorted((row for row in report["results"] if row.get("candidate", {}).get("label") == label),
                               key=lambda row: row["flops_bound"])
        axis.plot([row["flops_bound"] for row in rows], [row["metrics"][key] for row in rows], marker="o", label=label)
    axis.set_xlabel("FLOPs speedup bound (×)")
    axis.set_ylabel(key)
    axis.set_title(f"{report['model']}: {key} vs FLOPs bound ({report['samples']} images)")
    save_figure(plt, figure, [axis], path)
