"""Choosing the merge: sweep grids, candidate sets, the choice rule, and `--method auto` / `--alpha
auto` / `--sweep` as users run them (tiny random-weight models; the trained model's test is in
test_trained_choice.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from turbo.cli.app import app
from turbo.core.errors import UsageError
from turbo.models.adapters import CLASSIFICATION
from turbo.tools.merge_choice import ALPHA_GRID, Candidate, auto_candidates, choose, parse_sweep

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 labelled 40×52 images in two class folders."""
    root = tmp_path_factory.mktemp("choice") / "imgs"
    rng = np.random.default_rng(1)
    for index in range(40):
        folder = root / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def test_parse_sweep_applies_alpha_and_fusion_to_turbo_alone():
    candidates, rs = parse_sweep(["method=tome,turbo,pitome", "alpha=0.1,5", "fusion=s1,s2", "r=8,12"])
    assert [c.label for c in candidates] == ["tome", "turbo α=0.1", "turbo α=5", "turbo s2", "pitome"]
    assert rs == [8, 12]
    assert parse_sweep(["method=tome"]) == ([Candidate("tome")], None)
    assert [c.label for c in parse_sweep(["method=turbo"])[0]] == ["turbo"]  # the model's own α


@pytest.mark.parametrize(("items", "message"), [
    (["speed=1"], "--sweep 'speed=1': expected one of method=A,B"),
    (["method=tome", "method=turbo"], "each key once"),
    (["method=fast"], "--sweep method=fast: unknown"),
    (["alpha=x"], "--sweep alpha=x: expected a number >= 0"),
    (["r=-1"], "--sweep r=-1: expected a number >= 0"),
    (["fusion=s3"], "--sweep fusion=s3: unknown"),
])
def test_parse_sweep_rejects_bad_items(items, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep(items)


def test_auto_candidates():
    everything = [c.label for c in auto_candidates("auto", None, has_cls=True)]
    assert everything[0] == "tome" and everything[-1] == "pitome" and "turbo α=5" in everything
    assert {"turbo s2", "semantic"} <= set(everything) and len(everything) == len(ALPHA_GRID) + 4
    assert [c.label for c in auto_candidates("auto", None, has_cls=False)] == ["tome", "pitome"]
    assert [c.alpha for c in auto_candidates(None, "auto", has_cls=True)] == list(ALPHA_GRID)
    with pytest.raises(UsageError, match="--method tome has none"):
        auto_candidates("tome", "auto", has_cls=True)
    with pytest.raises(UsageError, match="no CLS token"):
        auto_candidates(None, "auto", has_cls=False)


def _row(label: str, agreement: float, kl: float, top1: float | None = None) -> dict:
    method, _, alpha = label.partition(" α=")
    metrics = {"agreement": agreement, "kl": kl, **({"top1": top1} if top1 is not None else {})}
    return {"candidate": Candidate(method, float(alpha) if alpha else None).to_dict(), "r": 8, "metrics": metrics}


def test_choose_takes_the_best_metric_then_the_tiebreak_then_the_order():
    rows = [_row("tome", 0.90, 0.10, 0.70), _row("turbo α=5", 0.95, 0.20, 0.60), _row("pitome", 0.95, 0.05, 0.65)]
    fidelity = choose(rows, CLASSIFICATION, "fidelity")
    assert fidelity["candidate"]["label"] == "pitome" and "the best kl" in fidelity["reason"]
    assert choose(rows, CLASSIFICATION, "accuracy")["candidate"]["label"] == "tome"
    tied = choose([_row("tome", 0.9, 0.1), _row("pitome", 0.9, 0.1)], CLASSIFICATION, "fidelity")
    assert tied["candidate"]["label"] == "tome" and "preference order" in tied["reason"]


def test_eval_sweep_tabulates_every_setting_and_plots(images, tmp_path):
    plot = tmp_path / "sweep.png"
    result = runner.invoke(app, ["eval", "--model", "vit-b16", "--tiny", "--random-weights", "--threshold", "0",
                                 "--data", str(images), "--sweep", "method=tome,turbo,pitome", "alpha=0.1,5",
                                 "r=4,8", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    seen = [(row.get("candidate", {}).get("label"), row["r"]) for row in report["results"]]
    labels = ["tome", "turbo α=0.1", "turbo α=5", "pitome"]
    assert sorted(seen, key=str) == sorted([(None, 0)] + [(label, r) for label in labels for r in (4, 8)], key=str)
    assert plot.stat().st_size > 10_000 and "turbo α=0.1" in result.stderr


def test_eval_method_auto_reports_the_choice(images):
    result = runner.invoke(app, ["eval", "--model", "vit-b16", "--tiny", "--random-weights", "--threshold", "0",
                                 "--data", str(images), "--method", "auto", "--r", "6", "--json"])
    assert result.exit_code == 0, result.output
    choice = json.loads(result.stdout)["choice"]
    assert choice["metric"] == "fidelity" and choice["r"] == 6  # labels say nothing about random weights
    scores = {row["candidate"]["label"]: row["metrics"] for row in choice["scores"]}
    assert len(scores) == len(ALPHA_GRID) + 4
    best = max(metrics["agreement"] for metrics in scores.values())
    assert scores[choice["candidate"]["label"]]["agreement"] == best
    assert "chosen merge:" in result.stderr


def test_export_alpha_and_r_auto_export_the_winner_and_record_every_score(images, tmp_path):
    """--r auto and --alpha auto together: the r search's curve and every candidate's scores in
    turbo.json, and the export made with the winner."""
    out = tmp_path / "auto"
    result = runner.invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--threshold", "0",
                                 "--alpha", "auto", "--r", "auto", "--max-drop", "0.5", "--metric", "fidelity",
                                 "--data", str(images), "-o", str(out)])
    assert result.exit_code == 0, result.output
    turbo = json.loads((out / "turbo.json").read_text())["turbo"]
    choice, r_auto = turbo["merge_auto"], turbo["r_auto"]
    assert turbo["method"] == "turbo" and turbo["alpha"] == choice["candidate"]["alpha"]
    assert turbo["r_requested"] == choice["r"] == r_auto["chosen_r"] > 0
    assert [row["candidate"]["alpha"] for row in choice["scores"]] == list(ALPHA_GRID)
    assert choice["samples"] == 40 and choice["metric"] == "fidelity" and "merge candidates" in result.stderr
    assert all(point["within"] for point in r_auto["curve"] if point["r"] <= r_auto["chosen_r"])
    assert "--r auto chose r=" in result.stderr
    bad = runner.invoke(app, ["export", "-m", "vit-b16", "--tiny", "--r", "auto", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--r auto needs --data IMAGES and --max-drop X" in bad.output


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "auto", "--r", "4", "--limit", "10"], "at least 32 calibration images to tell the candidates "
                                                       "apart; --data has 10"),
    (["--method", "auto", "--r", "0"], "every method is the same at r=0"),
    (["--method", "auto", "--r", "4,8"], "at one r"),
    (["--alpha", "auto", "--method", "tome", "--r", "4"], "--method tome has none"),
    (["--method", "auto", "--alpha", "x", "--r", "4"], "--alpha 'x': expected a number >= 0 or 'auto'"),
    (["--sweep", "method=turbo", "--model", "siglip-b16"], "siglip models have no CLS token"),
    (["--sweep", "method=tome", "--method", "turbo"], "drop --method and --alpha"),
    (["r=4"], "r=4: KEY=VALUES arguments belong to --sweep"),
    (["--plot", "x.png"], "--plot draws a --sweep"),
])
def test_bad_choices_are_one_line(images, args, message):
    base = ["eval", "--model", "vit-b16", "--tiny", "--random-weights", "--threshold", "0", "--data", str(images)]
    if "--model" in args:
        base[1:3] = []
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) <= 2  # the line may wrap once


