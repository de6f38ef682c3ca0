"""`turbo generate` and `turbo plan` for LLM-based VLMs, as a user runs them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MistralConfig
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.data.images import Sample, pixel_batch
from turbo.models.build import build_plan
from turbo.models.llava import QUESTION_PROMPT
from turbo.models.llm_vocab import placeholder_tokenizer
from turbo.models.loading import load_image_processor, load_model, resolve_source
from turbo.runtimes.llm_generation import image_prompt_ids

runner = CliRunner()
PROMPT = "USER: <image>\nDescribe the picture. ASSISTANT:"


def generate(*args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, "--tiny", "--random-weights", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-interleave-qwen-0.5b"])
def test_unreduced_generate_is_transformers_generate_from_the_image_file(name, image_file):
    got = generate(name, image_file, PROMPT, "--r", "0", "--max-new-tokens", "6")
    source = resolve_source(name, tiny=True)
    processor, _ = load_image_processor(source, source.input_size, True)
    pixels = torch.from_numpy(pixel_batch([Sample(Path(image_file))], processor))
    unmerged_tokens = build_plan(name, r=0, tiny=True).plan.tokens_in - (source.config.vision_feature_select_strategy
                                                                       == "default")
    ids = torch.tensor([image_prompt_ids(placeholder_tokenizer(source.config), PROMPT, source.config.image_token_id,
                                         unmerged_tokens)])
    with torch.no_grad():
        want = load_model(source, random_weights=True).generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6,
                                                                do_sample=False)[0, ids.shape[1]:]
    assert got["token_ids"] == want.tolist()[:len(got["token_ids"])] and got["token_ids"]
    assert got["image_tokens"] == got["unmerged_image_tokens"] == unmerged_tokens


def test_generate_streams_the_text_and_reports_the_reduction(image_file):
    args = ["llava-1.5-7b", image_file, PROMPT, "--r", "2", "--llm-drop", "pyramid:stages=2,keep=0.5",
            "--max-new-tokens", "5"]
    got = generate(*args)
    assert got["image_tokens_per_llm_layer"] == [28, 28, 14, 14]  # 36 patches, r=2 in 4 blocks, halved after 2
    assert got["prefill_flops"] < got["baseline_prefill_flops"]
    streamed = runner.invoke(app, ["generate", *args, "--tiny", "--random-weights"])
    assert streamed.exit_code == 0
    assert streamed.stdout == got["text"] + "\n"
    assert "the LLM read 28 image tokens of 36" in streamed.stderr.replace("\n", " ")


def test_plan_shows_the_language_model():
    result = runner.invoke(app, ["plan", "-m", "llava-interleave-qwen-0.5b", "--llm-drop", "fastv", "--json"])
    assert result.exit_code == 0, result.output
    llm = json.loads(result.stdout)["llm"]
    assert llm["image_tokens_per_llm_layer"] == [405] * 2 + [203] * 22  # 729 - 27·12 merged, then half dropped
    assert llm["baseline_prefill_flops"] / llm["prefill_flops"] > 2


@pytest.mark.parametrize(("args", "message"), [
    (["vit-b16", "{image}", PROMPT], "turbo generate is for LLM-based VLMs"),
    (["llava-1.5-7b", "{image}", "Describe the picture."], "no image placeholder"),
    (["llava-1.5-7b", "{image}", "<image> vs <image>"], "2 image placeholders"),
    (["llava-1.5-7b", "{image}", PROMPT, "--llm-drop", "pyramid:keep=0.01"], "would drop every image token"),
    (["llava-1.5-7b", "{image}", PROMPT, "--llm-drop", "dyrate:predictor=/no/such.json"], "not a readable predictor"),
    (["llava-1.5-7b", "{image}", PROMPT, "--r", "2", "--llm-drop", "mustdrop:layer=1,every=1,stages=2"],
     "use --r 0, or window=0"),
    (["llava-1.5-7b", "{image}", PROMPT, "--r", "0", "--llm-drop", "mustdrop:layer=1,every=1,stages=2,window=4"],
     "the 6×6 patch grid to split into 4×4 windows"),
    (["llava-interleave-qwen-0.5b", "{image}", PROMPT, "--llm-drop", "mustdrop:layer=1,every=1,stages=2"],
     "its tower has no CLS"),
    (["blip2-opt-2.7b", "{image}", "Question: what? Answer:", "--threshold", "0", "--llm-drop",
      "mustdrop:layer=1,every=1,stages=2"],
     "its image tokens are not the tower's"),
])
def test_bad_requests_are_one_line(args, message, image_file):
    result = runner.invoke(app, ["generate", *(a.format(image=image_file) for a in args), "--tiny",
                                 "--random-weights"])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def save_tiny_llava(directory: Path, **changes) -> Path:
    source = resolve_source("llava-1.5-7b", tiny=True)
    load_image_processor(source, source.input_size, True)[0].save_pretrained(directory)
    placeholder_tokenizer(source.config).save_pretrained(directory)
    for key, value in changes.items():
        setattr(source.config, key, value)
    load_model(source, random_weights=True).save_pretrained(directory)
    return directory


def test_a_local_checkpoint_generates_with_its_own_tokenizer(tmp_path, image_file):
    directory = str(save_tiny_llava(tmp_path / "llava"))
    result = runner.invoke(app, ["generate", directory, image_file, PROMPT, "--r", "1", "--max-new-tokens", "4",
                                 "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["image_tokens"] == 36 - 4 and 1 <= len(got["token_ids"]) <= 4  # r=1 in each of the 4 used blocks


@pytest.mark.parametrize(("changes", "message"), [
    ({"vision_feature_layer": [-2, -1]}, "concatenates several layers"),
    ({"vision_feature_layer": -6}, "reads the embeddings"),
    ({"text_config": MistralConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, sliding_window=64)},
     "sliding-window attention (window 64)"),
])
def test_variants_turbo_cannot_take_are_one_line(tmp_path, image_file, changes, message):
    directory = str(save_tiny_llava(tmp_path / "llava", **changes))
    result = runner.invoke(app, ["generate", directory, image_file, PROMPT])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_vision_only_llava_export_is_validated_and_refuses_what_it_cannot_do(tmp_path_factory, tmp_path, image_file):
    export = tiny_export(tmp_path_factory, "llava-interleave-qwen-0.5b", 2, batch=2)  # --no-decoder
    assert export.report.passed and export.manifest.onnx.outputs[0]["name"] == "image_features"
    assert export.manifest.llm is None
    result = runner.invoke(app, ["generate", str(export.directory), image_file, PROMPT])
    assert result.exit_code == 2 and "has no language model graphs" in result.stderr
    for args, message in ((["eval", str(export.directory), "--data", str(tmp_path)], "no language model graphs"),
                          (["deploy", "triton", str(export.directory), "-o", str(tmp_path / "repository")],
                           "re-export it with its language model")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "repository").exists()


def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_scores_answers_against_the_unreduced_models(tmp_path, image_file):
    for name in ("a.png", "b.png"):
        Image.open(image_file).rotate(90 if name == "a.png" else 0).save(tmp_path / name)
    question = "USER: <image>\nWhat is it? ASSISTANT:"
    setting = ["--r", "2", "--llm-drop", "fastv:layer=1,ratio=0.75"]
    answers = {}
    for name in ("a.png", "b.png"):
        for key, args in (("base", ["--r", "0"]), ("reduced", setting)):
            answers[name, key] = generate("llava-1.5-7b", str(tmp_path / name), question, *args,
                                          "--max-new-tokens", "5")
    base_text = answers["a.png", "base"]["text"]
    (tmp_path / "questions.json").write_text(json.dumps([
        {"image": "a.png", "question": "What is it?", "answer": [base_text]},
        {"image": "b.png", "question": "What is it?", "answer": ["zzz"]}]))
    report = eval_json("--model", "llava-1.5-7b", "--tiny", "--random-weights", "--data", str(tmp_path),
                       "--questions", str(tmp_path / "questions.json"), "--prompt",
                       "USER: <image>\n{question} ASSISTANT:", *setting, "--max-tokens", "5")
    base, reduced = report["results"]
    assert (base["r"], base["llm_drop"], reduced["r"]) == (0, "none", 2)
    want = np.mean([sum(a == b for a, b in zip(answers[n, "reduced"]["token_ids"], answers[n, "base"]["token_ids"]))
                    / len(answers[n, "base"]["token_ids"]) for n in ("a.png", "b.png")])
    assert reduced["metrics"]["token_agreement"] == pytest.approx(want)
    assert base["metrics"]["vqa_accuracy"] == pytest.approx(0.5 + 0.5 * (answers["b.png", "base"]["text"] == "zzz"))
    assert reduced["image_tokens"] == [28, 7, 7, 7] and reduced["flops_bound"] > 1  # 28 - floor(0.75 · 28)


def test_eval_refuses_what_it_cannot_choose_for_generation(tmp_path, image_file):
    result = runner.invoke(app, ["eval", "--model", "llava-1.5-7b", "--tiny", "--random-weights", "--data",
                                 str(Path(image_file).parent), "--r", "auto", "--max-drop", "0.1"])
    assert result.exit_code == 2 and "do not choose for LLM-based VLMs" in result.stderr
    result = runner.invoke(app, ["eval", "--model", "vit-b16", "--tiny", "--random-weights", "--data",
                                 str(Path(image_file).parent), "--llm-drop", "fastv"])
    assert result.exit_code == 2 and "--llm-drop and --prompt are for LLM-based VLMs" in result.stderr


def test_mustdrop_generates_in_pytorch_reports_what_it_read_and_refuses_tensorrt_with_its_spatial_merge(
        image_file, tmp_path):
    drop = "mustdrop:layer=1,every=1,stages=2,global_thr=0.5,individual_thr=0.1,key=0.1"
    prompt = QUESTION_PROMPT.replace("{question}", "What is in the image?")  # what eval asks of a loose image
    got = generate("llava-1.5-7b", image_file, prompt, "--r", "0", "--llm-drop", drop, "--max-new-tokens", "4")
    read = got["image_tokens_per_llm_layer"]
    assert read[:2] == [36, 36] and 4 <= read[2] == read[3] < 36  # 36 patches; dropped after layers 1 and 2
    assert got["prefill_flops"] < got["baseline_prefill_flops"] and len(got["token_ids"]) == 4
    (tmp_path / "images").mkdir()
    Image.open(image_file).save(tmp_path / "images" / "a.png")
    report = eval_json("--model", "llava-1.5-7b", "--tiny", "--random-weights", "--data", str(tmp_path / "images"),
                       "--r", "0", "--llm-drop", drop, "--max-tokens", "3")
    assert report["results"][1]["image_tokens"] == read  # one prompt: the mean of what it read is what it read
    assert report["prompt"] == QUESTION_PROMPT
    result = runner.invoke(app, ["export", "--model", "llava-1.5-7b", "--tiny", "--random-weights", "--r", "0",
                                 "--llm-drop", drop, "--trt", "-o", str(tmp_path / "out")])  # window 3
    assert result.exit_code == 2 and "--trt: MustDrop's spatial merge decides" in result.stderr
    assert not (tmp_path / "out").exists()
