"""Validate an export: ONNX Runtime against PyTorch per output, merge decisions, and the graph
against the plan. Like optimum's validation: names match, shapes match, max abs diff vs atol."""

import copy
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from torch import nn

from turbo.core.errors import describe_error
from turbo.core.manifest import OutputTokens
from turbo.export.onnx_export import INPUT_NAME, TOKEN_SIZES
from turbo.graph.precision import upcast_fp16
from turbo.graph.summary import GraphSummary, checker_error
from turbo.merging.plan import TokenPlan, max_r
from turbo.runtimes.base import Runner
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.pytorch import TorchRunner


@dataclass(frozen=True)
class Tolerance:
    """How close a run must be. fp32 must take PyTorch's merge decisions exactly. Half precision
    legitimately flips near-tied decisions (score gaps below fp16 resolution), and a flip shifts
    token positions: flipped samples are then reported through decision-invariant summaries
    (the CLS token and the size-weighted mean token), not gated."""

    atol: float
    flips_allowed: bool


EXACT = Tolerance(1e-4, flips_allowed=False)
# An fp16 graph upcast to fp32 keeps the constants it rounded when exported: SDPA's split
# sqrt(scale) 0.35355 becomes 0.35352, about 1.6e-4 on ViT-B/16's hidden states.
UPCAST = Tolerance(1e-3, flips_allowed=False)
HALF = Tolerance(1e-2, flips_allowed=True)
BATCHES = (1, 3)
AS_WRITTEN = "graph"  # validation runs TurboMerge nodes as the file's ONNX functions, not the fused CPU kernel
TORCH_OPS = "ops"  # and the PyTorch reference's Turbo steps as PyTorch ops, not the fused CPU step


@dataclass(frozen=True)
class OutputCheck:
    run: str  # which comparison this belongs to
    name: str
    batch: int
    expected_shape: tuple[int, ...]
    actual_shape: tuple[int, ...]
    max_abs_diff: float  # over samples whose decisions agree (inf: shapes differ; 0: none agree)
    atol: float
    flipped_samples: int = 0
    flipped_max_abs_diff: float | None = None  # CLS and size-weighted mean of the flipped samples

    @property
    def passed(self) -> bool:
        return self.expected_shape == self.actual_shape and self.max_abs_diff <= self.atol


def exact_check(run: str, name: str, want: np.ndarray, got: np.ndarray) -> OutputCheck:
    """An output compared in float64 at EXACT tolerance (text graphs: no merge decisions to flip)."""
    diff = float(np.abs(want.astype(np.float64) - got.astype(np.float64)).max()) if want.shape == got.shape \
        else float("inf")
    return OutputCheck(run, name, len(want), want.shape, got.shape, diff, EXACT.atol)


@dataclass(frozen=True)
class DecisionCheck:
    """Merge decisions read back through token_sizes (patches per output token)."""

    run: str
    batch: int
    tokens_differing: int  # positions whose size differs (-1: shapes differ)
    tokens: int
    gated: bool  # False where near-tie flips are expected (half precision)

    @property
    def passed(self) -> bool:
        if self.tokens_differing < 0:
            return False
        return self.tokens_differing == 0 or not self.gated


@dataclass
class ValidationReport:
    reference: str
    candidate: str
    checker_error: str | None = None
    runtime_error: str | None = None  # the candidate could not load or run the model
    names_match: bool = True
    outputs: list[OutputCheck] = field(default_factory=list)
    decisions: list[DecisionCheck] = field(default_factory=list)
    graph_problems: list[str] = field(default_factory=list)
    captions: list = field(default_factory=list)  # decoder_validate.CaptionCheck, for captioning exports
    quality: list = field(default_factory=list)  # quant_export.QualityCheck, for quantized exports

    @property
    def passed(self) -> bool:
        return (self.checker_error is None and self.runtime_error is None and self.names_match
                and not self.graph_problems and bool(self.outputs or self.quality)
                and all(c.passed for c in self.outputs + self.decisions + self.captions + self.quality))

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "onnx_checker": self.checker_error or "passed",
            "runtime_error": self.runtime_error,
            "names_match": self.names_match,
            "outputs": [{**asdict(c), "passed": c.passed} for c in self.outputs],
            "merge_decisions": [{**asdict(c), "passed": c.passed} for c in self.decisions],
            "graph_problems": self.graph_problems,
            **({"captions": [{**asdict(c), "passed": c.passed} for c in self.captions]} if self.captions else {}),
            **({"quality": [{**asdict(c), "passed": c.passed} for c in self.quality]} if self.quality else {}),
        }


