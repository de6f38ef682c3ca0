"""Choosing the merge per model from its own data: candidate settings, sweep grids and the choice.

A candidate is one merge setting (method, α, fusion). `turbo eval --sweep` evaluates a grid of
candidates × r against the shared r=0 outputs; `--method auto` and `--alpha auto` evaluate a
fixed candidate set at one r and keep the best: the highest task metric (accuracy when the data
has labels, else fidelity to r=0), ties broken by a continuous fidelity score (lower KL, higher
caption BLEU against r=0, higher rank correlation), then by the
order of `auto_candidates` (tome, the cheapest step, first).
"""

import math
from dataclasses import dataclass

from turbo.core.errors import UsageError
from turbo.merging.matching import CLS_METHODS, FUSIONS, METHODS
from turbo.models.adapters import Task

PAPER_ALPHA = 5.0  # the authors' caption setting (150·A in their code)
ALPHA_GRID = (0.1, 0.5, 1.0, PAPER_ALPHA)
MIN_DECISION_IMAGES = 32  # below this, one image moves a candidate's agreement by more than 3 points
SWEEP_KEYS = ("method", "alpha", "fusion", "r")


@dataclass(frozen=True)
class Candidate:
    """One merge setting; alpha and fusion only mean something for turbo (α for s1 alone; None: the
    model's, which the other methods ignore)."""

    method: str
    alpha: float | None = None
    fusion: str = "s1"

    @classmethod
    def of(cls, method: str, alpha: float | None, fusion: str = "s1") -> "Candidate":
        """The candidate for a setting, α dropped where it means nothing."""
        turbo = method == "turbo"
        return cls(method, alpha if turbo and fusion == "s1" else None, fusion if turbo else "s1")

    @property
    def label(self) -> str:
        if self.method != "turbo":
            return self.method
        if self.fusion == "s2":
            return "turbo s2"
        return "turbo" if self.alpha is None else f"turbo α={self.alpha:g}"  # None: the model's α

    def to_dict(self) -> dict:
        return {"method": self.method, "alpha": self.alpha, "fusion": self.fusion, "label": self.label}


def auto_candidates(method: str | None, alpha: str | float | None, has_cls: bool) -> list[Candidate]:
    """`--method auto`: tome, then with a CLS token turbo over the α grid (or the α given), turbo s2
    and semantic, then pitome. `--alpha auto` (method turbo or the model's): turbo over the α grid."""
    alphas = ALPHA_GRID if alpha in (None, "auto") else (alpha,)  # alpha: "auto", None or a parsed number
    turbo = [Candidate("turbo", a) for a in alphas]
    if method == "auto":
        with_cls = [*turbo, Candidate("turbo", None, "s2"), Candidate("semantic")] if has_cls else []
        return [Candidate("tome"), *with_cls, Candidate("pitome")]
    if method not in (None, "turbo"):
        raise UsageError(f"--alpha auto chooses turbo's α; --method {method} has none (use --method auto to compare "
                         "methods)")
    if not has_cls:
        raise UsageError("--alpha auto weighs the CLS token's attention, and this model has no CLS token; use "
                         "--method auto")
    return turbo


