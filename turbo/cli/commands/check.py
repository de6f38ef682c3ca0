"""`turbo check`: one row per check, JSON on stdout, exit 3 when any check fails."""

from rich.markup import escape
from rich.table import Table

from turbo.cli.output import fail, print_json, stderr


def run_check_command(directory: str, max_diff: float | None, min_agreement: float | None,
                      min_speedup: float | None, iters: int, json_output: bool) -> None:
    from turbo.core.errors import EXIT_VALIDATION
    from turbo.tools.check import run_check

    report = run_check(directory, max_diff, min_agreement, min_speedup, iters)
    table = Table(title=f"turbo check {directory}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    verdicts = {True: "[green]PASSED[/]", False: "[bold red]FAILED[/]", None: "[yellow]skipped[/]"}
    for item in report.items:
        table.add_row(item.name, verdicts[item.passed], escape(item.detail))
    stderr.print(table)
    if json_output:
        print_json(report.to_dict())
    failed = [item.name for item in report.items if item.passed is False]
    if failed:
        fail(f"{directory}: {len(failed)} checks failed ({', '.join(failed)})", EXIT_VALIDATION)
    stderr.print(f"{directory}: all {len(report.items)} checks passed "
                 f"({sum(item.passed is None for item in report.items)} skipped)", highlight=False)
