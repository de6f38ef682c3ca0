"""`turbo eval`: task metrics and label-free fidelity of merged models against r=0, and the
largest r within a given drop (`--r auto`).

VQA (BLIP): VQA accuracy against the human answers; fidelity = agreement of the (normalised)
answers with r=0's (tools/vqa_eval.py).

Retrieval (CLIP, BLIP): recall@1/5/10 both ways over the images' captions; fidelity = agreement
of each query's best match with r=0 and the rank correlation of its scores (tools/retrieval_eval.py).

ViT: top-1/top-5 on class folders; fidelity = top-1 agreement with r=0 and KL(r=0 ‖ r).
BLIP: BLEU-4 and CIDEr on COCO-format captions (pycocoevalcap; PTB tokenizer when Java is
present, else lower-case whitespace tokens); fidelity = exact-match rate of greedy captions
with r=0 and BLEU-4 of merged captions against the r=0 ones.
"""

import contextlib
import io
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import TurboError, TurboNote, UsageError
from turbo.core.manifest import Manifest
from turbo.data.images import batches, coco_captions, image_folder, pixel_batch
from turbo.data.vqa import vqa_questions
from turbo.export.onnx_export import TOKEN_SIZES
from turbo.export.options import ExportOptions, Stage, no_stage
from turbo.export.pipeline import ExportResult, run_export
from turbo.export.validate import deployed_vector, mean_cosine
from turbo.graph.export_dir import open_export
from turbo.merging.plan import max_r
from turbo.models.adapters import CAPTIONING, EMBEDDING, RETRIEVAL, VQA, Task
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import from_cache_or_hub, load_image_processor, resolve_source
from turbo.models.registry import adapter_for
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.vqa import VqaPipeline
from turbo.tools.retrieval_eval import RetrievalTexts
from turbo.tools.vqa_eval import VqaSet


@dataclass
class EvalOptions:
    model: str = "vit-b16"
    data: Path = Path(".")
    rs: list[int] | None = None  # None: the model's default r; "auto" is `max_drop` set
    max_drop: float | None = None  # --r auto: the largest r whose drop stays within this
    metric: str = "fidelity"  # what --r auto bounds: accuracy | fidelity
    labels_file: Path | None = None
    captions: Path | None = None  # COCO-format annotations (BLIP); images under `data`
    questions: Path | None = None  # VQA questions (and answers) JSON; images under `data`
    limit: int | None = None
    batch: int = 16
    max_tokens: int = 20
    beams: int = 1
    random_weights: bool = False
    tiny: bool = False
    method: str | None = None  # None: the model's default (turbo; tome without a CLS token)
    alpha: float | None = None
    threshold: int | None = None
    seed: int = 0
    image_size: int | tuple[int, int] | None = None  # (height, width); None: the model's input size
    export_dir: Path | None = None  # evaluate this ONNX export (ONNX Runtime) against r=0 in PyTorch


@dataclass
class EvalRun:
    r: int
    final_tokens: int
    flops_bound: float
    images_per_s: float
    metrics: dict = field(default_factory=dict)
    outputs: object = None
    runtime: str = "torch"  # logits (N, K) or caption id lists, for fidelity against r=0


def _tokenized(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB tokenizer when Java is present (as COCO evaluation does); lower-case words otherwise."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()):
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(c.lower().replace(".", " ").split()) for c in v] for k, v in captions.items()}


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr of candidates against references (pycocoevalcap scorers)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise TurboError("caption metrics need pycocoevalcap: pip install -e '.[eval]'") from None

    results = _tokenized({i: [c] for i, c in enumerate(candidates)})
    refs = _tokenized({i: list(r) for i, r in enumerate(references)})
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu = Bleu(4).compute_score(refs, results)[0][3]
        cider = Cider().compute_score(refs, results)[0]
    return {"bleu4": float(bleu), "cider": float(cider)}


