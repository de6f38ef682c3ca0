"""`turbo bench` as a library call: merged vs r=0 latency per runtime, workload and batch,
interleaved, with the plan's FLOPs bound beside every measured speedup."""

import ctypes
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from turbo.core.cache import cache_root
from turbo.core.errors import EXIT_MISSING_RUNTIME, TurboError, UsageError
from turbo.core.files import MODEL_FILE
from turbo.core.manifest import Manifest, now, read_export_manifest, versions
from turbo.core.staging import OutputClaimed, wait_for_other_run
from turbo.export.onnx_export import ExportModule
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.export.tensorrt.stage import TrtOptions
from turbo.export.validate import seeded_pixels
from turbo.graph.export_dir import open_export
from turbo.kernels.cpu_kernels import kernel_library
from turbo.kernels.ort_merge_kernel import check_merge_kernel
from turbo.kernels.torch_merge_kernel import check_torch_merge, fused_step
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import content_fingerprint, resolve_source
from turbo.models.registry import adapter_for
from turbo.runtimes.availability import DEVICES, RUNTIMES, unavailable_reason
from turbo.runtimes.base import Runner
from turbo.runtimes.caption import CaptionPipeline, CaptionRunner
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.pytorch import TorchRunner
from turbo.runtimes.retrieval import MatchRunner, RetrievalPipeline
from turbo.runtimes.tensorrt import TensorRTRunner
from turbo.runtimes.vqa import VqaPipeline, VqaRunner
from turbo.tools.bench_generation import check_not_failed, generation_exports, time_generation
from turbo.tools.timing import TimingStats, interleaved

SCHEMA = "turbo-bench/1"
PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_ITERS = 20  # timed rounds when neither iters nor duration_s is given
NO_DECODER = "the export has no text decoder (re-export it with this turbo version)"
NO_MATCH_HEAD = "an export has no image-text matching head (re-export it with this turbo version)"
NO_ANSWERER = "an export has no question encoder (re-export it with this turbo version)"
ON_ONNX = {"itm": "the matching head", "vqa": "VQA"}  # workloads timed on their ONNX export only
NO_CAPTION_ENGINES = "an export has no TensorRT decoder engines (re-export it with --trt and its text decoder)"
CACHE_WAIT_S = 30 * 60  # a full-size BLIP export with validation takes minutes
EXPORT_FORMAT = 6  # bumped when exports change, so cached ones are rebuilt (2: decoder; 3: TurboMerge interface;
#                    4: leaner merge graph; 5: batched GatherND, one ranking TopK; 6: the turbo package, manifest v2)
Progress = Callable[[str], None]


class MissingRuntimeError(TurboError):
    exit_code = EXIT_MISSING_RUNTIME


@dataclass
class BenchOptions:
    model: str = "blip-caption"
    rs: list[int] | None = None  # None: 0 and the model's default r
    runtimes: tuple[str, ...] | None = None  # None: every runtime for a model, ONNX Runtime for export_dirs
    device: str = "cpu"
    batches: tuple[int, ...] = (1,)
    precision: str = "fp32"
    warmup_s: float = 1.0
    iters: int | None = None  # None: DEFAULT_ITERS rounds, or as many as fit in duration_s
    duration_s: float | None = None
    random_weights: bool = False
    include_transfers: bool = False
    caption: bool = True  # BLIP: also end-to-end caption generation
    caption_tokens: int = 20
    threads: int | None = None  # None: one per CPU
    ort_merge: str = "auto"  # how ONNX Runtime runs TurboMerge nodes: auto | fused | graph
    torch_merge: str = "auto"  # how PyTorch runs each Turbo step: auto | fused | ops
    cuda_graph: bool | None = None  # PyTorch on CUDA: replay image forwards as CUDA graphs (None: yes)
    method: str | None = None  # None: the model's default (turbo; tome without a CLS token)
    alpha: float | None = None
    threshold: int | None = None
    kernel: str = "matmul"
    seed: int = 0
    tiny: bool = False  # the registry's tiny variant (tests)
    export_dirs: list[Path] = field(default_factory=list)  # bench these ONNX exports (runtime ort)
    baseline_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.runtimes is None:
            self.runtimes = ("ort",) if self.export_dirs else RUNTIMES
        if self.iters is None and self.duration_s is None:
            self.iters = DEFAULT_ITERS


@dataclass(frozen=True)
class Candidate:
    """One model variant to time: its r, the plan's numbers and how to build its runner."""

    r: int
    final_tokens: int
    flops_bound: float
    make_runner: Callable[[], Runner]
    directory: Path | None = None  # the export it runs, when it is one


