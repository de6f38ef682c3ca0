"""`turbo check`: is an export directory what its manifest says, and does it still hold up?

For CI gates. Every check is one line in the report; any failed check fails the run.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from transformers import AutoTokenizer

from turbo.core.errors import TurboError, UsageError
from turbo.core.files import IMAGE_TOKENS, QUESTION_INPUTS, TOKENIZER_FILE
from turbo.core.integrity import IntegrityError, verify_files
from turbo.core.manifest import Manifest, ManifestError, PlanRecord, read_export_manifest
from turbo.export.decoder_validate import DECODER_RUN
from turbo.export.llm_export import LLM_RUN
from turbo.export.options import ExportOptions
from turbo.export.quant_export import INT8
from turbo.export.reference import prepare_model, validate_files
from turbo.export.text_export import SAMPLE_TEXTS
from turbo.export.validate import deployed_vector, graph_problems, mean_cosine, seeded_pixels
from turbo.export.vqa_export import SAMPLE_QUESTIONS, answers_agree
from turbo.graph.export_dir import manifest_mismatches
from turbo.graph.summary import checker_error, summarize
from turbo.graph.trt_lint import lint
from turbo.models.registry import adapter_for
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.retrieval import RetrievalPipeline, normalized
from turbo.runtimes.vqa import VqaPipeline
from turbo.tools.bench import BenchOptions, run_bench
from turbo.tools.retrieval_eval import fidelity


@dataclass(frozen=True)
class CheckItem:
    name: str
    passed: bool | None  # None: skipped (with the reason in detail)
    detail: str = ""


@dataclass
class CheckReport:
    directory: str
    items: list[CheckItem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.items) and all(item.passed is not False for item in self.items)

    def add(self, name: str, passed: bool | None, detail: str = "") -> bool | None:
        self.items.append(CheckItem(name, passed, detail))
        return passed

    def to_dict(self) -> dict:
        return {"directory": self.directory, "passed": self.passed, "checks": [asdict(item) for item in self.items]}


def _read_manifest(directory: Path, report: CheckReport) -> Manifest | None:
    try:
        manifest = read_export_manifest(directory)
    except ManifestError as exc:
        report.add("manifest", False, str(exc))
        return None
    report.add("manifest", not manifest.failed, f"export status {manifest.status}")
    return manifest


def _graph_checks(directory: Path, manifest: Manifest, built, report: CheckReport):
    onnx_info = manifest.onnx
    model_path = directory / onnx_info.file
    try:
        verify_files(directory, manifest.files)
    except IntegrityError as exc:  # reported; the graph checks below still say what differs
        report.add("files", False, str(exc))
    else:
        report.add("files", True, f"{len(manifest.files)} files as the export wrote them (sizes and SHA-256)")
    if not all((directory / name).is_file() for name in [onnx_info.file, *onnx_info.external_data]):
        return None
    error = checker_error(model_path)
    report.add("onnx.checker (full)", error is None, error or "")
    summary = summarize(model_path)
    differing = manifest_mismatches(summary, manifest)
    found = [block.r for block in summary.merge_blocks]
    report.add("graph vs manifest", not differing,
               "; ".join(differing) or f"{len(found)} merge blocks, r {found}, opset {summary.opset}")
    if built is not None:
        problems = graph_problems(summary, built.plan, manifest.turbo.merge_kernel, onnx_info.static_batch,
                                  manifest.onnx.output_tokens)
        report.add("graph vs plan", not problems, "; ".join(problems) or f"final tokens {built.plan.final_tokens}")
    findings = lint(model_path)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    report.add("TensorRT lint", not errors,
               "; ".join(sorted({f"{f.op_type}: {f.message}" for f in errors + warnings})) or "no findings")
    return summary


def run_check(directory: str | Path, max_diff: float | None = None, min_agreement: float | None = None,
              min_speedup: float | None = None, iters: int = 10) -> CheckReport:
    """Check one export directory; gates (max_diff, min_agreement, min_speedup) run only when given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; pass a `turbo export` output directory")
    if iters < 1:
        raise UsageError(f"--iters must be at least 1, not {iters}")
    report = CheckReport(str(directory))
    manifest = _read_manifest(directory, report)
    if manifest is None:
        return report
    try:
        built = ExportOptions.from_manifest(manifest).plan()
    except Exception as exc:  # a manifest whose settings no longer plan is a failed check, not a crash
        report.add("plan vs manifest", False, f"cannot re-plan: {exc}")
        built = None
    else:
        same = PlanRecord(**built.plan.to_dict()) == manifest.plan
        report.add("plan vs manifest", same, "re-planned from the manifest's settings" + ("" if same else
                                                                                            ": the plans differ"))
    summary = _graph_checks(directory, manifest, built, report)
    if manifest.decoder is not None:
        _decoder_checks(directory, manifest, built, report)
    if manifest.text is not None:
        _text_checks(directory, manifest, built, report)
    if summary is not None and built is not None:
        _revalidate(directory, manifest, built, report, max_diff, min_agreement)
    if min_speedup is not None:
        _speed_gate(directory, manifest, report, min_speedup, iters)
    return report


