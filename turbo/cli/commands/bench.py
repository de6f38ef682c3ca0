"""`turbo bench`: a table per runtime and workload, JSON on stdout, an optional PNG plot."""

import os
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from turbo.cli.output import print_json, stderr


def parse_ints(text: str, option: str, least: int = 0, example: str = "0,8,16") -> list[int]:
    """'0,8,16' -> [0, 8, 16]; a UsageError in this option's own words otherwise."""
    from turbo.core.errors import UsageError

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        kind = "non-negative integers" if least == 0 else f"integers of at least {least}"
        raise UsageError(f"{option} takes comma-separated {kind}, e.g. {example}; got {text!r}")
    return values


def parse_runtimes(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(","))


def check_plot_path(plot: str | None) -> None:
    """UsageError unless --plot's folder is writable; TurboError without matplotlib."""
    import importlib.util

    from turbo.core.errors import TurboError, UsageError

    if not plot:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise TurboError("--plot needs matplotlib: pip install -e '.[plot]'")
    folder = Path(plot).absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--plot {plot}: cannot write in {folder} (not a writable folder)")


def _table(rows: list[dict], title: str) -> Table:
    if "llm_drop" in rows[0]:
        return _generation_table(rows, title)
    table = Table(title=title)
    for column in ("batch", "r", "tokens", "median ms", "p90 ms", "p99 ms", "CV", "img/s", "speedup", "FLOPs bound",
                   "efficiency", "memory MB"):
        table.add_column(column, justify="right")
    for row in rows:
        latency, memory = row["latency"], row["memory"]["peak_mb"]
        table.add_row(
            str(row["batch"]), str(row["r"]), str(row["final_tokens"]), f"{latency['median_ms']:.2f}",
            f"{latency['p90_ms']:.2f}", f"{latency['p99_ms']:.2f}",
            f"[yellow]{latency['cv']:.1%}[/]" if row["noisy"] else f"{latency['cv']:.1%}",
            f"{latency['throughput']:.1f}", f"{row['speedup']:.2f}x",
            f"{row['flops_bound']:.2f}x" if row["flops_bound"] else "—",
            f"{row['efficiency']:.2f}" if row["efficiency"] else "—", "—" if memory is None else f"{memory:.1f}",
        )
    return table


def plot_report(report: dict, path: str) -> None:
    """Speedup and efficiency vs r, one line per (runtime, workload, batch)."""
    plt = pyplot()
    figure, (speed_axis, efficiency_axis) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list[dict]] = {}
    for row in report["results"]:
        series.setdefault((row["runtime"], row["workload"], row["batch"]), []).append(row)
    for (runtime, workload, batch), rows in series.items():
        rows = sorted(rows, key=lambda row: row["r"])
        label = f"{runtime} {workload} b{batch}"
        speed_axis.plot([row["r"] for row in rows], [row["speedup"] for row in rows], marker="o", label=label)
        with_bound = [row for row in rows if row["efficiency"] is not None]
        if with_bound:
            efficiency_axis.plot([row["r"] for row in with_bound], [row["efficiency"] for row in with_bound],
                                 marker="o", label=label)
    speed_axis.set(xlabel="r (tokens merged per layer)", ylabel="speedup vs r=0", title=report["model"])
    efficiency_axis.set(xlabel="r (tokens merged per layer)", ylabel="speedup / FLOPs bound", ylim=(0, 1.2),
                        title="efficiency")
    save_figure(plt, figure, (speed_axis, efficiency_axis), path)


def pyplot():
    """matplotlib's pyplot, headless (loaded only when a plot is asked for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, axes, path: str) -> None:
    """Grid and legend on each axis, then the PNG at `path`."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _generation_table(rows: list[dict], title: str) -> Table:
    """An LLM-based VLM's first token or decode steps: one row per (r, --llm-drop, --quant) export."""
    decode = rows[0]["workload"] == "decode"
    table = Table(title=title)
    for column in ("r", "--llm-drop", "--quant", "image tokens (first, last layer)", "median ms", "CV",
                   "tokens/s" if decode else "memory MB", "speedup", "FLOPs bound", "efficiency"):
        table.add_column(column, justify="right")
    for row in rows:
        latency, images = row["latency"], row["image_tokens"]
        table.add_row(
            str(row["r"]), row["llm_drop"], row["quant"] or "—", f"{images[0]}, {images[-1]}",
            f"{latency['median_ms']:.1f}",
            f"[yellow]{latency['cv']:.1%}[/]" if row["noisy"] else f"{latency['cv']:.1%}",
            f"{row['tokens_per_s']:.1f}" if decode else
            ("—" if row["memory"]["peak_mb"] is None else f"{row['memory']['peak_mb']:.1f}"),
            f"{row['speedup']:.2f}x", f"{row['flops_bound']:.2f}x", f"{row['efficiency']:.2f}",
        )
    return table