def _check(options: BenchOptions) -> None:
    for runtime in options.runtimes:
        if runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)} or all")
    if options.device not in DEVICES:
        raise UsageError(f"unknown device {options.device!r}; choose cpu or cuda")
    if options.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not options.batches or min(options.batches) < 1:
        raise UsageError("--batch takes positive integers, e.g. 1,8,64")
    if options.iters is not None and options.iters < 1:
        raise UsageError("--iters must be at least 1")
    if options.warmup_s < 0 or (options.duration_s is not None and options.duration_s <= 0):
        raise UsageError("--warmup must be >= 0 and --duration > 0 seconds")
    check_merge_kernel(options.ort_merge, _ort_providers(options), "--ort-merge")
    check_torch_merge(options.torch_merge, options.device == "cpu", options.precision == "fp32", "--torch-merge")
    if options.cuda_graph is not None and options.device != "cuda":
        raise UsageError("--cuda-graph and --no-cuda-graph belong to --device cuda")
    if options.ort_merge == "fused" and "ort" in options.runtimes:
        kernel_library()  # fail now, not after the exports were built
    if options.torch_merge == "fused" and "torch" in options.runtimes:
        fused_step(torch.device(options.device), TORCH_DTYPES[options.precision])


def _ort_providers(options: BenchOptions) -> tuple[str, ...]:
    return ("CUDAExecutionProvider",) if options.device == "cuda" else ("CPUExecutionProvider",)


def _threads(options: BenchOptions) -> int:
    return options.threads or os.cpu_count() or 1