def _decoder_checks(directory: Path, manifest: Manifest, built, report: CheckReport) -> None:
    """A captioning export's decoder: files, onnx.checker, and image tokens that match the plan
    and the encoder (an encoder and decoder exported for different r do not fit)."""

    names = [*manifest.decoder.files, TOKENIZER_FILE]
    missing = [name for name in names if not (directory / name).is_file()]
    if report.add("decoder files", not missing, f"missing {', '.join(missing)}" if missing else
                  "first-step and with-past graphs, shared weights, tokenizer, generation config") is False:
        return
    problems = [f"{name}: {error}" for name in names[:2] if (error := checker_error(directory / name))]
    report.add("decoder onnx.checker (full)", not problems, "; ".join(problems))
    encoder = onnx.load(str(directory / manifest.onnx.file), load_external_data=False).graph.output[0]
    produced = encoder.type.tensor_type.shape.dim[1].dim_value
    if manifest.question is not None:
        _question_checks(directory, manifest, built, produced, report)
        return
    tokens = {}
    for name in names[:2]:
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        cross = next(i for i in graph.input if i.name in ("image_embeds", "past.0.cross.key"))
        dims = cross.type.tensor_type.shape.dim
        tokens[name] = dims[1].dim_value if cross.name == "image_embeds" else dims[2].dim_value
    planned = built.plan.final_tokens if built is not None else produced
    fits = set(tokens.values()) == {produced} == {planned}
    report.add("decoder image tokens", fits, f"encoder gives {produced}, plan {planned}, decoder graphs expect "
               + ", ".join(f"{count} ({name})" for name, count in tokens.items())
               + ("" if fits else ": exported for different r; re-export"))


def _question_checks(directory: Path, manifest: Manifest, built, produced: int, report: CheckReport) -> None:
    """A VQA export's question encoder: onnx.checker, and the image tokens it reads against the
    encoder's and the plan's (the answer decoder reads the question, of any length)."""
    name = manifest.question.file
    error = checker_error(directory / name)
    report.add("question encoder onnx.checker (full)", not error, error or name)
    if error:
        return
    _tokens_fit(report, "question encoder", directory / name, QUESTION_INPUTS[2], produced, built,
                manifest.question.image_tokens)


def _tokens_fit(report: CheckReport, reader: str, path: Path, input_name: str, produced: int, built,
                recorded: int) -> None:
    """The image tokens a text graph reads (its input `input_name`, (B, N, C)) against the tokens
    the encoder gives, the plan ends with and the manifest recorded."""
    graph = onnx.load(str(path), load_external_data=False).graph
    expected = next(i for i in graph.input if i.name == input_name).type.tensor_type.shape.dim[1].dim_value
    planned = built.plan.final_tokens if built is not None else produced
    fits = expected == produced == planned == recorded
    report.add(f"{reader} image tokens", fits, f"encoder gives {produced}, plan {planned}, the {reader} expects "
               f"{expected}" + ("" if fits else ": exported for different r; re-export"))