def caption_tokenizer_name() -> str:
    return "PTB (Java)" if shutil.which("java") else "lower-case whitespace (no Java for the PTB tokenizer)"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: list[int] | None, base: np.ndarray) -> dict[str, float]:
    metrics = {"agreement": float((logits.argmax(-1) == base.argmax(-1)).mean())}
    p, q = _softmax(base.astype(np.float64)), _softmax(logits.astype(np.float64))
    metrics["kl"] = float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(-1).mean())
    if labels is not None:
        labels_arr = np.asarray(labels)
        top = np.argsort(-logits, axis=-1)
        metrics["top1"] = float((top[:, 0] == labels_arr).mean())
        if logits.shape[-1] >= 5:
            metrics["top5"] = float((top[:, :5] == labels_arr[:, None]).any(-1).mean())
    return metrics


def embedding_metrics(embeddings: np.ndarray, labels: list[int] | None, base: np.ndarray) -> dict[str, float]:
    """Cosine with the r=0 embeddings; with labels, leave-one-out nearest-neighbour top-1 (cosine)."""
    metrics = {"cosine": mean_cosine(embeddings.astype(np.float64), base.astype(np.float64))}
    if labels is not None and len(embeddings) > 1:
        unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        metrics["knn_top1"] = float((np.asarray(labels)[similarity.argmax(-1)] == np.asarray(labels)).mean())
    return metrics


def caption_metrics(ids: list[list[int]], base: list[list[int]], texts: list[str] | None,
                 base_texts: list[str] | None, references: list[list[str]] | None) -> dict[str, float]:
    metrics = {"exact_match": float(np.mean([a == b for a, b in zip(ids, base)]))}
    merged = texts if texts is not None else [" ".join(map(str, x)) for x in ids]
    unmerged = base_texts if base_texts is not None else [" ".join(map(str, x)) for x in base]
    metrics["bleu4_vs_r0"] = caption_scores(merged, [[u] for u in unmerged])["bleu4"]
    if references is not None and texts is not None:
        metrics.update(caption_scores(texts, references))
    return metrics


def _load_samples(options: EvalOptions, task: Task):
    if task in (CAPTIONING, RETRIEVAL) and options.captions is not None:
        samples, classes = coco_captions(options.captions, options.data), None
        if task is RETRIEVAL:
            uncaptioned = sum(not s.references for s in samples)
            if uncaptioned:
                warnings.warn(f"{uncaptioned} images of {options.captions} have no caption; left out of retrieval",
                              TurboNote, stacklevel=2)
            samples = [s for s in samples if s.references]
    else:
        samples, classes = image_folder(options.data, options.labels_file)
    return samples[: options.limit] if options.limit else samples, classes


def _tokenizer(source, random_weights: bool):
    """The BLIP tokenizer from the cache, or None (captions are then compared as token ids)."""

    if random_weights and source.spec is not None:
        return None

    try:
        return from_cache_or_hub(AutoTokenizer.from_pretrained, source.location)
    except Exception:  # no tokenizer files: ids are compared instead, and the report says so
        return None


def _evaluate(built, options: EvalOptions, pixels: np.ndarray) -> EvalRun:

    model, _ = build_merged_model(built, options.random_weights, seed=options.seed)
    adapter = built.source.adapter
    task = adapter.task_of(built.source.architecture)
    captioning = task is CAPTIONING
    outputs = []
    with torch.inference_mode():
        if not captioning:  # one warm-up forward, so images/s is not the first call's
            adapter.export_outputs(model, torch.from_numpy(pixels[: options.batch]), built.interpolate_pos_encoding)
        begin = time.perf_counter()
        for start in range(0, len(pixels), options.batch):
            x = torch.from_numpy(pixels[start:start + options.batch])
            if captioning:
                ids = model.generate(pixel_values=x, num_beams=options.beams, max_new_tokens=options.max_tokens,
                                     do_sample=False)
                outputs.extend(row.tolist() for row in ids)
            else:
                named = {name: value.numpy() for name, value in
                         adapter.export_outputs(model, x, built.interpolate_pos_encoding).items()}
                if model.turbo_state.size is not None:
                    named[TOKEN_SIZES] = model.turbo_state.size[..., 0].numpy()
                outputs.append(deployed_vector(named))
    seconds = time.perf_counter() - begin
    if not captioning:
        outputs = np.concatenate(outputs)
    return EvalRun(built.r_requested, built.plan.final_tokens, built.plan.speedup_bound, len(pixels) / seconds,
                   outputs=outputs)


