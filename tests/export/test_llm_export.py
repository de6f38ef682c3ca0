"""LLaVA exports with their language model: validated graphs, `turbo check`, and `turbo generate`
on ONNX Runtime giving PyTorch's tokens, and transformers' own with every reduction off."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.core.manifest import OutputTokens
from turbo.data.images import Sample, pixel_batch
from turbo.export.llm_quant import answer_agreement
from turbo.export.validate import graph_problems, seeded_pixels
from turbo.graph.summary import summarize
from turbo.merging.llm_drop import parse_llm_drop
from turbo.models.build import build_plan
from turbo.models.llm_decoder import insert_image_features
from turbo.models.llm_vocab import placeholder_tokenizer
from turbo.models.loading import load_image_processor, load_model, resolve_source
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids
from turbo.runtimes.llm_onnx import OnnxVlm
from turbo.serving.model_config import check_config

runner = CliRunner()
SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "bench.schema.json").read_text())
PROMPT = "USER: <image>\nWhat is shown here? ASSISTANT:"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return tiny_export(tmp_path_factory, "llava-1.5-7b", 2, decoder=True, llm_drop="pyramid:stages=2,keep=0.5")


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    return tiny_export(tmp_path_factory, "llava-interleave-qwen-0.5b", 0, decoder=True)


def generate(*args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_export_holds_validated_language_model_graphs(reduced):
    manifest = reduced.manifest
    assert reduced.report.passed
    runs = {check.run for check in reduced.report.outputs}
    assert {"language model prefill", "language model decode (3 steps)"} <= runs
    assert [check.passed for check in reduced.report.captions] == [True]
    assert manifest.llm.image_tokens == 36 - 4 * 2  # 36 patches, r=2 in the 4 blocks up to the feature layer
    assert manifest.llm.image_per_layer == [28, 28, 14, 14] and manifest.llm.llm_drop == "pyramid:stages=2,keep=0.5"
    result = runner.invoke(app, ["check", str(reduced.directory), "--json"])
    assert result.exit_code == 0, result.output
    checks = {row["name"]: row for row in json.loads(result.stdout)["checks"]}
    assert checks["language model vs PyTorch"]["passed"]


def test_generate_on_onnx_runtime_gives_the_pytorch_tokens(reduced, image_file):
    got = generate(str(reduced.directory), image_file, PROMPT, "--max-new-tokens", "8")
    want = generate("llava-1.5-7b", image_file, PROMPT, "--r", "2", "--llm-drop", "pyramid:stages=2,keep=0.5", "--tiny",
                    "--random-weights", "--max-new-tokens", "8")
    assert got["runtime"] == "onnxruntime" and want["runtime"] == "pytorch"
    assert got["token_ids"] == want["token_ids"] and got["image_tokens_per_llm_layer"] == [28, 28, 14, 14]


def test_an_unreduced_export_generates_what_transformers_generates(exact, image_file):
    got = generate(str(exact.directory), image_file, PROMPT, "--max-new-tokens", "10")
    source = resolve_source("llava-interleave-qwen-0.5b", tiny=True)
    pixels = torch.from_numpy(pixel_batch([Sample(Path(image_file))], load_image_processor(source, (48, 48), True)[0]))
    ids = torch.tensor([image_prompt_ids(placeholder_tokenizer(source.config), PROMPT, source.config.image_token_id,
                                         36)])
    with torch.no_grad():
        want = load_model(source, random_weights=True).generate(input_ids=ids, pixel_values=pixels, do_sample=False,
                                                                max_new_tokens=10)[0, ids.shape[1]:]
    assert got["token_ids"] == want.tolist()[:len(got["token_ids"])] and got["token_ids"]


def test_an_export_refuses_model_options_and_a_changed_file(reduced, image_file, tmp_path):
    result = runner.invoke(app, ["generate", str(reduced.directory), image_file, PROMPT, "--llm-drop", "fastv"])
    assert result.exit_code == 2 and "drop --llm-drop" in result.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in Path(reduced.directory).iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = copy / reduced.manifest.llm.weights
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["generate", str(copy), image_file, PROMPT])
    assert result.exit_code == 3 and reduced.manifest.llm.weights in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def plan_json(*args: str) -> dict:
    result = runner.invoke(app, ["plan", *args, "--tiny", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_times_the_first_token_and_decoding_against_an_unreduced_export(reduced):
    result = runner.invoke(app, ["bench", str(reduced.directory), "--iters", "1", "--warmup", "0",
                                 "--caption-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, SCHEMA)
    rows = {(row["workload"], row["llm_drop"]): row for row in report["results"]}
    assert set(rows) == {(w, d) for w in ("first_token", "decode") for d in ("none", "pyramid:stages=2,keep=0.5")}
    base, merged = rows[("first_token", "none")], rows[("first_token", "pyramid:stages=2,keep=0.5")]
    assert base["r"] == 0 and base["speedup"] == 1 and merged["r"] == 2
    full = plan_json("-m", "llava-1.5-7b", "--r", "0")
    reduced_plan = plan_json("-m", "llava-1.5-7b", "--r", "2", "--llm-drop", "pyramid:stages=2,keep=0.5")
    flops = [plan["flops"] + plan["llm"]["prefill_flops"] for plan in (full, reduced_plan)]
    assert merged["flops_bound"] == pytest.approx(flops[0] / flops[1])
    assert rows[("decode", "none")]["tokens_per_s"] > 0 and merged["image_tokens"] == [28, 28, 14, 14]


def test_bench_refuses_a_baseline_that_merges(reduced):
    result = runner.invoke(app, ["bench", str(reduced.directory), "--baseline", str(reduced.directory)])
    assert result.exit_code == 2 and "must be an export with its language model, r=0" in result.stderr


def test_eval_of_an_export_scores_what_the_same_setting_scores_in_pytorch(reduced, tmp_path, image_file):
    for index in range(2):
        Image.open(image_file).rotate(90 * index).save(tmp_path / f"{index}.png")
    args = ["--data", str(tmp_path), "--max-tokens", "5", "--json"]
    on_onnx = runner.invoke(app, ["eval", str(reduced.directory), *args])
    in_torch = runner.invoke(app, ["eval", "--model", "llava-1.5-7b", "--tiny", "--random-weights", "--r", "2",
                                   "--llm-drop", "pyramid:stages=2,keep=0.5", *args])
    assert on_onnx.exit_code == 0 and in_torch.exit_code == 0, on_onnx.output + in_torch.output
    exported, modelled = (json.loads(result.stdout)["results"][1] for result in (on_onnx, in_torch))
    assert exported["runtime"] == "onnxruntime" and modelled["runtime"] == "torch"
    assert exported["metrics"] == modelled["metrics"] and exported["flops_bound"] == modelled["flops_bound"]


DYRATE = "dyrate:layer=2,coverage=0.5,min_keep=0.1"


@pytest.fixture(scope="module")
def pruning(tmp_path_factory):
    return tiny_export(tmp_path_factory, "llava-1.5-7b", 0, decoder=True, llm_drop=DYRATE)


def test_a_dyrate_export_prunes_its_caches_as_pytorch_does(pruning, image_file):
    """The decode graph decides each step's pruning itself: the image tokens its caches of layers
    K.. hold after every step equal PyTorch's, and so do the generated tokens."""
    assert pruning.report.passed and pruning.manifest.llm.llm_drop == DYRATE
    got = generate(str(pruning.directory), image_file, PROMPT, "--max-new-tokens", "6")
    want = generate("llava-1.5-7b", image_file, PROMPT, "--r", "0", "--llm-drop", DYRATE, "--tiny",
                    "--random-weights", "--max-new-tokens", "6")
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 6
    assert want["llm_drop"] == DYRATE
    vlm = OnnxVlm.open(pruning.directory)
    source = resolve_source("llava-1.5-7b", tiny=True)
    generator = VlmGenerator(load_model(source, random_weights=True), source.adapter.language_model,
                             parse_llm_drop(DYRATE))
    decoder = generator.decoder
    features = torch.randn(1, 36, source.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    prefix, suffix = [1, 20, 30], [40, 50, 60, 70]
    held, run = [], vlm.decode.run

    def decode_step(feeds: dict) -> dict:
        held.append(run(feeds))
        return held[-1]

    vlm.decode.run = decode_step
    tokens = [int(logits.argmax()) for logits in vlm.stream({"image_features": features.numpy()}, prefix, suffix, 6)]
    ids = torch.tensor([prefix + [source.config.image_token_id] * 36 + suffix])
    with torch.inference_mode():
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, source.config.image_token_id)
        prefill = decoder.prefill(embeds, image)
        cache, images = prefill.cache, decoder.images(prefill, image)
        for step, (token, out) in enumerate(zip(tokens, held)):
            position = torch.tensor([[prefill.next_position + step]])
            _, cache, images = decoder.decode_pruning(torch.tensor([[token]]), position, cache, images)
            assert out["present.image_kept"].tolist() == images.kept.tolist(), step
            assert [out[f"present.{layer}.key"].shape[2] for layer in range(4)] == \
                [keys.shape[2] for keys, _ in cache], step
    assert images.kept.shape[1] < 36  # it pruned