def _text_checks(directory: Path, manifest: Manifest, built, report: CheckReport) -> None:
    """A retrieval export's text side: onnx.checker on its graphs, and a matching head that reads
    as many image tokens as the encoder gives and the plan ends with."""
    names = manifest.text.files
    problems = [f"{name}: {error}" for name in names if (error := checker_error(directory / name))]
    report.add("text onnx.checker (full)", not problems, "; ".join(problems) or ", ".join(names))
    if manifest.text.match_file is None:
        return
    read = adapter_for(manifest.model.architecture).text_tower.match.image_tokens_output
    encoder = onnx.load(str(directory / manifest.onnx.file), load_external_data=False).graph
    produced = next(o for o in encoder.output if o.name == read).type.tensor_type.shape.dim[1].dim_value
    _tokens_fit(report, "matching head", directory / manifest.text.match_file, IMAGE_TOKENS, produced, built,
                manifest.text.image_tokens)


def _revalidate(directory: Path, manifest: Manifest, built, report: CheckReport, max_diff: float | None,
                min_agreement: float | None) -> None:
    """The export's own validation again (export.reference: the same PyTorch model, the same
    comparisons), when the weights can be had; then the gates."""
    options = ExportOptions.from_manifest(manifest)
    gated = max_diff is not None or min_agreement is not None
    try:  # a quantized decoder or language model calibrates on text tokenized as at export
        tokenizer = ((lambda: (AutoTokenizer.from_pretrained(directory), "the export's"))
                     if (manifest.decoder or manifest.llm) and manifest.quantization else None)
        reference = prepare_model(built, options, tokenizer, keep_unmerged=min_agreement is not None)
    except TurboError as exc:
        report.add("ORT vs PyTorch", False if gated else None, f"skipped, no reference model: {exc}")
        return
    path = directory / manifest.onnx.file
    try:
        validation = validate_files(reference, built, options, directory, summarize(path), manifest.decoder,
                                    manifest.text, manifest.question, manifest.llm, static_checks=False)
    except TurboError as exc:  # the decoder graphs do not fit the encoder (checked above, reported here too)
        report.add("ORT vs PyTorch", False, str(exc))
        return
    text_runs = (DECODER_RUN, LLM_RUN)
    encoder = [c for c in validation.outputs if not c.run.startswith(text_runs)]
    error = validation.runtime_error
    worst = max((c.max_abs_diff for c in encoder), default=float("inf"))
    if options.quant != INT8:
        decisions = sum(max(d.tokens_differing, 0) for d in validation.decisions if d.gated)
        passed = (not error or error.startswith(text_runs)) and validation.names_match and bool(encoder) \
            and all(c.passed for c in encoder + validation.decisions)
        report.add("ORT vs PyTorch", passed,
                   error or f"max abs diff {worst:.2e}, {decisions} gated merge decisions differ")
    if validation.quality:  # no PyTorch model computes an INT8 graph: its quality vs fp32 is the check
        report.add("quantized vs fp32", all(q.passed for q in validation.quality),
                   "; ".join(f"{q.name} {q.value:.4f} (min {q.minimum:g}{'' if q.gated else ', not gated'})"
                             for q in validation.quality))
    for record, run, name in ((manifest.decoder, DECODER_RUN, "decoder"), (manifest.llm, LLM_RUN, "language model")):
        if record is None:
            continue
        checks = [c for c in validation.outputs if c.run.startswith(run)]
        worst_logits = max((c.max_abs_diff for c in checks), default=float("inf"))
        differing = sum(c.sequences_differing for c in validation.captions)
        side_error = error if error and error.startswith(run) else None
        report.add(f"{name} vs PyTorch",
                   side_error is None and bool(checks) and all(c.passed for c in checks + validation.captions),
                   side_error or f"logits max abs diff {worst_logits:.2e}, {differing} greedy sequences differ")
    if max_diff is not None:
        report.add("gate: max diff", worst <= max_diff, f"{worst:.2e} (limit {max_diff:g})")
    if min_agreement is not None:
        if manifest.question is not None:
            value, what = _answer_agreement(directory, reference.unmerged, built)
        elif manifest.text is not None:
            value, what = _retrieval_agreement(directory, reference.unmerged, built)
        else:
            value, what = _agreement(path, reference.unmerged, built, options.batch)
        report.add("gate: agreement", value >= min_agreement, f"{what} {value:.4f} (limit {min_agreement:g})")