def _evaluate_onnx(directory: Path, manifest: Manifest, pixels: np.ndarray, options: EvalOptions) -> EvalRun:
    """A ViT export's logits, or a BLIP export's caption ids (no prompt, as upstream `generate`
    without input_ids), on ONNX Runtime; a static batch is filled up to its size."""

    plan, r_requested = manifest.plan, manifest.turbo.r_requested
    if manifest.decoder is not None:
        pipeline = CaptionPipeline.open(directory)
        begin = time.perf_counter()
        results = pipeline.caption(pixels, "", options.batch, num_beams=options.beams,
                                   max_new_tokens=options.max_tokens)
        return EvalRun(r_requested, plan.final_tokens, plan.speedup_bound, len(pixels) / (time.perf_counter() - begin),
                       outputs=[r["ids"] for r in results], runtime="ort")
    batch = options.batch
    runner = OnnxRuntimeRunner(directory / manifest.onnx.file)
    static = manifest.onnx.static_batch
    size = static or batch
    runner.run({"pixel_values": pixels[:size]})  # warm-up
    vectors = []
    begin = time.perf_counter()
    for chunk, count in batches(pixels, size, static=bool(static)):
        vectors.append(deployed_vector(runner.run({"pixel_values": chunk}))[:count])
    seconds = time.perf_counter() - begin
    return EvalRun(r_requested, plan.final_tokens, plan.speedup_bound, len(pixels) / seconds,
                   outputs=np.concatenate(vectors), runtime="ort")


def _evaluate_vqa(built, options: EvalOptions, pixels: np.ndarray, vqa: VqaSet, manifest: Manifest | None) -> EvalRun:
    """Every question's greedy answer: an export's on ONNX Runtime (r > 0), else the model's in PyTorch."""
    if manifest is not None and built.r_requested:
        answers, seconds = vqa.onnx_answers(VqaPipeline.open(options.export_dir), pixels, options.batch)
        runtime = "ort"
    else:
        model, _ = build_merged_model(built, options.random_weights, seed=options.seed)
        answers, seconds = vqa.torch_answers(model.eval(), built, pixels, options.batch)
        runtime = "torch"
    return EvalRun(built.r_requested, built.plan.final_tokens, built.plan.speedup_bound, len(pixels) / seconds,
                   outputs=answers, runtime=runtime)


def _from_export(options: EvalOptions) -> tuple[EvalOptions, Manifest]:
    """The model, weights and merge settings an export was made with (its r=0 is the baseline)."""

    if options.max_drop is not None:
        raise UsageError("--r auto searches over models; use --model, not an export directory")
    manifest = open_export(options.export_dir)
    if adapter_for(manifest.model.architecture).caption_decoder is not None and manifest.decoder is None:
        raise UsageError(f"{options.export_dir} has no text decoder (exported by an older turbo); re-export it")
    made = ExportOptions.from_manifest(manifest)
    return replace(options, model=made.model, tiny=made.tiny, random_weights=made.random_weights, seed=made.seed,
                   method=made.method, alpha=made.alpha, threshold=made.threshold, rs=[made.r],
                   image_size=made.image_size), manifest


def _plan(options: EvalOptions, r: int):
    return build_plan(options.model, r, options.method, options.alpha, "constant", options.threshold,
                      tiny=options.tiny, image_size=options.image_size)


def _drop(metric: str, base: dict, run: dict, task: Task) -> float:
    if metric == "fidelity":
        return 1.0 - run[task.fidelity_metric]
    key = task.accuracy_metric
    if key not in base:
        raise UsageError(f"--metric accuracy needs {task.accuracy_data}; use --metric fidelity on unlabeled images")
    return base[key] - run[key]