def _peak_memory(runner: Runner, feeds: dict, device: str) -> dict:
    """CUDA: torch's max allocated during one run. CPU: peak RSS growth during one warm run, so
    pass a runner without memory pools (`Runner.memory_probe`)."""
    if device == "cuda":
        if runner.name != "torch":
            return {"kind": "not measured", "peak_mb": None}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runner.run(feeds)
        torch.cuda.synchronize()
        return {"kind": "cuda_max_allocated", "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    runner.run(feeds)  # lazy initialisation is not the run's memory
    _release_freed_memory()
    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runner.run(feeds)
    finally:
        done.set()
        sampler.join()
    return {"kind": "rss_growth", "peak_mb": max(peak[0] - before, 0) / 2**20}


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc), so a run's allocations show up as RSS growth
    instead of reusing what earlier runs freed."""

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _time_candidates(candidates: list[Candidate], runtime: str, workload: str, options: BenchOptions,
                     pixel_shape: tuple[int, int, int], progress: Progress) -> list[dict]:
    rows = []
    runners = {c.r: c.make_runner() for c in candidates}
    for batch in options.batches:
        feeds = {"pixel_values": seeded_pixels(batch, pixel_shape, options.seed)}
        progress(f"timing {runtime} {workload} batch {batch}: r={','.join(str(c.r) for c in candidates)}")
        timers = {r: runner.timer(feeds, options.include_transfers) for r, runner in runners.items()}
        samples = interleaved(timers, options.warmup_s, options.iters, options.duration_s)
        stats = {r: TimingStats.from_samples(values, batch) for r, values in samples.items()}
        base = stats[0].median_ms
        for candidate in candidates:
            s = stats[candidate.r]
            speedup = base / s.median_ms
            bound = candidate.flops_bound if workload == "encoder" else None
            rows.append({
                "runtime": runtime, "workload": workload, "device": options.device, "precision": options.precision,
                "batch": batch, "r": candidate.r, "final_tokens": candidate.final_tokens,
                "latency": s.to_dict(), "noisy": s.noisy, "speedup": speedup, "flops_bound": bound,
                "efficiency": speedup / bound if bound else None,
                "memory": _peak_memory(runners[candidate.r].memory_probe(), feeds, options.device),
                "runner": runners[candidate.r].describe(),
            })
    return rows


def _caption_module(model, tokens: int):
    """pixel_values -> greedy caption ids of a fixed length (min = max new tokens)."""

    class Caption(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return (self.model.generate(pixel_values=pixel_values, max_new_tokens=tokens, min_new_tokens=tokens,
                                        num_beams=1, do_sample=False),)

    return Caption()


def _torch_candidates(plans: dict, workload: str, options: BenchOptions) -> list[Candidate]:
    dtype = TORCH_DTYPES[options.precision]

    def make(built) -> Runner:
        model, _ = build_merged_model(built, options.random_weights, options.kernel, options.seed)
        if workload == "caption":
            module, names = _caption_module(model, options.caption_tokens), ["sequences"]
        else:
            module = ExportModule(model, built)
            names = module.output_names()
        graph = options.device == "cuda" and workload != "caption" and options.cuda_graph is not False
        return TorchRunner(module, ["pixel_values"], names, options.device, dtype, options.torch_merge, graph)

    return [Candidate(r, b.plan.final_tokens, b.plan.speedup_bound, lambda b=b: make(b)) for r, b in plans.items()]


def _passed(directory: Path) -> bool:
    try:
        return open_export(directory).status == "passed"
    except TurboError:  # a cached export written by another turbo, cut short or changed: export again
        return False


def _cached_export(export_options, progress: Progress) -> Path:
    """A validated export from the cache, built once per distinct option set and model content
    (a checkpoint replaced in place gets a new entry). An entry another run is building is waited for."""

    source = export_options.plan().source  # bad settings (from a damaged manifest too) fail before any output
    content = content_fingerprint(source, export_options.random_weights)
    key = hashlib.sha256(json.dumps([asdict(export_options), content, versions(), EXPORT_FORMAT], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    out = cache_root() / "exports" / f"{Path(export_options.model).name}-r{export_options.r}-{key}"
    for _ in range(3):
        wait_for_other_run(out, CACHE_WAIT_S)
        if _passed(out):
            progress(f"using cached export {out}")
            return out
        progress(f"exporting {export_options.model} r={export_options.r} ({export_options.precision}) to {out}")
        try:
            result = run_export(export_options, out, force=True)
        except OutputClaimed:  # another run claimed it between the wait and this export: wait for it
            continue
        if not result.passed:
            raise TurboError(f"the r={export_options.r} export failed validation ({out}/turbo.json); not "
                             "benchmarking it")
        return out
    raise TurboError(f"the cached export {out} keeps being rebuilt by other runs; try again")


def _ort_runner(directory: Path, options: BenchOptions, workload: str = "encoder") -> Runner:
    """The export's encoder, (caption) its whole captioner at a fixed caption length, (vqa) its whole
    answering at a fixed answer length, or (itm) its matching head on pairs of one text and each
    image's merged tokens."""

    providers = _ort_providers(options)
    if workload == "itm":
        return MatchRunner(RetrievalPipeline.open(directory, _threads(options), providers))
    if workload == "vqa":
        return VqaRunner(VqaPipeline.open(directory, _threads(options)))
    if workload == "caption":
        return CaptionRunner(CaptionPipeline.open(directory, _threads(options), providers,
                                                  merge_kernel=options.ort_merge), options.caption_tokens)
    return OnnxRuntimeRunner(directory / MODEL_FILE, providers, threads=_threads(options),
                             merge_kernel=options.ort_merge)


def _trt_runner(directory: Path, options: BenchOptions, workload: str = "encoder") -> Runner:
    """The export's encoder engine (one CUDA-graph replay per run), or (caption) its captioner on
    the encoder and decoder engines at a fixed caption length."""

    engine = read_export_manifest(directory).tensorrt
    if engine is None or not engine.built:
        raise UsageError(f"{directory} has no TensorRT engine; export it with --trt")
    if workload == "caption":
        return CaptionRunner(CaptionPipeline.open(directory, tensorrt=True), options.caption_tokens)
    return TensorRTRunner(directory / engine.file, cuda_graph=True)


def _cannot_time(workload: str, runtime: str, every: dict[str, bool], candidates: list[Candidate]) -> str | None:
    """Why a workload cannot be timed on these exports and runtime, or None."""
    if workload == "caption" and not every["caption"]:
        return NO_DECODER
    if workload == "caption" and runtime == "trt" and not all(map(_has_caption_engines, candidates)):
        return NO_CAPTION_ENGINES
    if workload == "itm" and not every["itm"]:
        return NO_MATCH_HEAD
    if workload == "vqa" and not every["vqa"]:
        return NO_ANSWERER
    if workload in ON_ONNX and runtime == "trt":
        return f"{ON_ONNX[workload]} runs on ONNX Runtime (no TensorRT engine is built for it)"
    return None


def _has_caption_engines(candidate: Candidate) -> bool:
    engine = read_export_manifest(candidate.directory).tensorrt
    return engine is not None and bool((engine.decoder or {}).get("built"))