def _agreement(path: Path, unmerged, built, batch: int | None) -> tuple[float, str]:
    """Fidelity to the unmerged model on seeded inputs: ViT top-1 agreement; BLIP cosine of the
    size-weighted mean image token with the unmerged mean token."""

    count = batch or 16
    pixels = seeded_pixels(count, built.pixel_shape, seed=7)
    runner = OnnxRuntimeRunner(path)
    merged = runner.run({runner.input_names[0]: pixels})
    with torch.inference_mode():
        reference = built.source.adapter.export_outputs(unmerged.eval(), torch.from_numpy(pixels),
                                                        built.interpolate_pos_encoding)
    if "logits" in merged:
        agree = merged["logits"].argmax(-1) == reference["logits"].numpy().argmax(-1)
        return float(agree.mean()), f"top-1 agreement with the unmerged model on {count} seeded inputs"
    expected = {name: value.numpy() for name, value in reference.items()}
    token_output = next(iter(expected.values())).ndim == 3
    cosine = mean_cosine(deployed_vector(merged), deployed_vector(expected))  # (B, C) each
    what = "mean-token cosine" if token_output else f"{next(iter(expected))} cosine"
    return cosine, f"{what} with the unmerged model on {count} seeded inputs"


def _answer_agreement(directory: Path, unmerged, built) -> tuple[float, str]:
    """A VQA export's greedy answers on ONNX Runtime against the unmerged model's (each question
    alone, upstream generate), on seeded images and the validation questions."""
    pipeline = VqaPipeline.open(directory)
    count = pipeline.static_batch or 2
    pixels = seeded_pixels(count, built.pixel_shape, seed=7)
    pairs = [(i % count, question) for i, question in enumerate(SAMPLE_QUESTIONS)]
    agree = answers_agree(unmerged.eval(), pipeline, pixels, pairs, built.interpolate_pos_encoding)
    return sum(agree) / len(agree), f"greedy answer agreement with the unmerged model on {len(pairs)} seeded questions"


def _retrieval_agreement(directory: Path, unmerged, built) -> tuple[float, str]:
    """A retrieval export's rankings against the unmerged model's, with the export's own text
    embeddings: how often each seeded image's best text and each text's best image agree (turbo
    eval's top-1 agreement)."""
    pipeline = RetrievalPipeline.open(directory)
    count = pipeline.manifest.onnx.static_batch or 16
    pixels = seeded_pixels(count, built.pixel_shape, seed=7)
    merged = normalized(next(iter(pipeline.encoder.run({pipeline.encoder.input_names[0]: pixels}).values())))
    with torch.inference_mode():
        outputs = built.source.adapter.export_outputs(unmerged.eval(), torch.from_numpy(pixels),
                                                      built.interpolate_pos_encoding)
    base = normalized(next(iter(outputs.values())).numpy())
    texts = pipeline.text_embeddings(list(SAMPLE_TEXTS))
    value = fidelity(merged @ texts.T, base @ texts.T)["top1_agreement"]
    return value, f"retrieval top-1 agreement with the unmerged model ({count} seeded images, {len(texts)} texts)"


def _speed_gate(directory: Path, manifest: Manifest, report: CheckReport, min_speedup: float, iters: int) -> None:
    batch = manifest.onnx.static_batch or 1
    try:
        bench = run_bench(BenchOptions(runtimes=("ort",), batches=(batch,), iters=iters, warmup_s=0.5,
                                       caption=False, export_dirs=[directory]))
    except TurboError as exc:
        report.add("gate: speedup", False, f"could not bench: {exc}")
        return
    row = max((row for row in bench["results"] if row["workload"] == "encoder"), key=lambda row: row["r"])
    report.add("gate: speedup", row["speedup"] >= min_speedup,
               f"{row['speedup']:.2f}x vs r=0 on ORT CPU, batch {batch} (limit {min_speedup:g}x; "
               f"FLOPs bound {row['flops_bound']:.2f}x)")