def run_eval(options: EvalOptions, progress=lambda message: None) -> dict:
    """Evaluate r=0 and every requested r (or search for `--r auto`) on the same images."""

    if options.metric not in ("accuracy", "fidelity"):
        raise UsageError(f"unknown metric {options.metric!r}; choose accuracy or fidelity")
    if options.max_drop is not None and options.max_drop < 0:
        raise UsageError("--max-drop must be >= 0")
    if options.batch < 1:
        raise UsageError(f"--batch must be at least 1, not {options.batch}")
    if options.limit is not None and options.limit < 1:
        raise UsageError(f"--limit must be at least 1 image, not {options.limit}")
    for option, path in (("--labels", options.labels_file), ("--captions", options.captions),
                         ("--questions", options.questions)):
        if path is not None and not path.is_file():
            raise UsageError(f"{option} {path}: no such file")
    manifest = None
    if options.export_dir is not None:
        options, manifest = _from_export(options)
    source = resolve_source(options.model, tiny=options.tiny)
    task = source.adapter.task_of(source.architecture)
    captioning, retrieval, answering = task is CAPTIONING, task is RETRIEVAL, task is VQA
    if options.questions is not None and not answering:
        raise UsageError(f"--questions is for visual question answering models; {source.name} is an {task.name} "
                         "model")
    if answering and options.questions is None:
        raise UsageError(f"evaluating {source.name} (visual question answering) needs --questions: a VQAv2 or BLIP "
                         "questions JSON for the images under --data")
    if options.captions is not None and not (captioning or retrieval):
        raise UsageError(f"--captions is for captioning and retrieval models; {source.name} is an {task.name} model")
    if retrieval and options.captions is None:
        raise UsageError(f"evaluating {source.name} (image-text retrieval) needs --captions: a COCO or Karpathy "
                         "captions JSON for the images under --data")
    vqa = None
    if answering:
        questions = vqa_questions(options.questions, options.data)
        vqa = VqaSet(questions[: options.limit] if options.limit else questions, source, options.random_weights)
        samples, classes = vqa.samples, None
    else:
        samples, classes = _load_samples(options, task)
    if not samples:
        raise UsageError(f"--data {options.data}: no images to evaluate")
    base_plan = _plan(options, 0)
    if manifest is not None:  # the export's own preprocessing, as deployed

        processor = AutoImageProcessor.from_pretrained(options.export_dir)
    else:
        processor, _ = load_image_processor(source, base_plan.image_size, options.random_weights)

    pixels = pixel_batch(samples, processor, base_plan.pixel_shape[0])
    labels = [s.label for s in samples] if classes else None
    references = [list(s.references) for s in samples] if any(s.references for s in samples) else None
    tokenizer = _tokenizer(source, options.random_weights) if captioning else None
    if captioning and references is not None and tokenizer is None:
        raise UsageError(f"BLEU-4/CIDEr against references need the tokenizer of {source.location} in the "
                         "Hugging Face cache; without it, drop --captions for label-free fidelity")

    texts = RetrievalTexts(samples, source, options, manifest) if retrieval else None

    def decode(ids):
        return tokenizer.batch_decode(ids, skip_special_tokens=True) if tokenizer is not None else None

    runs: dict[int, EvalRun] = {}

    def evaluate(r: int) -> EvalRun:
        if r not in runs:
            progress(f"evaluating r={r} on {len(samples)} images")
            built = _plan(options, r)
            if vqa is not None:
                run = _evaluate_vqa(built, options, pixels, vqa, manifest)
            elif manifest and r:
                run = _evaluate_onnx(options.export_dir, manifest, pixels, options)
            else:
                run = _evaluate(built, options, pixels)
            base = runs[0] if r else run
            if vqa is not None:
                run.metrics = vqa.metrics(run.outputs, base.outputs)
            elif captioning:
                run.metrics = caption_metrics(run.outputs, base.outputs, decode(run.outputs), decode(base.outputs),
                                           references)
            elif retrieval:
                run.metrics = texts.metrics(run, base)
            elif task is EMBEDDING:
                run.metrics = embedding_metrics(run.outputs, labels, base.outputs)
            else:
                run.metrics = classification_metrics(run.outputs, labels, base.outputs)
            runs[r] = run
        return runs[r]

    evaluate(0)
    auto = None
    if options.max_drop is not None:
        cap = max_r(base_plan.plan.tokens_in, base_plan.plan.protected_tokens)
        auto = _search(options, task, base_plan, evaluate, cap)
    else:
        for r in options.rs if options.rs is not None else [source.default_r]:
            evaluate(r)
    return {
        "model": source.name, "source": source.location, "task": task.name,
        "random_weights": options.random_weights,
        "export": str(options.export_dir) if manifest else None,
        "data": str(options.data), "samples": len(samples), "classes": len(classes) if classes else None,
        "texts": len(texts.texts) if texts is not None else None,
        "questions": len(vqa.pairs) if vqa is not None else None,
        "questions_with_answers": vqa.with_answers if vqa is not None else None,
        "caption_tokenizer": caption_tokenizer_name() if captioning and references is not None else None,
        "captions_compared_as": None if not captioning else ("text" if tokenizer else "token ids"),
        "results": [{"r": run.r, "runtime": run.runtime, "final_tokens": run.final_tokens,
                     "flops_bound": run.flops_bound, "images_per_s": run.images_per_s, "metrics": run.metrics}
                    for _, run in sorted(runs.items())],
        "auto": auto,
    }


