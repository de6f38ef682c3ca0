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
from turbo.data.images import batches, coco_captions, image_folder, pixel_batch, smallest_side
from turbo.data.vqa import vqa_questions
from turbo.export.onnx_export import TOKEN_SIZES
from turbo.export.options import ExportOptions, Stage, no_stage
from turbo.export.pipeline import ExportResult, run_export
from turbo.export.validate import deployed_vector, mean_cosine
from turbo.graph.export_dir import open_export
from turbo.merging.plan import max_r
from turbo.models.adapters import CAPTIONING, EMBEDDING, GENERATION, RETRIEVAL, VQA, Task
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import from_cache_or_hub, load_image_processor, resolve_source
from turbo.models.registry import adapter_for
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.vqa import VqaPipeline
from turbo.tools.generation_eval import run_generation_eval
from turbo.tools.merge_choice import (
    Candidate,
    check_candidates,
    check_decision_data,
    check_image_sizes,
    choose,
    selection_metric,
)
from turbo.tools.retrieval_eval import RetrievalTexts
from turbo.tools.vqa_eval import VqaSet


@dataclass
class EvalOptions:
    model: str = "vit-b16"
    data: Path = Path(".")
    rs: list[int] | None = None  # None: the model's default r; "auto" is `max_drop` set
    max_drop: float | None = None  # --r auto: the largest r whose drop stays within this
    metric: str | None = None  # what --r auto bounds and a choice maximises: accuracy | fidelity (None: see run_eval)
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
    candidates: list[Candidate] | None = None  # merge settings to compare (None: method and alpha above)
    choose: bool = False  # pick the best candidate (--method auto / --alpha auto) instead of reporting them all
    llm_drop: str | None = None  # LLM-based VLMs: the reduction inside the language model (None: none)
    prompt: str | None = None  # LLM-based VLMs: the prompt template, with <image> and {question}


@dataclass
class EvalRun:
    r: int
    final_tokens: int
    flops_bound: float
    images_per_s: float
    metrics: dict = field(default_factory=dict)
    outputs: object = None  # logits (N, K) or caption id lists, for fidelity against r=0
    runtime: str = "torch"
    candidate: Candidate | None = None  # the merge setting (None: the options' method and alpha)


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


def _generation_eval(options: EvalOptions, source, manifest: Manifest | None, progress) -> dict:
    """An LLM-based VLM: its settings' greedy answers against the unreduced model's."""
    if options.max_drop is not None or options.candidates or options.choose:
        raise UsageError("--r auto, --method auto, --alpha auto and --sweep do not choose for LLM-based VLMs yet; "
                         "give --r and --llm-drop")
    drop = options.llm_drop
    if manifest is not None:
        if manifest.llm is None:
            raise UsageError(f"{options.export_dir} has no language model graphs (exported with --no-decoder); "
                             "re-export it with them")
        if drop is not None:
            raise UsageError(f"{options.export_dir} is an export: it carries its --llm-drop; drop the option")
        drop = manifest.llm.llm_drop
    return run_generation_eval(options.model, options.data, options.rs or [source.default_r], drop,
                               options.questions, options.prompt, options.limit, options.max_tokens,
                               options.random_weights, options.tiny, options.method, options.alpha, options.threshold,
                               options.seed, options.export_dir if manifest is not None else None, progress)


