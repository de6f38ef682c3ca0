"""BLIP VQA exports: at r=0 the exported question encoder equals transformers' and the exported
pipeline's greedy and beam answers are token-identical to transformers' `generate` on each question; merged
exports validate against the merged PyTorch model, and the validation can fail; answers do not
depend on what else is in the batch; `turbo vqa` answers and refuses what it cannot answer in one
line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForQuestionAnswering
from typer.testing import CliRunner

from tests.conftest import tiny_export, tiny_plan
from turbo.cli.app import app
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.export.validate import ValidationReport
from turbo.export.vqa_export import (
    ANSWER_RUN,
    QUESTION_RUN,
    SAMPLE_QUESTIONS,
    reference_answers,
    until_eos,
    validate_answerer,
)
from turbo.models.build import build_merged_model
from turbo.models.loading import load_model, resolve_source
from turbo.runtimes.vqa import VqaPipeline, question_feeds

runner = CliRunner()
BATCH = 2  # static image batch: faster to export than a dynamic axis
QUESTIONS = ["what is on the table?", "how many people are standing next to the old red car in the street?", "why",
             "is it raining"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """A user's own VQA checkpoint: the tiny model's weights, a tokenizer and an image processor,
    saved as transformers saves them (the registry's tiny model with its seed-0 random weights)."""
    source = resolve_source("blip-vqa", tiny=True)
    local = tmp_path_factory.mktemp("blip-vqa") / "my-vqa"
    load_model(source, random_weights=True).save_pretrained(local)
    source.adapter.question_answerer.placeholder_tokenizer(source.config).save_pretrained(local)
    source.adapter.image_processor((48, 48)).save_pretrained(local)
    return local


@pytest.fixture(scope="module")
def exports(tmp_path_factory, local_model) -> dict[int, Path]:
    return {r: run_export(ExportOptions(model=str(local_model), r=r, batch=BATCH),
                          tmp_path_factory.mktemp(f"r{r}") / "out").directory for r in (0, 4)}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "street.png"
    Image.fromarray((np.random.default_rng(3).random((50, 70, 3)) * 255).astype("uint8")).save(path)
    return path


def _pixels(pipeline: VqaPipeline, seed: int = 1) -> np.ndarray:
    shape = (BATCH, *pipeline.manifest.onnx.pixel_shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def test_r0_equals_transformers(exports, local_model):
    pipeline = VqaPipeline.open(exports[0])
    assert pipeline.manifest.question.tokenizer["origin"] == str(local_model)  # the checkpoint's own tokenizer
    upstream = BlipForQuestionAnswering.from_pretrained(local_model).eval()
    pixels = _pixels(pipeline)
    pairs = [(i % BATCH, question) for i, question in enumerate(QUESTIONS)]
    feeds, _ = question_feeds(pipeline.tokenizer, QUESTIONS, pipeline.question.max_length)
    with torch.inference_mode():
        images = upstream.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        tokens = images[[image for image, _ in pairs]]
        want = upstream.text_encoder(input_ids=torch.from_numpy(feeds["input_ids"]),
                                     attention_mask=torch.from_numpy(feeds["attention_mask"]),
                                     encoder_hidden_states=tokens).last_hidden_state.numpy()
    got = pipeline.question_encoder.run({**feeds, "image_embeds": pipeline.image_tokens(pixels)[[i for i, _ in pairs]]})
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got["question_embeds"][real], want[real], atol=1e-4, rtol=0)

    answers = pipeline.answer(pixels, pairs, batch=len(pairs))
    expected = reference_answers(upstream, pixels, pairs, pipeline, interpolate=False)
    eos = pipeline.settings.eos_token_id
    assert [until_eos(a.ids, eos) for a in answers] == [until_eos(ids, eos) for ids in expected]
    assert all(len(ids) > 1 for ids in expected)  # the reference generated something to compare

    beams = pipeline.answer(pixels, pairs, batch=len(pairs), num_beams=3)  # a padded batch: beams share its mask
    for (image, _), answer, ids, mask in zip(pairs, beams, feeds["input_ids"], feeds["attention_mask"]):
        with torch.inference_mode():  # transformers on the question alone
            want = upstream.generate(input_ids=torch.from_numpy(ids[mask.astype(bool)][None]),
                                     pixel_values=torch.from_numpy(pixels[image:image + 1]), num_beams=3,
                                     do_sample=False, max_new_tokens=pipeline.settings.max_new_tokens)
        assert until_eos(answer.ids, eos) == until_eos(want[0].tolist(), eos)


def test_merged_export_validates_and_the_validation_can_fail(exports):
    manifest = json.loads((exports[4] / "turbo.json").read_text())
    assert manifest["status"] == "passed" and manifest["plan"]["final_tokens"] < manifest["plan"]["tokens_in"]
    runs = {check["run"] for check in manifest["validation"]["outputs"]}
    assert QUESTION_RUN in runs and any(run.startswith(ANSWER_RUN) for run in runs)
    assert manifest["question"]["image_tokens"] == manifest["plan"]["final_tokens"]
    assert manifest["decoder"]["image_tokens"] is None  # the answer decoder reads the question

    pipeline = VqaPipeline.open(exports[4], exact=True)
    built = tiny_plan("blip-vqa", r=4)
    other, _ = build_merged_model(built, random_weights=True, seed=7)  # other weights than the export's
    report = ValidationReport("pytorch", "onnxruntime")
    validate_answerer(other.eval(), built.source.adapter.question_answerer, pipeline, report,
                      pipeline.manifest.onnx.pixel_shape, False, exact_answers=True)
    assert report.outputs and not any(check.passed for check in report.outputs)


def test_answers_do_not_depend_on_the_batch(exports):
    pipeline = VqaPipeline.open(exports[4])
    pixels = _pixels(pipeline, seed=2)
    pairs = [(i % BATCH, question) for i, question in enumerate(QUESTIONS + list(SAMPLE_QUESTIONS))]
    together = [a.ids for a in pipeline.answer(pixels, pairs, batch=len(pairs))]  # padded to the longest
    alone = [a.ids for a in pipeline.answer(pixels, pairs, batch=1)]
    eos = pipeline.settings.eos_token_id
    assert [until_eos(ids, eos) for ids in together] == [until_eos(ids, eos) for ids in alone]
    reversed_ = [a.ids for a in pipeline.answer(pixels, pairs[::-1], batch=3)][::-1]
    assert [until_eos(ids, eos) for ids in reversed_] == [until_eos(ids, eos) for ids in alone]


def test_vqa_command_answers_each_question(exports, image):
    long = "is there a " + "very " * 40 + "red bus?"
    result = runner.invoke(app, ["vqa", str(exports[4]), str(image), "what is this?", long, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [a["question"] for a in report["answers"]] == ["what is this?", long]
    assert [a["truncated"] for a in report["answers"]] == [False, True]
    assert "1 question(s) longer than 35 tokens were truncated" in result.stderr
    plain = runner.invoke(app, ["vqa", str(exports[4]), str(image), "what is this?"])
    assert plain.exit_code == 0 and plain.stdout == f"what is this?\t{report['answers'][0]['answer']}\n"


def test_what_vqa_cannot_answer_is_one_line(exports, image, tmp_path_factory):
    classifier = tiny_export(tmp_path_factory, "vit-b16", 4, batch=2).directory
    texts = image.parent / "texts.txt"
    texts.write_text("a red bus\n")
    cases = [
        (["vqa", str(classifier), str(image), "what?"], "does not answer questions (a ViTForImageClassification"),
        (["vqa", str(exports[4]), str(image), "  "], "question 1 is empty"),
        (["vqa", str(exports[4]), str(image.parent / "missing.png"), "what?"], "no such image file"),
        (["caption", str(exports[4]), str(image)], "answers questions: use turbo vqa"),
        (["export", "-m", "blip-vqa", "--tiny", "--random-weights", "--r", "auto", "--data", str(image.parent),
          "--max-drop", "0.1", "-o", str(image.parent / "out")], "compare settings with turbo eval --questions"),
        (["retrieve", str(exports[4]), "--images", str(image), "--texts", str(texts)], "has no text encoder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, lines)


def test_eval_of_an_export_scores_answers_against_humans_and_r0(exports, tmp_path):
    """turbo eval EXPORT --questions: r=0 answered in PyTorch, the export on ONNX Runtime. Human
    answers set to r=0's own answers must score 1.0, and the r=0 PyTorch answers must be the r=0
    export's (both are transformers' answer to each question alone)."""
    for i in range(BATCH):
        Image.fromarray((np.random.default_rng(10 + i).random((40, 44, 3)) * 255).astype("uint8")).save(
            tmp_path / f"{i}.png")
    r0 = VqaPipeline.open(exports[0])
    pixels = np.stack([np.asarray(r0.processor(Image.open(tmp_path / f"{i}.png").convert("RGB"))["pixel_values"][0])
                       for i in range(BATCH)])
    pairs = [(i % BATCH, question) for i, question in enumerate(QUESTIONS)]
    humans = [a.answer for a in r0.answer(pixels, pairs)]
    records = [{"image": f"{image}.png", "question": question, "answer": [human] * 4}
               for (image, question), human in zip(pairs, humans)]
    (tmp_path / "questions.json").write_text(json.dumps(records))
    result = runner.invoke(app, ["eval", str(exports[4]), "--data", str(tmp_path), "--questions",
                                 str(tmp_path / "questions.json"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base, merged = report["results"]
    assert (base["runtime"], merged["runtime"]) == ("torch", "ort") and report["questions"] == len(QUESTIONS)
    assert base["metrics"] == {"answer_agreement": 1.0, "vqa_accuracy": 1.0}
    assert merged["metrics"]["vqa_accuracy"] == pytest.approx(merged["metrics"]["answer_agreement"])


def test_check_gates_on_answer_agreement_and_bench_times_answering(exports):
    """At r=0 the export answers exactly as the unmerged model (agreement 1, which a gate of 1
    passes); bench times the image encoder and whole answering, merged against r=0."""
    result = runner.invoke(app, ["check", str(exports[0]), "--min-agreement", "1", "--json"])
    assert result.exit_code == 0, result.output
    checks = {item["name"]: item for item in json.loads(result.stdout)["checks"]}
    assert checks["gate: agreement"]["passed"] and "greedy answer agreement" in checks["gate: agreement"]["detail"]
    assert checks["question encoder image tokens"]["passed"] and checks["decoder vs PyTorch"]["passed"]

    result = runner.invoke(app, ["bench", str(exports[4]), "--baseline", str(exports[0]), "--batch", str(BATCH),
                                 "--iters", "1", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert sorted((row["workload"], row["r"]) for row in rows) == [("encoder", 0), ("encoder", 4), ("vqa", 0),
                                                                    ("vqa", 4)]
    assert all(row["runner"]["answer_tokens"] == 3 for row in rows if row["workload"] == "vqa")
