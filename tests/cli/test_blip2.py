"""BLIP-2 (OPT) as a user runs it: the image before the prompt, a local checkpoint, the export with
its language-model graphs giving PyTorch's tokens, and the variants turbo cannot take."""

import json
from pathlib import Path

import pytest
from transformers import OPTConfig, T5Config
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.models.llm_vocab import placeholder_tokenizer
from turbo.models.loading import load_image_processor, load_model, resolve_source

runner = CliRunner()
PROMPT = "Question: what is in the picture? Answer:"
DROP = "fastv:layer=1,ratio=0.5"


def generate(*args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def save_tiny_blip2(directory: Path, **changes) -> Path:
    source = resolve_source("blip2-opt-2.7b", tiny=True)
    load_image_processor(source, source.input_size, True)[0].save_pretrained(directory)
    placeholder_tokenizer(source.config).save_pretrained(directory)
    model = load_model(source, random_weights=True)
    for key, value in changes.items():
        setattr(model.config, key, value)
    model.save_pretrained(directory)
    return directory


def test_the_export_reads_the_image_first_and_generates_the_pytorch_tokens(tmp_path_factory, image_file):
    export = tiny_export(tmp_path_factory, "blip2-opt-2.7b", 2, decoder=True, llm_drop=DROP)
    manifest = export.manifest
    assert export.report.passed and [check.passed for check in export.report.captions] == [True]
    assert manifest.plan.final_tokens == 37 - 4 * 2  # the ViT merges
    assert manifest.llm.image_tokens == 8 and manifest.llm.image_per_layer == [8, 4, 4, 4]  # FastV from layer 1
    assert manifest.llm.image_first and manifest.onnx.fixed_tokens == {"image_features": 8}
    got = generate(str(export.directory), image_file, PROMPT, "--max-new-tokens", "6")
    want = generate("blip2-opt-2.7b", image_file, PROMPT, "--r", "2", "--threshold", "0", "--llm-drop", DROP,
                    "--tiny", "--random-weights", "--max-new-tokens", "6")
    assert got["runtime"] == "onnxruntime" and want["runtime"] == "pytorch"
    assert got["token_ids"] == want["token_ids"] and got["token_ids"]
    assert got["prompt_tokens"] == want["prompt_tokens"] == 8 + want["text_tokens"]
    result = runner.invoke(app, ["check", str(export.directory), "--json"])
    assert result.exit_code == 0, result.output
    checks = {row["name"]: row for row in json.loads(result.stdout)["checks"]}
    assert checks["language model vs PyTorch"]["passed"] and checks["graph vs plan"]["passed"]
    placed = runner.invoke(app, ["generate", str(export.directory), image_file, "<image> " + PROMPT])
    assert placed.exit_code == 2 and "reads the image before the prompt" in placed.stderr
    assert len(placed.stderr.strip().splitlines()) == 1 and not placed.stdout


def test_plan_counts_the_queries_and_opt_flops():
    result = runner.invoke(app, ["plan", "-m", "blip2-opt-2.7b", "--llm-drop", "pyramid", "--json"])
    assert result.exit_code == 0, result.output
    llm = json.loads(result.stdout)["llm"]
    assert llm["image_tokens"] == llm["unmerged_image_tokens"] == 32  # the merge leaves the 32 queries
    assert llm["image_tokens_per_llm_layer"] == [32] * 8 + [16] * 8 + [8] * 8 + [4] * 8
    d, m, n = 2560, 10240, 40 + 32  # OPT-2.7B: two FFN matrices
    assert llm["baseline_prefill_flops"] == 32 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def test_a_local_checkpoint_generates_with_its_own_tokenizer(tmp_path, image_file):
    directory = str(save_tiny_blip2(tmp_path / "blip2"))
    got = generate(directory, image_file, PROMPT, "--r", "1", "--threshold", "0", "--max-new-tokens", "3")
    assert got["image_tokens"] == 8 and 1 <= len(got["token_ids"]) <= 3


@pytest.mark.parametrize(("changes", "message"), [
    ({"text_config": T5Config(vocab_size=600, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)},
     "its language model is t5"),
    ({"image_token_index": None}, "no image_token_index"),
    ({"text_config": OPTConfig(vocab_size=600, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4)}, "embeds tokens in 16 dimensions"),
])
def test_variants_turbo_cannot_take_are_one_line(tmp_path, image_file, changes, message):
    directory = str(save_tiny_blip2(tmp_path / "blip2", **changes))
    result = runner.invoke(app, ["generate", directory, image_file, PROMPT])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
