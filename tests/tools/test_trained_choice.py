"""`--method auto` on a model where the methods measurably differ: a tiny ViT trained for seconds on
the marked-patch task (benchmarks/marked_patch_task.py), chosen on calibration images and judged
on held-out ones."""

import pytest

from benchmarks.marked_patch_task import write_task
from turbo.export.options import ExportOptions
from turbo.tools.eval import AutoChoice, EvalOptions, export_with_choice, run_eval
from turbo.tools.merge_choice import auto_candidates

R = 16  # 65 → 9 tokens over 4 layers: where the methods part ways on this model
TOLERANCE = 0.02  # 10 of 512 held-out images


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("marked-patch"))


def test_auto_never_picks_a_measurably_worse_merge_on_held_out_images(task, tmp_path):
    candidates = auto_candidates("auto", None, has_cls=True)
    chosen = run_eval(EvalOptions(model=str(task["model"]), data=task["calibration"], rs=[R], candidates=candidates,
                                  choose=True))["choice"]
    assert chosen["metric"] == "accuracy" and chosen["r"] == R
    heldout = run_eval(EvalOptions(model=str(task["model"]), data=task["heldout"], rs=[R], candidates=candidates))
    assert heldout["results"][0]["metrics"]["top1"] > 0.97  # the trained model solves the task unmerged
    top1 = {row["candidate"]["label"]: row["metrics"]["top1"] for row in heldout["results"] if row["r"] == R}
    assert len(top1) == len(candidates)
    assert max(top1.values()) - min(top1.values()) > 3 * TOLERANCE  # the choice matters on this model
    assert top1[chosen["candidate"]["label"]] >= max(top1.values()) - TOLERANCE, (chosen, top1)

    result = export_with_choice(ExportOptions(model=str(task["model"]), r=R), tmp_path / "out",
                                AutoChoice(task["calibration"], candidates=candidates))
    turbo = result.manifest.turbo
    assert result.manifest.status == "passed"  # ONNX Runtime makes the trained model's merge decisions too
    assert (turbo.method, turbo.r_requested) == (chosen["candidate"]["method"], R)
    assert turbo.merge_auto["candidate"] == chosen["candidate"]