def run_bench_command(options, json_output: bool, plot: str | None) -> None:
    from turbo.tools.bench import run_bench

    check_plot_path(plot)
    report = run_bench(options, lambda message: stderr.print(f"[dim]{message}[/]", highlight=False))
    groups: dict[tuple, list[dict]] = {}
    for row in report["results"]:
        groups.setdefault((row["runtime"], row["workload"]), []).append(row)
    for (runtime, workload), rows in groups.items():
        runner = rows[0]["runner"]
        title = (f"{report['model']} · {runtime} {workload} · {report['config']['device']} "
                 f"{report['config']['precision']} · {runner.get('threads', '?')} threads")
        stderr.print(_table(rows, title))
    for skipped in report["skipped"]:
        stderr.print(f"[yellow]skipped[/] {skipped['runtime']} ({skipped['workload']}): {escape(skipped['reason'])}",
                     highlight=False)
    noisy = [row for row in report["results"] if row["noisy"]]
    if noisy:
        stderr.print(f"[yellow]warning:[/] {len(noisy)} runs vary by more than 5% (CV); close other work, "
                     "raise --iters or --duration, and read their speedups with care", highlight=False)
    if plot:
        plot_report(report, plot)
        stderr.print(f"wrote {Path(plot)}", highlight=False)
    if json_output:
        print_json(report)


def run_load_test_command(options, json_output: bool, plot: str | None) -> None:
    """`turbo bench --url`: a table per concurrency level, side by side, JSON and a throughput plot."""
    from turbo.tools.load_test import run_load_test

    check_plot_path(plot)
    stderr.print(f"[dim]load-testing {', '.join(options.models)} at {options.url}: concurrency "
                 f"{','.join(map(str, options.concurrency))}, {options.duration_s:g} s each[/]", highlight=False)
    report = run_load_test(options)
    table = Table(title=f"{report.url} · batch {options.batch} per request")
    for column in ("model", "clients", "requests", "errors", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms",
                   "speedup"):
        table.add_column(column, justify="right")
    for row in report.rows:
        latency = row.latency_ms
        table.add_row(row.model, str(row.concurrency), str(row.requests),
                      f"[red]{row.errors}[/]" if row.errors else "0", f"{row.throughput:.1f}",
                      f"{row.items_per_s:.1f}",
                      *(f"{latency[k]:.1f}" if latency else "—" for k in ("p50", "p95", "p99")),
                      f"{row.speedup:.2f}x" if row.speedup is not None else "—")
    stderr.print(table)
    for row in report.rows:
        if row.errors:
            stderr.print(f"[yellow]warning:[/] {row.model} at {row.concurrency} clients: {row.errors} errors "
                         f"(first: {escape(row.first_error)})", highlight=False)
    if plot:
        _plot_load(report, plot)
        stderr.print(f"wrote {Path(plot)}", highlight=False)
    if json_output:
        print_json(report.to_dict())


def _plot_load(report, path: str) -> None:
    """Throughput and p95 latency against concurrency, one line per model."""
    plt = pyplot()
    figure, (throughput_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(row.model for row in report.rows):
        rows = [row for row in report.rows if row.model == model]
        clients = [row.concurrency for row in rows]
        throughput_axis.plot(clients, [row.items_per_s for row in rows], marker="o", label=model)
        latency_axis.plot(clients, [row.latency_ms.get("p95", float("nan")) for row in rows], marker="o", label=model)
    throughput_axis.set(xlabel="concurrent clients", ylabel="images/s", title=report.url, xscale="log")
    latency_axis.set(xlabel="concurrent clients", ylabel="p95 latency (ms)", title="latency", xscale="log")
    save_figure(plt, figure, (throughput_axis, latency_axis), path)
