"""`turbo eval`: metrics on synthetic outputs, the --r auto search, and the command on generated
images (class folders, loose images, a bad image, missing data)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from turbo.cli.app import app
from turbo.models.adapters import CLASSIFICATION
from turbo.models.build import build_plan
from turbo.tools.eval import (
    EvalOptions,
    EvalRun,
    _distinct_rs,
    _search,
    caption_metrics,
    caption_scores,
    classification_metrics,
    embedding_metrics,
)

runner = CliRunner()


@pytest.fixture
def class_folders(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "eel"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    return tmp_path / "imgs"


def test_classification_metrics_on_known_logits():
    base = np.array([[5.0, 0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]])
    merged = np.array([[5.0, 0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0], [0, 0, 4.0, 0, 0, 0]])
    metrics = classification_metrics(merged, [0, 1, 3], base)
    assert metrics["agreement"] == pytest.approx(2 / 3)
    assert metrics["top1"] == pytest.approx(1 / 3)  # only the first is right
    assert metrics["top5"] == pytest.approx(1.0)  # ties rank the rest; every label is within five of six
    same = classification_metrics(base, None, base)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and metrics["kl"] > 0.1 and "top1" not in same


def test_caption_metrics():
    refs = [["a dog runs on the grass", "a dog running outside"], ["two cats sleep on a bed", "cats asleep"]]
    perfect = caption_scores(["a dog runs on the grass", "two cats sleep on a bed"], refs)
    worse = caption_scores(["a car on a road", "a plate of food"], refs)
    assert perfect["bleu4"] > 0.9 and perfect["cider"] > worse["cider"] and worse["bleu4"] < 0.1
    ids = caption_metrics([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]], None, None, None)
    assert ids["exact_match"] == 0.5 and 0 < ids["bleu4_vs_r0"] < 1


def test_auto_search_finds_the_largest_r_within_the_drop():
    options = EvalOptions(model="vit-b16", tiny=True, threshold=0, max_drop=0.25, metric="fidelity")
    rs = _distinct_rs(options, build_plan("vit-b16", 0, tiny=True, threshold=0))
    evaluated = []

    def evaluate(r, candidate=None):  # a fidelity that falls by 0.05 per merged token per layer
        evaluated.append(r)
        return EvalRun(r, 0, 1.0, 1.0, {"agreement": 1.0 - 0.05 * r})

    auto = _search(options, CLASSIFICATION, evaluate, rs, "fidelity")
    assert auto["chosen_r"] == 5  # 0.25 drop at r=5, 0.30 at r=6
    assert len(evaluated) <= 6 and auto["candidates"] <= 18  # bisection, not a sweep
    assert all(point["within"] == (point["drop"] <= 0.25) for point in auto["curve"])


def test_eval_command_on_class_folders(class_folders, tmp_path):
    (tmp_path / "labels.txt").write_text("eel\ncat\ndog\n")
    result = runner.invoke(app, ["eval", "--data", str(class_folders), "-m", "vit-b16", "--tiny", "--random-weights",
                                 "--threshold", "0", "--r", "4", "--labels", str(tmp_path / "labels.txt"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["samples"], report["classes"]) == (6, 3)
    assert [row["r"] for row in report["results"]] == [0, 4]
    assert [row["final_tokens"] for row in report["results"]] == [37, 21]
    assert report["results"][0]["metrics"]["agreement"] == 1.0
    assert {"top1", "agreement", "kl"} <= set(report["results"][1]["metrics"])
    assert "random weights" in result.stderr


def test_embedding_metrics_on_known_vectors():
    base = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    moved = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])  # the last moved next to class 0
    metrics = embedding_metrics(moved, [0, 0, 1, 1], base)
    assert metrics["cosine"] == pytest.approx((3 + 0.26 / (np.hypot(0.8, 0.2) * np.hypot(0.1, 0.9))) / 4)
    assert metrics["knn_top1"] == pytest.approx(0.75)  # only the moved one's nearest neighbour is of another class
    assert embedding_metrics(base, [0, 0, 1, 1], base) == {"cosine": pytest.approx(1.0), "knn_top1": 1.0}


@pytest.mark.parametrize("model", ["clip-b16", "siglip-b16"])
def test_eval_of_an_embedding_model_measures_cosine_and_neighbours(class_folders, model):
    result = runner.invoke(app, ["eval", "--data", str(class_folders), "-m", model, "--tiny", "--random-weights",
                                 "--threshold", "0", "--r", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "image-embedding"
    base, merged = (row["metrics"] for row in report["results"])
    assert base["cosine"] == pytest.approx(1.0) and 0 < merged["cosine"] < 1 and "knn_top1" in merged


def test_blip_fidelity_on_loose_images(class_folders):
    result = runner.invoke(app, ["eval", "--data", str(class_folders / "cat"), "-m", "blip-caption", "--tiny",
                                 "--random-weights", "--threshold", "0", "--r", "4", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["captions_compared_as"] == "token ids" and report["classes"] is None
    merged = report["results"][1]["metrics"]
    assert set(merged) == {"exact_match", "bleu4_vs_r0"} and 0 <= merged["exact_match"] <= 1


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("bad_image", "is not a readable image"),
    ("auto_without_drop", "--r auto and --max-drop go together"),
    ("captions_without_tokenizer", "need the tokenizer"),
])
def test_eval_bad_input(class_folders, tmp_path, case, message):
    args = ["eval", "--data", str(class_folders), "-m", "vit-b16", "--tiny", "--random-weights", "--threshold", "0"]
    if case == "missing":
        args[2] = str(tmp_path / "nowhere")
    elif case == "bad_image":
        (class_folders / "cat" / "broken.png").write_text("not an image")
    elif case == "auto_without_drop":
        args += ["--r", "auto"]
    else:
        (tmp_path / "caps.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "cat/0.png"}],
                                                        "annotations": [{"image_id": 1, "caption": "a cat"}]}))
        args[4] = "blip-caption"
        args += ["--captions", str(tmp_path / "caps.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_of_an_export_directory(class_folders, tmp_path):
    """The ONNX export on ONNX Runtime against the unmerged PyTorch model, with the export's
    own preprocessing; a static batch is filled up for the last, smaller chunk."""
    from turbo.export.options import ExportOptions
    from turbo.export.pipeline import run_export

    out = run_export(ExportOptions(model="vit-b16", r=4, tiny=True, threshold=0, random_weights=True, batch=4),
                     tmp_path / "export").directory
    result = runner.invoke(app, ["eval", str(out), "--data", str(class_folders), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(row["r"], row["runtime"]) for row in report["results"]] == [(0, "torch"), (4, "ort")]
    assert report["samples"] == 6 and report["export"] == str(out)
    blip = runner.invoke(app, ["eval", str(class_folders), "--data", str(class_folders)])
    assert blip.exit_code == 2 and "has no turbo.json" in blip.output


def test_eval_on_an_hf_datasets_directory(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in range(5)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    data = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 2, 0, 1]}, features=features)
    datasets.DatasetDict({"train": data.select(range(2)), "test": data}).save_to_disk(str(tmp_path / "hf"))
    result = runner.invoke(app, ["eval", "--data", str(tmp_path / "hf"), "-m", "vit-b16", "--tiny", "--random-weights",
                                 "--threshold", "0", "--r", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["samples"], report["classes"]) == (5, 3)  # the test split, with its ClassLabel names
    assert "top1" in report["results"][0]["metrics"]


def test_blip_caption_metrics_with_a_local_tokenizer(class_folders, tmp_path):
    """A local BLIP directory with weights and a (made-up) BERT vocabulary: captions are decoded
    and scored against COCO-format references."""
    from transformers import BertTokenizer

    from turbo.models.loading import load_model, resolve_source

    local = tmp_path / "blip"
    load_model(resolve_source("blip-caption", tiny=True), random_weights=True).save_pretrained(local)
    vocab = [f"w{i}" for i in range(30524)]
    for index, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]"}.items():
        vocab[index] = token
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt"), bos_token="[DEC]").save_pretrained(local)
    images = [{"id": i, "file_name": f"{name}/{i % 2}.png"} for i, name in enumerate(["cat", "dog", "eel"])]
    annotations = [{"image_id": i, "caption": f"a small {name} in a picture"} for i, name in
                   enumerate(["cat", "dog", "eel"])]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    result = runner.invoke(app, ["eval", "--data", str(class_folders), "-m", str(local), "--captions",
                                 str(tmp_path / "captions.json"), "--r", "4", "--threshold", "0", "--max-tokens", "5",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["captions_compared_as"] == "text" and report["samples"] == 3
    assert ("PTB" in report["caption_tokenizer"]) or ("lower-case" in report["caption_tokenizer"])
    for row in report["results"]:
        assert {"bleu4", "cider", "exact_match", "bleu4_vs_r0"} <= set(row["metrics"])
    assert report["results"][0]["metrics"]["exact_match"] == 1.0


def test_karpathy_and_coco_caption_files(class_folders, tmp_path):
    from turbo.data.images import coco_captions

    karpathy = {"images": [{"filepath": "cat", "filename": "0.png", "sentences": [{"raw": "A cat."}, {"raw": "Cat"}]},
                           {"filepath": "dog", "filename": "1.png", "sentences": [{"raw": "A dog."}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    samples = coco_captions(tmp_path / "k.json", class_folders)
    assert [(s.path.relative_to(class_folders).as_posix(), s.references) for s in samples] == [
        ("cat/0.png", ("A cat.", "Cat")), ("dog/1.png", ("A dog.",))]
    (tmp_path / "missing.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "nope.png"}],
                                                       "annotations": []}))
    from turbo.core.errors import UsageError

    with pytest.raises(UsageError, match="1 of 1 images missing"):
        coco_captions(tmp_path / "missing.json", class_folders)