def _search(options: EvalOptions, task: Task, base_plan, evaluate, cap: int) -> dict:
    """Largest constant r whose drop stays within max_drop, by bisection over the r values that
    change the plan's FLOPs (clamped or threshold-bound values that plan alike are skipped);
    it assumes the drop grows with r."""

    candidates, seen = [], {base_plan.plan.flops}
    for r in range(1, cap + 1):
        flops = _plan(options, r).plan.flops
        if flops not in seen:
            seen.add(flops)
            candidates.append(r)
    base = evaluate(0).metrics
    curve, low, high, chosen = [], 0, len(candidates) - 1, 0
    while low <= high:
        middle = (low + high) // 2
        r = candidates[middle]
        drop = _drop(options.metric, base, evaluate(r).metrics, task)
        curve.append({"r": r, "drop": drop, "within": drop <= options.max_drop})
        if drop <= options.max_drop:
            chosen, low = r, middle + 1
        else:
            high = middle - 1
    return {"metric": options.metric, "max_drop": options.max_drop, "candidates": len(candidates),
            "curve": sorted(curve, key=lambda point: point["r"]), "chosen_r": chosen}


@dataclass(frozen=True)
class AutoR:
    """`turbo export --r auto`: choose r by the eval search on these images."""

    data: Path
    max_drop: float
    metric: str = "fidelity"


def export_with_r(options: ExportOptions, output: str | Path, auto: AutoR | None = None, force: bool = False,
                  stage: Stage = no_stage, command_line: str | None = None,
                  progress=lambda message: None) -> ExportResult:
    """`turbo export`: with `auto`, r is the largest within the drop on `auto.data` (the search's
    curve goes into the manifest's `turbo.r_auto`); then the export itself."""
    if auto is not None:
        source = resolve_source(options.model, tiny=options.tiny)
        if source.adapter.task_of(source.architecture) is VQA:
            raise UsageError(f"--r auto cannot choose r for {source.name} (visual question answering) from images "
                             "alone; compare r values with turbo eval --questions FILE --r 8,16,... and export one")
        report = run_eval(EvalOptions(model=options.model, data=auto.data, max_drop=auto.max_drop, metric=auto.metric,
                                      image_size=options.image_size,
                                      method=options.method, alpha=options.alpha, threshold=options.threshold,
                                      tiny=options.tiny, random_weights=options.random_weights), progress)
        r_auto = {**report["auto"], "data": report["data"], "samples": report["samples"]}
        progress(f"--r auto chose r={r_auto['chosen_r']} ({auto.metric} drop ≤ {auto.max_drop:g} on "
                 f"{r_auto['samples']} images)")
        options = replace(options, r=r_auto["chosen_r"], r_auto=r_auto)
    return run_export(options, output, force, stage, command_line)