def _export_candidates(plans: dict, options: BenchOptions, progress: Progress, runtime: str,
                       workload: str, decoder: bool) -> list[Candidate]:
    """Cached exports (ONNX; for trt also an engine whose profile covers the benched batches)."""

    trt = TrtOptions(options.precision, min_batch=min(options.batches), opt_batch=max(options.batches),
                     max_batch=max(options.batches)) if runtime == "trt" else None
    candidates = []
    for r, built in plans.items():
        directory = _cached_export(ExportOptions(
            model=options.model, r=r, method=options.method, alpha=options.alpha, threshold=options.threshold,
            kernel=options.kernel, precision=trt.onnx_precision() if trt else options.precision,
            random_weights=options.random_weights, seed=options.seed, tiny=options.tiny, trt=trt,
            decoder=decoder), progress)
        runner = _trt_runner if trt else _ort_runner
        make = lambda d=directory: runner(d, options, workload)  # noqa: E731
        candidates.append(Candidate(r, built.plan.final_tokens, built.plan.speedup_bound, make))
    return candidates


def _identity(manifest) -> tuple:
    """What must match between a baseline and the exports it times: the same weights and input."""
    model = manifest.model
    return model.source, model.architecture, model.random_weights, model.seed, model.tiny, manifest.onnx.pixel_shape


def _dir_candidates(options: BenchOptions, progress: Progress) -> tuple[Manifest, list[Candidate], dict[str, bool]]:
    """Candidates from exported directories; the baseline is --baseline or an r=0 export built alike."""

    manifests = []
    for directory in options.export_dirs:
        manifest = open_export(directory)
        if manifest.failed:
            raise TurboError(f"{directory} failed validation at export; not benchmarking an unfaithful export")
        manifests.append((Path(directory), manifest))
    if len({_identity(m) for _, m in manifests}) > 1:
        raise UsageError("the directories hold different models or inputs; bench one model at a time")
    first = manifests[0][1]
    static = {m.onnx.static_batch for _, m in manifests} - {None}
    if static and set(options.batches) != static:
        raise UsageError(f"the exports have a static batch {sorted(static)}; pass --batch {','.join(map(str, static))}")
    if options.baseline_dir:
        baseline = open_export(options.baseline_dir)
        if baseline.plan.merges:
            raise UsageError(f"--baseline {options.baseline_dir} merges tokens (r={baseline.plan.r}); "
                             "it must be an r=0 export")
        if _identity(baseline) != _identity(first):
            raise UsageError(f"--baseline {options.baseline_dir} is another model ({baseline.model.architecture} "
                             f"from {baseline.model.source}, input {baseline.onnx.pixel_shape}) than the exports' "
                             f"({first.model.architecture} from {first.model.source}, input {first.onnx.pixel_shape}); "
                             "pass an r=0 export of the same model")
        manifests.insert(0, (Path(options.baseline_dir), baseline))
    elif all(m.plan.merges for _, m in manifests):  # no r=0 export given: build one alike
        baseline = replace(ExportOptions.from_manifest(first), r=0, schedule="constant")
        baseline_dir = _cached_export(baseline, progress)
        manifests.insert(0, (baseline_dir, open_export(baseline_dir)))
    if manifests[0][1].plan.tokens_in != first.plan.tokens_in:
        raise UsageError(f"the baseline has {manifests[0][1].plan.tokens_in} tokens but the exports "
                         f"{first.plan.tokens_in}; pass --baseline with an r=0 export of the same model")
    candidates, seen = [], set()
    for directory, manifest in manifests:
        r = manifest.turbo.r_requested if manifest.plan.merges else 0
        if r in seen:
            raise UsageError(f"two exports with r={r}; bench them in separate runs")
        seen.add(r)
        plan = manifest.plan
        candidates.append(Candidate(r, plan.final_tokens, plan.speedup_bound,
                                    lambda d=directory: _ort_runner(d, options), directory))
    every = {"caption": all(m.decoder is not None for _, m in manifests),
             "itm": all(m.text is not None and m.text.match_file is not None for _, m in manifests),
             "vqa": all(m.question is not None for _, m in manifests)}
    return first, sorted(candidates, key=lambda c: c.r), every


