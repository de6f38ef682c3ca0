"""`turbo eval`: a table of metrics per r, the `--r auto` curve and choice, JSON on stdout."""

from rich.markup import escape
from rich.table import Table

from turbo.cli.output import print_json, stderr


def run_eval_command(options, json_output: bool) -> None:
    from turbo.tools.eval import run_eval

    report = run_eval(options, lambda message: stderr.print(f"[dim]{escape(message)}[/]", highlight=False))
    keys = sorted({key for row in report["results"] for key in row["metrics"]})
    questions = f", {report['questions']} questions" if report.get("questions") else ""
    table = Table(title=f"{report['model']} on {report['data']} ({report['samples']} images{questions})")
    for column in ("r", "runtime", "tokens", "FLOPs bound", "images/s", *keys):
        table.add_column(column, justify="right")
    for row in report["results"]:
        table.add_row(str(row["r"]), row["runtime"], str(row["final_tokens"]), f"{row['flops_bound']:.2f}x",
                      f"{row['images_per_s']:.1f}", *(f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "—"
                                                      for k in keys))
    stderr.print(table)
    if report["captions_compared_as"] == "token ids":
        stderr.print("captions compared as token ids (no tokenizer in the cache)", highlight=False)
    if report["caption_tokenizer"]:
        stderr.print(f"caption tokenizer: {report['caption_tokenizer']}", highlight=False)
    if report["auto"]:
        auto = report["auto"]
        curve = ", ".join(f"r={p['r']}: {p['drop']:.4f}{'' if p['within'] else ' (over)'}" for p in auto["curve"])
        stderr.print(f"--r auto ({auto['metric']} drop ≤ {auto['max_drop']:g}; {auto['candidates']} distinct r): "
                     f"{curve}; chosen [bold]r={auto['chosen_r']}[/]", highlight=False)
    if report["random_weights"]:
        stderr.print("[yellow]random weights: these metrics say nothing about the real model[/]", highlight=False)
    if json_output:
        print_json(report)