def _plan(options: EvalOptions, r: int, candidate: Candidate | None = None):
    method, alpha, fusion = (options.method, options.alpha, "s1") if candidate is None else (
        candidate.method, candidate.alpha, candidate.fusion)
    return build_plan(options.model, r, method, alpha, "constant", options.threshold, fusion,
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

    if options.metric not in (None, "accuracy", "fidelity"):
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
    if task is GENERATION:
        return _generation_eval(options, source, manifest, progress)
    if options.llm_drop is not None or options.prompt is not None:
        raise UsageError(f"--llm-drop and --prompt are for LLM-based VLMs (llava, blip2); {source.name} is an "
                         f"{task.name} model")
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

    runs: dict[tuple[Candidate | None, int], EvalRun] = {}

    def evaluate(r: int, candidate: Candidate | None = None) -> EvalRun:
        key = (candidate if r else None, r)  # r=0 is one run whatever the setting
        if key not in runs:
            setting = f"{candidate.label}, " if key[0] is not None else ""
            progress(f"evaluating {setting}r={r} on {len(samples)} images")
            built = _plan(options, r, candidate)
            if vqa is not None:
                run = _evaluate_vqa(built, options, pixels, vqa, manifest)
            elif manifest and r:
                run = _evaluate_onnx(options.export_dir, manifest, pixels, options)
            else:
                run = _evaluate(built, options, pixels)
            base = runs[None, 0] if r else run
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
            run.candidate = key[0]
            runs[key] = run
        return runs[key]

    if options.candidates:
        check_candidates(options.candidates, source.adapter.has_cls_token(source.config), source.adapter.family)
    if options.choose:
        check_decision_data(len(samples), "choosing the merge")
        check_image_sizes(smallest_side(samples), base_plan.image_size)
        if options.rs is not None and len(options.rs) != 1:
            raise UsageError("--method auto and --alpha auto choose at one r: give one --r value (or --r auto)")
    evaluate(0)
    auto = choice = None
    if options.choose:
        choice = _choose(options, task, evaluate, base_plan, source)
        auto = choice.pop("r_auto")
    elif options.max_drop is not None:
        auto = _search(options, task, evaluate, _distinct_rs(options, base_plan), options.metric or "fidelity")
    else:
        for candidate in options.candidates or [None]:
            for r in options.rs if options.rs is not None else [source.default_r]:
                evaluate(r, candidate)
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
                     "flops_bound": run.flops_bound, "images_per_s": run.images_per_s, "metrics": run.metrics,
                     **({"candidate": run.candidate.to_dict()} if run.candidate is not None else {})}
                    for run in sorted(runs.values(), key=lambda run: run.r)],
        "auto": auto,
        "choice": choice,
    }


def _distinct_rs(options: EvalOptions, base_plan) -> list[int]:
    """The r values from 1 to the cap that change the plan's FLOPs (clamped or threshold-bound
    values that plan alike are skipped)."""
    cap = max_r(base_plan.plan.tokens_in, base_plan.plan.protected_tokens)
    rs, seen = [], {base_plan.plan.flops}
    for r in range(1, cap + 1):
        flops = _plan(options, r).plan.flops
        if flops not in seen:
            seen.add(flops)
            rs.append(r)
    return rs


def _search(options: EvalOptions, task: Task, evaluate, rs: list[int], metric: str,
            candidate: Candidate | None = None) -> dict:
    """Largest r of `rs` (ascending) whose drop stays within max_drop, by bisection; it assumes
    the drop grows with r. 0 when none is within."""
    base = evaluate(0).metrics
    curve, low, high, chosen = [], 0, len(rs) - 1, 0
    while low <= high:
        middle = (low + high) // 2
        r = rs[middle]
        drop = _drop(metric, base, evaluate(r, candidate).metrics, task)
        curve.append({"r": r, "drop": drop, "within": drop <= options.max_drop})
        if drop <= options.max_drop:
            chosen, low = r, middle + 1
        else:
            high = middle - 1
    return {"metric": metric, "max_drop": options.max_drop, "candidates": len(rs),
            "curve": sorted(curve, key=lambda point: point["r"]), "chosen_r": chosen}