def run_bench(options: BenchOptions, progress: Progress = lambda message: None) -> dict:
    """Time every requested runtime and workload; the report follows docs/bench.schema.json."""

    _check(options)
    started = now()
    torch.set_num_threads(_threads(options))
    runtimes = options.runtimes
    if options.export_dirs and set(options.runtimes) - {"ort", "trt"}:
        raise UsageError("exported directories run on ONNX Runtime or, with an engine, TensorRT; "
                         "use --runtime ort or trt")
    skipped, runnable = [], []
    for runtime in runtimes:
        reason = unavailable_reason(runtime, options.device)
        if reason is None and runtime == "ort" and options.precision == "bf16":
            reason = "turbo exports ONNX in fp32 or fp16, not bf16"
        if reason:
            skipped.append({"runtime": runtime, "workload": "all", "reason": reason})
        else:
            runnable.append(runtime)
    if not runnable:
        raise MissingRuntimeError("; ".join(f"{s['runtime']}: {s['reason']}" for s in skipped))
    rows = []
    opened = [(Path(directory), open_export(directory)) for directory in options.export_dirs]
    if any(manifest.llm is not None for _, manifest in opened):  # LLM-based VLMs: first token and decode
        check_not_failed(opened)
        if runnable != ["ort"] or options.device != "cpu":
            raise UsageError("LLaVA exports are timed on ONNX Runtime on the CPU: use --runtime ort --device cpu")
        baseline = (Path(options.baseline_dir), open_export(options.baseline_dir)) if options.baseline_dir else None
        exports = generation_exports(opened, baseline, lambda export: _cached_export(export, progress), open_export)
        rows = time_generation(exports, options.caption_tokens, options.warmup_s, options.iters, options.duration_s,
                               options.threads, options.seed,
                               lambda runner, feeds: _peak_memory(runner.memory_probe(), feeds, "cpu"), progress)
        model = exports[0][1].model
        name, source, random_weights = model.name, model.source, model.random_weights
    elif options.export_dirs:
        first, candidates, every = _dir_candidates(options, progress)
        name, source, random_weights = first.model.name, first.model.source, first.model.random_weights
        pixel_shape = first.onnx.pixel_shape
        adapter = adapter_for(first.model.architecture)
        wanted = {"caption": adapter.caption_decoder is not None and options.caption,
                  "itm": adapter.text_tower is not None and adapter.text_tower.match is not None,
                  "vqa": adapter.question_answerer is not None}
        for runtime in runnable:
            runner = _trt_runner if runtime == "trt" else _ort_runner
            for workload in ("encoder", *(w for w, asked in wanted.items() if asked)):
                reason = _cannot_time(workload, runtime, every, candidates)
                if reason:
                    skipped.append({"runtime": runtime, "workload": workload, "reason": reason})
                    continue
                chosen = [replace(c, make_runner=lambda d=c.directory, w=workload: runner(d, options, w))
                          for c in candidates]
                rows += _time_candidates(chosen, runtime, workload, options, pixel_shape, progress)
    else:
        rs = sorted({0, *(options.rs if options.rs is not None
                          else [resolve_source(options.model, tiny=options.tiny).default_r])})
        plans = {r: build_plan(options.model, r, options.method, options.alpha, "constant", options.threshold,
                               tiny=options.tiny) for r in rs}
        source_info = plans[0].source
        name, source, random_weights = source_info.name, source_info.location, options.random_weights
        captioning = source_info.adapter.caption_decoder is not None and options.caption
        tower = source_info.adapter.text_tower
        workloads = ["encoder"] + (["caption"] if captioning else []) + (["itm"] if tower and tower.match else []) \
            + (["vqa"] if source_info.adapter.question_answerer else [])
        pixel_shape = plans[0].pixel_shape
        for runtime in runnable:
            for workload in workloads:
                if workload in ON_ONNX and runtime != "ort":
                    skipped.append({"runtime": runtime, "workload": workload,
                                    "reason": f"{ON_ONNX[workload]} is timed on its ONNX export (ONNX Runtime)"})
                    continue
                candidates = (_torch_candidates(plans, workload, options) if runtime == "torch" else
                              _export_candidates(plans, options, progress, runtime, workload,
                                                 decoder=runtime == "ort" or "caption" in workloads))
                rows += _time_candidates(candidates, runtime, workload, options, pixel_shape, progress)
    return {
        "schema": SCHEMA,
        "model": name,
        "source": source,
        "random_weights": random_weights,
        "config": {"device": options.device, "precision": options.precision, "batches": list(options.batches),
                   "warmup_s": options.warmup_s, "iters": options.iters, "duration_s": options.duration_s,
                   "include_transfers": options.include_transfers, "threads": _threads(options),
                   "caption_tokens": options.caption_tokens},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": versions(),
        "results": rows,
        "skipped": skipped,
        "started": started,
        "finished": now(),
    }