# the spatial merge's threshold merges some of the tiny tower's 4 windows
SPATIAL = "mustdrop:layer=1,every=1,stages=2,global_thr=0.03,individual_thr=0.02,key=0.1,window=3,spatial_thr=0.02"


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    return tiny_export(tmp_path_factory, "llava-1.5-7b", 0, decoder=True, llm_drop=SPATIAL)


def test_a_mustdrop_export_keeps_what_each_prompt_passes_as_pytorch_does(spatial, image_file):
    """The vision graph gives the CLS attention its key set comes from; the prefill graph decides
    per prompt which image tokens each layer keeps: its caches' image tokens, and the generated
    tokens, equal PyTorch's for prompts that keep different counts."""
    assert spatial.report.passed and spatial.manifest.onnx.outputs[1]["name"] == "cls_attention"
    got = generate(str(spatial.directory), image_file, PROMPT, "--max-new-tokens", "5")
    want = generate("llava-1.5-7b", image_file, PROMPT, "--r", "0", "--llm-drop", SPATIAL, "--tiny",
                    "--random-weights", "--max-new-tokens", "5")
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 5
    assert got["image_tokens_per_llm_layer"] == want["image_tokens_per_llm_layer"]
    vlm = OnnxVlm.open(spatial.directory)
    source = resolve_source("llava-1.5-7b", tiny=True)
    decoder = VlmGenerator(load_model(source, random_weights=True), source.adapter.language_model,
                           parse_llm_drop(SPATIAL)).decoder
    counts, run = [], vlm.prefill.run
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 36, 32, generator=generator)
    attention = torch.rand(1, 36, generator=generator).softmax(dim=-1)
    for before in (3, 20):  # text before the image: the longer prompt spreads its attention thinner
        prefix, suffix = list(range(1, before + 1)), [40, 50, 60, 70]
        out = run({"prefix_ids": np.array([prefix]), "image_features": features.numpy(),
                   "cls_attention": attention.numpy(), "suffix_ids": np.array([suffix])})
        ids = torch.tensor([prefix + [source.config.image_token_id] * 36 + suffix])
        with torch.inference_mode():
            embeds, image = insert_image_features(decoder.embed(ids), ids, features, source.config.image_token_id)
            prefill = decoder.prefill(embeds, image, attention)
        assert out["tokens_per_layer"].tolist() == [seen.shape[1] for seen in prefill.positions]
        assert [out[f"present.{layer}.key"].shape[2] for layer in range(4)] == \
            [keys.shape[2] for keys, _ in prefill.cache]  # the output-aware cache: layers 1.. hold the survivors
        np.testing.assert_allclose(out["logits"], prefill.logits.numpy(), rtol=1e-4, atol=1e-5)
        counts.append([tokens - len(prefix) - len(suffix) for tokens in out["tokens_per_layer"].tolist()])
    assert counts == [[36] * 4, [36, 36, 4, 4]]  # decided per prompt: the longer one keeps only the key set


