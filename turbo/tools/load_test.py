"""`turbo bench --url`: load-test models on a running Triton server. Each concurrency level runs
N client threads, each with its own connection, sending requests back to back for a fixed time;
models are interleaved in rounds (A B A B) so that they share the machine's noise."""

import io
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from turbo.core.errors import TurboError, UsageError
from turbo.runtimes.triton_client import ServerUnavailableError, TritonRunner, server_ready
from turbo.serving.repository import SAMPLE_PROMPT


@dataclass(frozen=True)
class LoadOptions:
    url: str
    models: list[str]
    concurrency: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 10.0  # per model and concurrency level, split over the rounds
    rounds: int = 2
    warmup_requests: int = 2
    batch: int = 1  # images (or tensor rows) per request
    image_size: tuple[int, int] = (224, 224)  # the synthetic image sent to image-bytes models
    baseline: str | None = None  # the model others are compared with (default: an r=0 model in the list)


@dataclass
class LoadRow:
    model: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float  # requests per second
    items_per_s: float  # images per second
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, mean
    speedup: float | None = None  # throughput over the baseline's at this concurrency
    first_error: str = ""


@dataclass
class LoadReport:
    url: str
    options: dict
    models: dict[str, dict]  # per model: its inputs, merge r, batching
    rows: list[LoadRow]
    baseline: str | None

    def to_dict(self) -> dict:
        return {"url": self.url, "options": self.options, "models": self.models, "baseline": self.baseline,
                "rows": [asdict(row) for row in self.rows]}


def check_load_options(options: LoadOptions) -> None:
    if not options.models:
        raise UsageError("--url needs --model NAME (comma-separated for several)")
    for flag, value in (("--concurrency", min(options.concurrency)), ("--rounds", options.rounds),
                        ("--batch", options.batch)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    if options.duration_s <= 0:
        raise UsageError(f"--duration must be above 0, not {options.duration_s}")
    if options.baseline and options.baseline not in options.models:
        raise UsageError(f"--baseline {options.baseline} is not one of --model {','.join(options.models)}")


def synthetic_feeds(runner: TritonRunner, batch: int, image_size: tuple[int, int], seed: int = 0) -> dict:
    """A request for `runner`'s model: PNG bytes for image inputs, the model's sample prompt for a
    prompt input (LLM-based VLMs), random tensors of its dims otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in runner.inputs:
        name, datatype = tensor["name"], tensor["datatype"]
        if name in runner.optional:
            continue
        dims = [int(d) for d in tensor["shape"]]
        if runner.max_batch > 0:
            dims = [batch, *dims[1:]]
        if any(d < 0 for d in dims):
            raise UsageError(f"{runner.model}'s input {name} has dynamic dims {dims}: bench its pipeline model or "
                             "its encoder instead")
        if datatype == "BYTES" and SAMPLE_PROMPT in runner.parameters and name == "prompt":
            feeds[name] = np.full(dims, runner.parameters[SAMPLE_PROMPT].encode(), dtype=np.object_)
        elif datatype == "BYTES":
            height, width = image_size
            image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
            encoded = io.BytesIO()
            image.save(encoded, "PNG")
            feeds[name] = np.full(dims, encoded.getvalue(), dtype=np.object_)
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _client(url: str, model: str, feeds: dict, start: threading.Barrier, stop_at: list[float], latencies: list,
            errors: list) -> None:
    """One client thread: its own connection (the HTTP client is not shared across threads), then
    requests back to back until the round ends."""
    try:
        runner = TritonRunner(url, model)
    except TurboError as exc:  # the server went away between rounds
        errors.append(str(exc))
        start.wait()
        return
    start.wait()
    try:
        while time.perf_counter() < stop_at[0]:
            begin = time.perf_counter()
            try:
                runner.run(feeds)
            except runner.server_error as exc:
                errors.append(exc.message())
                continue
            except Exception as exc:  # noqa: BLE001 - a dropped connection counts as an error, the bench goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - begin)
    finally:
        runner.close()


def _round(url: str, model: str, feeds: dict, clients: int, seconds: float) -> tuple[list, list, float]:
    """(latencies, errors, seconds) of `clients` threads sending for `seconds`."""
    latencies, errors, stop_at = [], [], [0.0]

    def open_round() -> None:  # run by the barrier once every client is connected, before any sends
        stop_at[0] = time.perf_counter() + seconds

    start = threading.Barrier(clients + 1, action=open_round)
    threads = [threading.Thread(target=_client, args=(url, model, feeds, start, stop_at, latencies, errors))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    begin = stop_at[0] - seconds
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - begin


def run_load_test(options: LoadOptions) -> LoadReport:
    check_load_options(options)
    probes = {model: TritonRunner(options.url, model) for model in options.models}
    feeds = {model: synthetic_feeds(runner, options.batch, options.image_size) for model, runner in probes.items()}
    for model, runner in probes.items():
        for _ in range(options.warmup_requests):
            try:
                runner.run(feeds[model])
            except runner.server_error as exc:
                raise TurboError(f"{model} refused the benchmark's request: {exc.message()}") from None
    baseline = options.baseline or next((m for m, r in probes.items() if r.parameters.get("turbo_r") == "0"
                                         and len(probes) > 1), None)
    items = options.batch if all(r.max_batch > 0 for r in probes.values()) else None
    rows = []
    for concurrency in options.concurrency:
        gathered = {model: ([], []) for model in options.models}
        seconds = {model: 0.0 for model in options.models}
        for _ in range(options.rounds):
            for model in options.models:
                latencies, errors, took = _round(options.url, model, feeds[model], concurrency,
                                                 options.duration_s / options.rounds)
                seconds[model] += took
                gathered[model][0].extend(latencies)
                gathered[model][1].extend(errors)
        for model in options.models:
            rows.append(_row(model, concurrency, *gathered[model], seconds[model], items or 1))
        _still_up(probes[options.models[0]], rows[-len(options.models):])
    if baseline:
        for row in rows:
            base = next(b for b in rows if b.model == baseline and b.concurrency == row.concurrency)
            row.speedup = round(row.throughput / base.throughput, 3) if base.throughput else None
    described = {model: {"inputs": runner.inputs, "max_batch_size": runner.max_batch,
                         "turbo_r": runner.parameters.get("turbo_r"), "export": runner.parameters.get("turbo_export")}
                 for model, runner in probes.items()}
    settings = {"concurrency": list(options.concurrency), "duration_s": options.duration_s, "rounds": options.rounds,
                "batch": options.batch, "image_size": list(options.image_size)}
    return LoadReport(options.url, settings, described, rows, baseline)


def _row(model: str, concurrency: int, latencies: list, errors: list, seconds: float, items: int) -> LoadRow:
    done = len(latencies)
    latency = {}
    if latencies:
        ms = np.asarray(latencies) * 1e3
        latency = {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3),
                   "p99": round(float(np.percentile(ms, 99)), 3), "mean": round(float(ms.mean()), 3)}
    throughput = done / seconds if seconds else 0.0
    return LoadRow(model, concurrency, done, len(errors), round(seconds, 3), round(throughput, 3),
                   round(throughput * items, 3), latency, first_error=errors[0][:300] if errors else "")


def _still_up(probe: TritonRunner, rows: list[LoadRow]) -> None:
    """A server that died during the run is an error, not a table of failures."""
    if not any(row.errors for row in rows):
        return
    if not server_ready(probe.url):
        failed = sum(row.errors for row in rows)
        raise ServerUnavailableError(f"the server at {probe.url} stopped answering during the bench ({failed} "
                                     f"requests failed; first: {next(r.first_error for r in rows if r.errors)})")
