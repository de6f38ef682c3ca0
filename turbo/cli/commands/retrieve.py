"""`turbo retrieve`: the best texts for each image and images for each text, as tables or JSON."""

from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from turbo.cli.output import print_json, stderr


def _short(text: str, width: int = 60) -> str:
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def _table(title: str, rows: list[dict], query: str, names: list[str]) -> Table:
    table = Table(title=title)
    for column in (query, "rank", "match", "logit"):
        table.add_column(column, justify="right" if column in ("rank", "logit") else "left")
    for row in rows:
        for rank, match in enumerate(row["matches"], 1):
            index = match["text"] if "text" in match else match["image"]
            table.add_row(_short(row[query]) if rank == 1 else "", str(rank), _short(names[index]),
                          f"{match['logit']:.3f}")
    return table


def run_retrieve_command(options, json_output: bool) -> None:
    from turbo.tools.retrieve import run_retrieve

    with Progress(console=stderr, transient=True) as bar:
        task = bar.add_task("image embeddings", total=None)
        report = run_retrieve(options, lambda done, total: bar.update(task, completed=done, total=total))
    if report["random_weights"]:
        stderr.print("[yellow]warning:[/] this export has random weights: its rankings are noise", highlight=False)
    stderr.print(_table("texts for each image", report["image_to_text"], "image", report["texts"]))
    stderr.print(_table("images for each text", report["text_to_image"], "text", report["images"]))
    stderr.print(f"{len(report['images'])} images x {len(report['texts'])} texts, {report['model']} r={report['r']} "
                 f"({report['final_tokens']} image tokens), logit scale {report['logit_scale']:.2f}", highlight=False)
    if json_output:
        print_json(report)