def test_a_mustdrop_export_runs_its_spatial_merge_per_image_as_pytorch_does(spatial, image_file, tmp_path):
    """The vision graph's spatial merge decides the image-token count from its input: the counts it
    gives equal PyTorch's, and differ between inputs; generation, `turbo check` and the serving
    repository (one image per encoder batch) follow them."""
    assert spatial.report.passed and spatial.manifest.onnx.decided_tokens == ["image_features"]
    features = next(o for o in spatial.manifest.onnx.outputs if o["name"] == "image_features")
    assert isinstance(features["shape"][1], str)  # a run-time axis
    source = resolve_source("llava-1.5-7b", tiny=True)
    generator = VlmGenerator(load_model(source, random_weights=True), source.adapter.language_model,
                             parse_llm_drop(SPATIAL))
    vision, counts = OnnxVlm.open(spatial.directory).vision, set()
    for batch in (1, 3):
        pixels = seeded_pixels(batch, tuple(spatial.manifest.onnx.pixel_shape))
        got = vision.run({"pixel_values": pixels})
        with torch.inference_mode():
            want = generator.image_tokens(torch.from_numpy(pixels))
        for name, expected in zip(("image_features", "cls_attention"), want):
            np.testing.assert_allclose(got[name], expected.numpy(), rtol=1e-4, atol=1e-5)
        counts.add(got["image_features"].shape[1])
    assert len(counts) == 2 and max(counts) == 36  # one graph, counts decided per input
    got = generate(str(spatial.directory), image_file, PROMPT, "--max-new-tokens", "4")
    want = generate("llava-1.5-7b", image_file, PROMPT, "--r", "0", "--llm-drop", SPATIAL, "--tiny",
                    "--random-weights", "--max-new-tokens", "4")
    assert got["token_ids"] == want["token_ids"]
    assert got["image_tokens_per_llm_layer"] == want["image_tokens_per_llm_layer"]
    assert runner.invoke(app, ["check", str(spatial.directory)]).exit_code == 0
    summary = summarize(spatial.directory / "model.onnx")
    built = build_plan("llava-1.5-7b", 0, tiny=True)
    assert graph_problems(summary, built.plan, "matmul", None, spatial.manifest.onnx.output_tokens) == []
    problems = graph_problems(summary, built.plan, "matmul", None, OutputTokens(excluded={"image_features": 1}))
    assert any("output image_features has token dim" in p for p in problems)  # a count the plan does not fix
    result = runner.invoke(app, ["deploy", "triton", str(spatial.directory), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert check_config(tmp_path / "repo" / f"{spatial.directory.name}-encoder" / "config.pbtxt").max_batch_size == 1


def test_a_graph_without_the_spatial_merge_is_not_taken_for_one(reduced):
    summary = summarize(reduced.directory / "model.onnx")
    plan = build_plan("llava-1.5-7b", 0, tiny=True).plan
    problems = graph_problems(summary, plan, "matmul", None, OutputTokens(decided=("image_features",)))
    assert any("a spatial merge the graph lacks" in p for p in problems)


QUANT = {"quant": "gptq-int4", "group_size": 16, "calib": "synthetic", "calib_size": 4}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return tiny_export(tmp_path_factory, "llava-1.5-7b", 0, decoder=True,
                       **QUANT)  # r=0: int4 on a random tiny tower moves merge decisions


def test_a_quantized_language_model_equals_its_fake_quantized_pytorch_model(quantized, reduced, image_file):
    """--quant also quantizes the language model's block Linears (GPTQ, calibrated block after
    block): both of its graphs read them as INT4 + DequantizeLinear from one smaller weights file,
    equal the fake-quantized PyTorch model, and agree with fp32 on its answers' next tokens;
    `turbo generate` runs it and `turbo check` quantizes again to the same result."""
    assert quantized.report.passed
    record = quantized.manifest.quantization
    assert record.decoder["quantized_linears"] == 4 * 7  # q, k, v, o, gate, up, down in each of 4 blocks
    assert "own greedy answers" in record.decoder["calibration_text"]
    for graph in ("llm_prefill.onnx", "llm_decode.onnx"):
        model = onnx.load(str(quantized.directory / graph))
        assert sum(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer) == 4 * 7
    assert quantized.manifest.llm.weights_bytes < reduced.manifest.llm.weights_bytes  # the same LLM, unquantized
    checks = {c.run: c for c in quantized.report.outputs if c.run.startswith("language model")}
    assert len(checks) == 2 and all(c.passed for c in checks.values())
    agreement = next(q for q in quantized.report.quality if q.name.startswith("answer next-token"))
    assert agreement.value > 0.5 and not agreement.gated  # random weights: measured, not gated
    got = generate(str(quantized.directory), image_file, PROMPT, "--max-new-tokens", "4")  # default kernels
    assert len(got["token_ids"]) == 4
    check = runner.invoke(app, ["check", str(quantized.directory), "--json"])
    assert check.exit_code == 0, check.output
    detail = {c["name"]: c["detail"] for c in json.loads(check.stdout)["checks"]}["quantized vs fp32"]
    assert f"answer next-token agreement with fp32 {agreement.value:.4f}" in detail
    bench = runner.invoke(app, ["bench", str(quantized.directory), "--iters", "1", "--warmup", "0",
                                "--caption-tokens", "2", "--json"])  # unreduced: its own baseline
    assert bench.exit_code == 0, bench.output
    report = json.loads(bench.stdout)
    jsonschema.validate(report, SCHEMA)
    assert [(row["workload"], row["quant"]) for row in report["results"]] == [
        ("first_token", "gptq-int4"), ("decode", "gptq-int4")]


def test_answer_agreement_tells_another_model_apart(quantized):
    """The agreement gate can fail: against a model with other weights it is low."""
    source = resolve_source("llava-1.5-7b", tiny=True)
    pipeline = OnnxVlm.open(quantized.directory)
    other = load_model(source, random_weights=True, seed=7)
    agreement = answer_agreement(other, source, parse_llm_drop("none"), pipeline,
                                 pipeline.tokenizer, tuple(quantized.manifest.onnx.pixel_shape), False)
    assert agreement < 0.5