@pytest.mark.parametrize(("model", "labels"), [("siglip-b16", ["tome", "pitome"]), ("blip-caption", None)])
def test_method_auto_on_an_embedding_and_a_captioning_model(images, model, labels):
    """SigLIP (no CLS: tome and pitome, scored by embedding cosine) and BLIP captioning (caption
    agreement with r=0, BLEU-4 against r=0 as the tie-break)."""
    result = runner.invoke(app, ["eval", "--model", model, "--tiny", "--random-weights", "--threshold", "0",
                                 "--data", str(images), "--limit", "32", "--method",
                                 "auto", "--r", "4", "--metric", "fidelity", "--json"])
    assert result.exit_code == 0, result.output
    choice = json.loads(result.stdout)["choice"]
    assert choice["score_key"] == ("cosine" if model == "siglip-b16" else "exact_match")
    assert [row["candidate"]["label"] for row in choice["scores"]][:len(labels or [])] == (labels or [])


def test_images_far_smaller_than_the_input_are_refused(tmp_path):
    for index in range(32):
        Image.fromarray(np.full((16, 20, 3), index, np.uint8)).save(tmp_path / f"{index}.png")
    result = runner.invoke(app, ["eval", "--model", "vit-b16", "--tiny", "--random-weights", "--data", str(tmp_path),
                                 "--method", "auto", "--r", "4"])
    assert result.exit_code == 2
    assert "--data has images of 16 px on a side, under half the model's 48x48 input" in result.output


def test_export_method_auto_refusals_write_nothing(images, tmp_path):
    out = tmp_path / "none"
    result = runner.invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--method", "auto",
                                 "--r", "4", "-o", str(out)])
    assert result.exit_code == 2 and "--method auto and --alpha auto need --data IMAGES" in result.output
    few = runner.invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--method", "auto", "--r", "4",
                              "--data", str(images / "cat"), "-o", str(out)])
    assert few.exit_code == 2 and "--data has 20" in few.output
    retrieval = runner.invoke(app, ["export", "-m", "clip-vit-b16", "--tiny", "--random-weights", "--method", "auto",
                                    "--r", "4", "--data", str(images), "-o", str(out)])
    assert retrieval.exit_code == 2 and "compare settings with turbo eval --captions FILE" in retrieval.output
    assert not out.exists()