def _choose(options: EvalOptions, task: Task, evaluate, base_plan, source) -> dict:
    """`--method auto` / `--alpha auto`: every candidate at one r (the given one, the model's, or
    with --r auto the largest within the drop for the model's own setting), the best kept; with
    --r auto a winner other than the model's setting then searches the larger r values alone."""
    metric = selection_metric(options.metric, task, evaluate(0).metrics, options.random_weights)
    default = Candidate.of(options.method or source.method, source.alpha if options.alpha is None else options.alpha)
    r_auto = None
    if options.max_drop is not None:
        rs = _distinct_rs(options, base_plan)
        r_auto = _search(options, task, evaluate, rs, metric, default)
        r = r_auto["chosen_r"]
    else:
        r = options.rs[0] if options.rs else source.default_r
    if r == 0:
        within = f" (no r keeps the {metric} drop within {options.max_drop:g})" if r_auto else ""
        raise UsageError(f"every method is the same at r=0{within}: give an r to choose the merge at")
    rows = [{"candidate": c.to_dict(), "r": r, "metrics": evaluate(r, c).metrics} for c in options.candidates]
    decision = choose(rows, task, metric)
    winner = Candidate(**{k: v for k, v in decision["candidate"].items() if k != "label"})
    if r_auto is not None and winner != default:
        further = _search(options, task, evaluate, [x for x in rs if x > r], metric, winner)
        r_auto["winner_curve"] = further["curve"]
        if further["chosen_r"]:
            decision["reason"] += (f"; compared at r={r}, then --r auto found r={further['chosen_r']} within the "
                                   f"drop for {winner.label}")
            r = r_auto["chosen_r"] = further["chosen_r"]
    return {**decision, "r": r, "default": default.to_dict(), "scores": rows, "r_auto": r_auto}


@dataclass(frozen=True)
class AutoChoice:
    """`turbo export --r auto` and/or `--method auto` / `--alpha auto`: choose on these images."""

    data: Path
    max_drop: float | None = None  # --r auto: the largest drop allowed
    metric: str | None = None
    candidates: list[Candidate] | None = None  # the merge settings to choose from


def export_with_choice(options: ExportOptions, output: str | Path, auto: AutoChoice | None = None,
                       force: bool = False, stage: Stage = no_stage, command_line: str | None = None,
                       progress=lambda message: None) -> ExportResult:
    """`turbo export`: with `auto`, r (the largest within the drop) and/or the merge (the best
    candidate) are chosen on `auto.data` by `run_eval`, recorded in the manifest's `turbo.r_auto`
    and `turbo.merge_auto`; then the one export."""
    if auto is not None:
        source = resolve_source(options.model, tiny=options.tiny)
        task = source.adapter.task_of(source.architecture)
        if task in (VQA, RETRIEVAL):
            needs = "--questions" if task is VQA else "--captions"
            raise UsageError(f"--r auto and --method/--alpha auto cannot choose for {source.name} ({task.name}) from "
                             f"images alone; compare settings with turbo eval {needs} FILE --sweep ... and export one")
        choosing = bool(auto.candidates)
        report = run_eval(EvalOptions(model=options.model, data=auto.data, max_drop=auto.max_drop, metric=auto.metric,
                                      rs=[options.r] if options.r is not None else None,
                                      image_size=options.image_size, candidates=auto.candidates, choose=choosing,
                                      method=options.method, alpha=options.alpha, threshold=options.threshold,
                                      tiny=options.tiny, random_weights=options.random_weights), progress)
        seen = {"data": report["data"], "samples": report["samples"]}
        if report["auto"] is not None:
            r_auto = {**report["auto"], **seen}
            progress(f"--r auto chose r={r_auto['chosen_r']} ({r_auto['metric']} drop ≤ {auto.max_drop:g} on "
                     f"{r_auto['samples']} images)")
            options = replace(options, r=r_auto["chosen_r"], r_auto=r_auto)
        if choosing:
            choice = {**report["choice"], **seen}
            winner = choice["candidate"]
            progress(f"chose {winner['label']} at r={choice['r']}: {choice['reason']}")
            options = replace(options, method=winner["method"], alpha=winner["alpha"], fusion=winner["fusion"],
                              r=choice["r"], merge_auto=choice)
    return run_export(options, output, force, stage, command_line)