def parse_sweep(items: list[str]) -> tuple[list[Candidate], list[int] | None]:
    """`method=tome,turbo alpha=0.1,1,5 fusion=s1,s2 r=8,16` -> the candidates and the r values (None:
    not given). α and fusion apply to turbo alone; other methods appear once each."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in SWEEP_KEYS or not values or key in grid:
            raise UsageError(f"--sweep {item!r}: expected one of {', '.join(k + '=A,B' for k in SWEEP_KEYS)}, "
                             "each key once")
        grid[key] = values.split(",")
    methods = grid.get("method", ["turbo"])
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"--sweep method={method}: unknown; choose from {', '.join(METHODS)}")
    for fusion in grid.get("fusion", []):
        if fusion not in FUSIONS:
            raise UsageError(f"--sweep fusion={fusion}: unknown; choose from {', '.join(FUSIONS)}")
    alphas = [_number(a, "alpha", float) for a in grid["alpha"]] if "alpha" in grid else [None]  # None: the model's
    rs = [_number(r, "r", int) for r in grid["r"]] if "r" in grid else None
    candidates = []
    for method in methods:
        if method == "turbo":
            candidates += [Candidate.of("turbo", a, f) for f in grid.get("fusion", ["s1"]) for a in alphas]
        else:
            candidates.append(Candidate(method))
    return list(dict.fromkeys(candidates)), rs


def _number(text: str, key: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--sweep {key}={text}: expected a number >= 0")
    return value


def check_candidates(candidates: list[Candidate], has_cls: bool, family: str) -> None:
    """UsageError for a candidate the model cannot run (a CLS-based method without a CLS token)."""
    for candidate in candidates:
        if candidate.method in CLS_METHODS and not has_cls:
            raise UsageError(f"method {candidate.method} weighs the CLS token's attention; {family} models have no "
                             "CLS token: leave it out (tome and pitome apply)")


def check_decision_data(samples: int, what: str) -> None:
    if samples < MIN_DECISION_IMAGES:
        raise UsageError(f"{what} needs at least {MIN_DECISION_IMAGES} calibration images to tell the candidates "
                         f"apart; --data has {samples}: add images")


def check_image_sizes(smallest: int, input_size: tuple[int, int]) -> None:
    """UsageError when calibration images are under half the model's input side: upsampled so far,
    they would score the candidates on detail the images do not have."""
    if smallest * 2 < min(input_size):
        raise UsageError(f"--data has images of {smallest} px on a side, under half the model's {input_size[0]}x"
                         f"{input_size[1]} input; choose the merge on images of at least {(min(input_size) + 1) // 2} "
                         "px")


def selection_metric(metric: str | None, task: Task, base_metrics: dict, random_weights: bool = False) -> str:
    """The metric a choice maximises: the one asked for, else accuracy when the data has labels
    (fidelity for random weights, whose predictions the labels say nothing about)."""
    if metric is None:
        return "accuracy" if task.accuracy_metric in base_metrics and not random_weights else "fidelity"
    if metric == "accuracy" and task.accuracy_metric not in base_metrics:
        raise UsageError(f"--metric accuracy needs {task.accuracy_data}; use --metric fidelity on unlabeled images")
    return metric


def score(metrics: dict, task: Task, metric: str) -> tuple[float, float]:
    """(the task metric, the tie-break) of one run; larger is better in both."""
    primary = metrics[task.accuracy_metric if metric == "accuracy" else task.fidelity_metric]
    if task.tiebreak is None:
        return primary, 0.0
    name, sign = task.tiebreak
    return primary, sign * metrics[name]


def choose(rows: list[dict], task: Task, metric: str) -> dict:
    """The best of `rows` ({"candidate", "metrics", ...}, in preference order) and why it won."""
    scored = [(score(row["metrics"], task, metric), -index, row) for index, row in enumerate(rows)]
    (best_score, _, winner) = max(scored, key=lambda item: (item[0], item[1]))
    key = task.accuracy_metric if metric == "accuracy" else task.fidelity_metric
    rivals = [row for (s, _, row) in scored if row is not winner and s[0] == best_score[0]]
    if not rivals:
        reason = f"highest {key} ({best_score[0]:.4f})"
    elif task.tiebreak is not None and any(score(r["metrics"], task, metric) != best_score for r in rivals):
        reason = (f"{key} {best_score[0]:.4f}, tied with {len(rivals)} other(s); the best {task.tiebreak[0]} "
                  f"({winner['metrics'][task.tiebreak[0]]:.4g})")
    else:
        reason = f"{key} {best_score[0]:.4f} tied; first in preference order (cheaper merge)"
    return {"candidate": winner["candidate"], "metric": metric, "score_key": key, "reason": reason}