def seeded_pixels(batch: int, pixel_shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Fixed inputs (batch, C, H, W): normalised-image statistics, one seed per batch size."""
    rng = np.random.default_rng(seed * 1000 + batch)
    return rng.standard_normal((batch, *pixel_shape)).astype(np.float32)


def weighted_mean_token(tokens: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """(S, N, C), token sizes (S, N') -> (S, C): the mean over the original patches, whatever was
    merged (without sizes, every token counts once). Sizes of leading tokens the output leaves out
    (LLaVA's features: the CLS token) are skipped."""
    tokens = tokens.astype(np.float64)
    if sizes is None:
        sizes = np.ones(tokens.shape[:2])
    sizes = sizes[:, sizes.shape[1] - tokens.shape[1]:].astype(np.float64)
    return (tokens * sizes[..., None]).sum(axis=1) / sizes.sum(axis=1, keepdims=True)


def deployed_vector(named: dict[str, np.ndarray]) -> np.ndarray:
    """The deployed (first) output per image: logits or an embedding (N, K); token outputs are
    pooled by their size-weighted mean token."""
    value = next(iter(named.values()))
    return weighted_mean_token(value, named.get(TOKEN_SIZES)) if value.ndim == 3 else value


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """(S, C), (S, C) -> the cosine of each row pair, averaged."""
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).mean())


def _compare(run: str, name: str, batch: int, want: np.ndarray, got: np.ndarray, flipped: np.ndarray,
             sizes: tuple, atol: float) -> OutputCheck:
    """Position-wise over samples whose decisions agree; flipped samples are summarised (their
    token outputs by the CLS token and the size-weighted mean token)."""
    if want.shape != got.shape:
        return OutputCheck(run, name, batch, want.shape, got.shape, float("inf"), atol)
    agree = ~flipped
    diff = float(np.abs(want[agree] - got[agree]).max()) if agree.any() else 0.0
    if not flipped.any():
        return OutputCheck(run, name, batch, want.shape, got.shape, diff, atol)
    w, g = want[flipped], got[flipped]
    if want.ndim == 3:
        cls = np.abs(w[:, 0] - g[:, 0]).max()  # CLS is never merged
        mean = np.abs(weighted_mean_token(w, sizes[0][flipped]) - weighted_mean_token(g, sizes[1][flipped])).max()
        flipped_diff = max(cls, mean)
    else:
        flipped_diff = np.abs(w - g).max()
    return OutputCheck(run, name, batch, want.shape, got.shape, diff, atol, int(flipped.sum()), float(flipped_diff))


def compare_runners(run: str, reference: Runner, candidate: Runner, report: ValidationReport,
                    pixel_shape: tuple[int, int, int],
                    batches: tuple[int, ...], tolerance: Tolerance, seed: int = 0,
                    input_dtype: type = np.float32) -> None:
    """Run both on the same seeded inputs (rounded through `input_dtype`); append one check per
    output and batch, and the merge-decision check when both return token_sizes."""
    report.names_match = report.names_match and reference.output_names == candidate.output_names
    input_name = reference.input_names[0]
    for batch in batches:
        pixels = seeded_pixels(batch, pixel_shape, seed).astype(input_dtype).astype(np.float32)
        expected = {k: v.astype(np.float64) for k, v in reference.run({input_name: pixels}).items()}
        actual = {k: v.astype(np.float64) for k, v in candidate.run({input_name: pixels}).items()}
        flipped = np.zeros(batch, dtype=bool)  # (B,) samples whose decisions differ
        sizes = (expected.get(TOKEN_SIZES), actual.get(TOKEN_SIZES))
        if sizes[0] is not None and sizes[1] is not None:
            if sizes[0].shape == sizes[1].shape:
                differing = sizes[0] != sizes[1]  # (B, N)
                if tolerance.flips_allowed:
                    flipped = differing.any(axis=1)
                count = int(differing.sum())
            else:
                count = -1
            report.decisions.append(DecisionCheck(run, batch, count, sizes[0].size, not tolerance.flips_allowed))
        for name in reference.output_names:
            if name != TOKEN_SIZES and name in actual:
                report.outputs.append(_compare(run, name, batch, expected[name], actual[name], flipped, sizes,
                                               tolerance.atol))


def graph_problems(summary: GraphSummary, plan: TokenPlan, kernel: str, batch: int | None,
                   tokens: OutputTokens = OutputTokens()) -> list[str]:
    """Where the exported graph disagrees with the plan or breaks the export rules.

    Token outputs are (B, N, C) ones and token_sizes (B, N); batch None means a dynamic axis.
    `tokens`: what each token output holds (the family's); a decided output's count is a run-time
    axis, its graph's spatial merge the only place sorts and scatters may decide it.
    """
    problems = []
    if tokens.decided and not summary.spatial_nodes:
        problems.append(f"{', '.join(tokens.decided)} should be sized per image by a spatial merge the graph lacks")
    merging = [layer for layer in plan.layers if layer.r > 0]
    blocks = summary.merge_blocks
    if len(blocks) != len(merging):
        problems.append(f"the graph has {len(blocks)} merge blocks but the plan merges in {len(merging)} layers")
    for block, layer in zip(blocks, merging):
        mergeable = layer.tokens_in - plan.protected_tokens
        ranked = mergeable if plan.method == "pitome" else max_r(layer.tokens_in, plan.protected_tokens)  # A side
        if (block.r, block.ranked) != (layer.r, ranked):
            problems.append(f"{block.scope}: r={block.r} of {block.ranked} ranked tokens, but the plan has "
                            f"r={layer.r} of {ranked} in layer {layer.index}")
    if summary.dynamic_topk or summary.unscoped_topk:
        problems.append(f"{summary.dynamic_topk} TopK with a run-time K and {summary.unscoped_topk} "
                        "outside merge blocks (every K must be a plan constant)")
    if summary.op_counts.get("ScatterND"):
        problems.append("the graph has ScatterND nodes (in-place index writes)")
    if kernel == "matmul" and summary.scatter_reductions:
        problems.append("the matmul merge kernel exported ScatterElements nodes")
    if any(reduction != "add" for reduction in summary.scatter_reductions):
        problems.append(f"ScatterElements reductions {sorted(set(summary.scatter_reductions))}: only 'add' is exact "
                        "(a 'mean' scatter exports as 'none')")
    for output in summary.outputs:
        batch_dim = output.shape[0] if output.shape else None
        if not (batch_dim == batch if batch else isinstance(batch_dim, str)):
            problems.append(f"output {output.name} has batch dim {batch_dim!r}, expected "
                            f"{batch if batch else 'a dynamic axis'}")
        is_token_output = len(output.shape) == 3 or output.name == TOKEN_SIZES
        expected = tokens.expected(output.name, plan.final_tokens)
        if is_token_output and not tokens.holds(output.name, output.shape[1], plan.final_tokens):
            part = "; its spatial merge should decide it per image" if expected is None \
                else f"; it should hold {expected}" if expected != plan.final_tokens else ""
            problems.append(f"output {output.name} has token dim {output.shape[1]!r} but the plan ends with "
                            f"{plan.final_tokens} tokens{part}")
    return problems


def validate_export(module: nn.Module, output_names: list[str], onnx_path: Path, summary: GraphSummary,
                    plan: TokenPlan, kernel: str, batch: int | None, precision: str,
                    pixel_shape: tuple[int, int, int], seed: int = 0, static_checks: bool = True,
                    compare: bool = True, tokens: OutputTokens = OutputTokens()) -> ValidationReport:
    """The full check of one export: onnx.checker, graph vs plan, ONNX Runtime (CPU) vs PyTorch.

    `module` is the fp32 PyTorch model. An fp16 export is checked twice: upcast to fp32, it must
    equal the model with fp16-rounded weights exactly (decisions included); run in fp16, it is
    compared with the fp32 model at the half-precision tolerance. static_checks=False skips
    onnx.checker and the graph-vs-plan check (for callers that ran them already). compare=False
    skips the comparison with `module` (INT8 QDQ graphs quantize activations, so no PyTorch model
    computes what they compute; their caller gates them on quality against fp32 instead).
    `tokens`: what each token output holds (the family's).
    """

    report = ValidationReport(reference="pytorch (cpu, fp32)",
                              candidate=f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider")
    if static_checks:
        report.checker_error = checker_error(onnx_path)
        report.graph_problems = graph_problems(summary, plan, kernel, batch, tokens)
    if not compare:
        return report
    batches = BATCHES if batch is None else (batch,)
    reference = TorchRunner(module, [INPUT_NAME], output_names, merge_kernel=TORCH_OPS)
    try:
        runner = OnnxRuntimeRunner(onnx_path, exact=True, merge_kernel=AS_WRITTEN)
        if precision == "fp16":
            rounded = TorchRunner(copy.deepcopy(module).half().float(), [INPUT_NAME], output_names,
                                  merge_kernel=TORCH_OPS)
            with tempfile.TemporaryDirectory() as scratch:
                upcast_path = Path(scratch) / "upcast.onnx"
                onnx.save(upcast_fp16(onnx.load(str(onnx_path))), str(upcast_path), save_as_external_data=True)
                upcast = OnnxRuntimeRunner(upcast_path, exact=True, merge_kernel=AS_WRITTEN)
                compare_runners("fp16 graph in fp32", rounded, upcast, report, pixel_shape, batches, UPCAST, seed,
                                np.float16)
            compare_runners("fp16", reference, runner, report, pixel_shape, batches, HALF, seed)
        else:
            compare_runners("fp32", reference, runner, report, pixel_shape, batches, EXACT, seed)
    except Exception as exc:  # ORT load or run failures are validation failures, reported as such
        report.runtime_error = describe_error(exc)
    return report


