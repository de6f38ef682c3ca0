"""CLIP image-text retrieval exports: at r=0 the exported image and text encoders equal
transformers' CLIPModel (embeddings and logits); merged exports validate against the merged
PyTorch model; rankings do not depend on how images are batched; `turbo retrieve` ranks both ways
and refuses what it cannot rank in one line."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.export.text_export import MATCH_RUN, SAMPLE_TEXTS, TEXT_RUN, export_text_tower, validate_text_tower
from turbo.export.validate import ValidationReport
from turbo.models.loading import load_model, load_tokenizer, resolve_source
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.retrieval import RetrievalPipeline, normalized, rank, rerank, tokenize

runner = CliRunner()
BATCH = 2  # static: several times faster to export than a dynamic axis


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[int, Path]:
    return {r: tiny_export(tmp_path_factory, "clip-vit-b16", r, batch=BATCH).directory for r in (0, 4)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(5):
        pixels = (np.random.default_rng(i).random((40 + i, 48, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


def test_r0_equals_transformers_clip_model(exports):
    pipeline = RetrievalPipeline.open(exports[0])
    upstream = load_model(resolve_source("clip-vit-b16", tiny=True), random_weights=True).eval()
    pixels = torch.randn(BATCH, *pipeline.manifest.onnx.pixel_shape, generator=torch.Generator().manual_seed(1))
    feeds = tokenize(pipeline.tokenizer, SAMPLE_TEXTS, pipeline.text.max_length)
    with torch.no_grad():
        want = upstream(pixel_values=pixels, **{k: torch.from_numpy(v) for k, v in feeds.items()})
    image = normalized(next(iter(pipeline.encoder.run({"pixel_values": pixels.numpy()}).values())))
    text = pipeline.text_embeddings(list(SAMPLE_TEXTS))
    np.testing.assert_allclose(image, want.image_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(text, want.text_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rank(image, text, pipeline.logit_scale).logits, want.logits_per_image.numpy(),
                               atol=1e-4, rtol=0)
    assert pipeline.logit_scale == pytest.approx(float(upstream.logit_scale.detach().exp()))


def test_merged_export_validates_both_encoders_and_the_check_can_fail(exports, tmp_path):
    manifest = json.loads((exports[4] / "turbo.json").read_text())
    assert manifest["status"] == "passed" and manifest["plan"]["final_tokens"] < manifest["plan"]["tokens_in"]
    text_checks = [c for c in manifest["validation"]["outputs"] if c["run"] == TEXT_RUN]
    assert [c["batch"] for c in text_checks] == [1, len(SAMPLE_TEXTS)] and all(c["passed"] for c in text_checks)
    assert manifest["text"]["max_length"] == 16 and manifest["text"]["embed_dim"] == 16

    pipeline = RetrievalPipeline.open(exports[4])
    other = load_model(resolve_source("clip-vit-b16", tiny=True), random_weights=True, seed=7)  # other weights
    report = ValidationReport("pytorch", "onnxruntime")
    tower = resolve_source("clip-vit-b16", tiny=True).adapter.text_tower
    validate_text_tower(other, tower, exports[4], pipeline.text, 32, report)
    assert report.outputs and not any(check.passed for check in report.outputs)


def test_rankings_do_not_depend_on_batching(exports, images):
    pipeline = RetrievalPipeline.open(exports[4])
    files = sorted(images.iterdir())
    forward, _ = pipeline.image_embeddings(files)
    backward = pipeline.image_embeddings(files[::-1])[0][::-1]  # other chunks, other padding
    np.testing.assert_allclose(forward, backward, atol=1e-6, rtol=0)
    texts = list(SAMPLE_TEXTS)
    assert (rank(forward, pipeline.text_embeddings(texts), 1.0).texts_for_image
            == rank(forward, np.concatenate([pipeline.text_embeddings(texts[:2]), pipeline.text_embeddings(texts[2:])]),
                    1.0).texts_for_image).all()


def test_retrieve_ranks_both_ways_and_says_what_it_skipped(exports, images, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\n\n  \na dog\n" + "a long text " * 20 + "\n")
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["retrieve", str(exports[4]), "--images", str(folder), "--texts", str(texts),
                                 "--top-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 3 and "skipped 2 empty lines" in notes[0] and "broken.png" in notes[1]
    assert "truncated (the first is text 3)" in notes[2]
    assert report["texts"] == ["a photo of a cat", "a dog", ("a long text " * 20).strip()]
    assert len(report["images"]) == 5 and all(len(row["matches"]) == 2 for row in report["image_to_text"])

    pipeline = RetrievalPipeline.open(exports[4])
    logits = pipeline.logit_scale * pipeline.image_embeddings([Path(p) for p in report["images"]])[0] \
        @ pipeline.text_embeddings(report["texts"]).T
    for i, row in enumerate(report["image_to_text"]):
        assert [m["text"] for m in row["matches"]] == list(np.argsort(-logits[i], kind="stable")[:2])
        assert row["matches"][0]["logit"] == pytest.approx(logits[i].max(), abs=1e-5)
    for t, row in enumerate(report["text_to_image"]):
        assert [m["image"] for m in row["matches"]] == list(np.argsort(-logits[:, t], kind="stable")[:2])

    strict = runner.invoke(app, ["retrieve", str(exports[4]), "--images", str(folder), "--texts", str(texts),
                                 "--strict"])
    assert strict.exit_code == 2 and "broken.png is not a readable image" in strict.stderr


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory, "vit-b16", 4, batch=2).directory


@pytest.mark.parametrize("case, message", [
    ("vision export", "has no text encoder"),
    ("no texts file", "no such file"),
    ("empty texts", "holds no text"),
    ("no images", "no such file or folder"),
])
def test_what_retrieve_cannot_rank_is_one_line(exports, images, vision_export, tmp_path, case, message):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n" if case == "empty texts" else "a cat\n")
    directory = vision_export if case == "vision export" else exports[0]
    args = ["retrieve", str(directory), "--images", str(tmp_path / "none" if case == "no images" else images),
            "--texts", str(tmp_path / "missing.txt" if case == "no texts file" else texts)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_check_bench_and_eval_take_a_retrieval_export(exports, images, tmp_path):
    assert runner.invoke(app, ["check", str(exports[4])]).exit_code == 0
    gated = runner.invoke(app, ["check", str(exports[0]), "--min-agreement", "1", "--json"])  # r=0: the same ranks
    assert gated.exit_code == 0, gated.output
    gate = next(c for c in json.loads(gated.stdout)["checks"] if c["name"] == "gate: agreement")
    assert gate["passed"] and "retrieval top-1 agreement" in gate["detail"]
    bench = runner.invoke(app, ["bench", str(exports[4]), "--batch", "2", "--iters", "2", "--warmup", "0", "--json"])
    assert bench.exit_code == 0, bench.output
    captions = tmp_path / "karpathy.json"  # the Karpathy layout, two captions per image
    captions.write_text(json.dumps({"images": [
        {"filename": path.name, "split": "test", "sentences": [{"raw": f"photo {path.stem}"}, {"raw": "a cat"}]}
        for path in sorted(images.iterdir())]}))
    evaluated = runner.invoke(app, ["eval", str(exports[4]), "--data", str(images), "--captions", str(captions),
                                    "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["task"] == "image-text-retrieval" and report["texts"] == 10 and report["caption_tokenizer"] is None
    exact, merged = (row["metrics"] for row in report["results"])
    assert exact["top1_agreement"] == 1 and exact["rank_correlation"] == pytest.approx(1)
    assert set(merged) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "recall_mean"}
    assert merged["i2t_r10"] == 1 and 0 <= merged["top1_agreement"] <= 1 and -1 <= merged["rank_correlation"] <= 1
    unpaired = runner.invoke(app, ["eval", str(exports[4]), "--data", str(images)])
    assert unpaired.exit_code == 2 and "needs --captions" in unpaired.stderr


def test_recall_and_fidelity_by_hand():
    from turbo.tools.retrieval_eval import fidelity, recalls

    logits = np.array([[0.1, 0.9, 0.5, 0.2],   # image 0 (captions 0, 1): its caption 1 is first
                       [0.9, 0.8, 0.7, 0.1],   # image 1 (caption 2): third
                       [0.5, 0.4, 0.3, 0.2]])  # image 2 (caption 3): fourth
    metrics = recalls(logits, np.array([0, 0, 1, 2]))
    assert (metrics["i2t_r1"], metrics["i2t_r5"]) == (pytest.approx(1 / 3), 1.0)
    assert (metrics["t2i_r1"], metrics["t2i_r5"]) == (0.5, 1.0)  # captions 1 and 2 find their image first
    assert fidelity(logits, logits) == {"top1_agreement": 1.0, "rank_correlation": 1.0}
    shuffled = fidelity(logits, logits[::-1])
    assert shuffled["top1_agreement"] < 1 and shuffled["rank_correlation"] < 1


@pytest.fixture(scope="module")
def blip_export(tmp_path_factory) -> Path:
    """BLIP retrieval at r=0 (its merged export is validated like every export; -m slow runs r=4)."""
    return tiny_export(tmp_path_factory, "blip-retrieval", 0, batch=BATCH).directory


def test_blip_r0_equals_transformers_itc_and_itm(blip_export):
    pipeline = RetrievalPipeline.open(blip_export)
    upstream = load_model(resolve_source("blip-retrieval", tiny=True), random_weights=True).eval()
    pixels = torch.randn(BATCH, *pipeline.manifest.onnx.pixel_shape, generator=torch.Generator().manual_seed(2))
    feeds = tokenize(pipeline.tokenizer, SAMPLE_TEXTS[:BATCH], pipeline.text.max_length)
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        itc = upstream(pixel_values=pixels, use_itm_head=False, **inputs).itm_score  # (images, texts) cosines
        itm = upstream(pixel_values=pixels, use_itm_head=True, **inputs).itm_score  # (pairs, 2)
    outputs = pipeline.encoder.run({"pixel_values": pixels.numpy()})
    image = normalized(outputs["image_embeds"])
    text = pipeline.text_embeddings(list(SAMPLE_TEXTS[:BATCH]))
    np.testing.assert_allclose(rank(image, text, pipeline.logit_scale).logits, itc.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pipeline.match_logits(list(SAMPLE_TEXTS[:BATCH]), outputs["last_hidden_state"]),
                               itm[:, 1].numpy(), atol=1e-4, rtol=0)
    manifest = json.loads((blip_export / "turbo.json").read_text())
    assert {c["run"] for c in manifest["validation"]["outputs"]} >= {TEXT_RUN, MATCH_RUN}
    assert manifest["text"]["max_length"] == 35 and manifest["text"]["match_file"] == "itm.onnx"


def test_rerank_reorders_each_top_k_by_match_plus_similarity_and_keeps_the_rest():
    logits = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.4, 0.3]])  # 2 images x 4 texts
    scored = []

    def match(images, texts):  # prefers later texts, strongly
        scored.append((images.tolist(), texts.tolist()))
        return texts.astype(float)

    ranking = rerank(rank_from_logits(logits), 2, match)
    assert ranking.texts_for_image.tolist() == [[1, 0, 2, 3], [3, 2, 1, 0]]  # 1 + 0.8 > 0 + 0.9; 3 + 0.3 > 2 + 0.4
    assert ranking.match_for_image[0, 1] == 1 and np.isnan(ranking.match_for_image[0, 2])
    assert ranking.images_for_text[:, :2].tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    assert scored[0] == ([0, 0, 1, 1], [0, 1, 2, 3])


def rank_from_logits(logits: np.ndarray):
    from turbo.runtimes.retrieval import Ranking

    return Ranking(logits, np.argsort(-logits, axis=1, kind="stable"), np.argsort(-logits.T, axis=1, kind="stable"))


def test_retrieve_itm_rerank_rescores_the_top_pairs(blip_export, exports, images, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\na dog\na red bus\n")
    args = ["retrieve", str(blip_export), "--images", str(images), "--texts", str(texts), "--top-k", "3", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--itm-rerank", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pipeline = RetrievalPipeline.open(blip_export)
    _, tokens = pipeline.image_embeddings([Path(p) for p in report["images"]], keep_tokens=True)
    for i, (before, after) in enumerate(zip(plain["image_to_text"], report["image_to_text"])):
        top = [m["text"] for m in before["matches"][:2]]
        assert sorted(m["text"] for m in after["matches"][:2]) == sorted(top) and "itm" not in after["matches"][2]
        want = pipeline.match_logits([report["texts"][t] for t in top], tokens[[i] * 2])
        got = {m["text"]: m["itm"] for m in after["matches"][:2]}
        assert [got[t] for t in top] == pytest.approx(want.tolist(), abs=1e-5)
        combined = [m["itm"] + m["logit"] for m in after["matches"][:2]]
        assert combined == sorted(combined, reverse=True)
    clip = runner.invoke(app, ["retrieve", str(exports[0]), "--images", str(images), "--texts", str(texts),
                               "--itm-rerank", "2"])
    assert clip.exit_code == 2 and "--itm-rerank needs an image-text matching head" in clip.stderr


def test_bench_times_the_matching_head_on_the_merged_tokens(blip_export, exports):
    from turbo.runtimes.retrieval import MatchRunner

    result = runner.invoke(app, ["bench", str(blip_export), "--batch", "2", "--iters", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert {(row["workload"], row["r"]) for row in rows} == {("encoder", 0), ("itm", 0)}
    pipeline = RetrievalPipeline.open(blip_export)
    pixels = np.random.default_rng(0).standard_normal((BATCH, *pipeline.manifest.onnx.pixel_shape)).astype("float32")
    logits = MatchRunner(pipeline, "a dog").run({"pixel_values": pixels})["itm_logits"]
    tokens = pipeline.encoder.run({"pixel_values": pixels})["last_hidden_state"]
    np.testing.assert_allclose(logits[:, 1], pipeline.match_logits(["a dog"] * BATCH, tokens), atol=1e-6)
    clip = runner.invoke(app, ["bench", str(exports[0]), "--batch", "2", "--iters", "1", "--warmup", "0", "--json"])
    assert {row["workload"] for row in json.loads(clip.stdout)["results"]} == {"encoder"}  # CLIP has no ITM head


def test_check_reads_the_text_graphs_and_the_matching_heads_token_count(blip_export, tmp_path):
    import shutil

    result = runner.invoke(app, ["check", str(blip_export), "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["text onnx.checker (full)"]["passed"] and checks["matching head image tokens"]["passed"]
    edited = Path(shutil.copytree(blip_export, tmp_path / "edited"))
    manifest = json.loads((edited / "turbo.json").read_text())
    manifest["text"]["image_tokens"] += 1  # a manifest that no longer describes its matching head
    (edited / "turbo.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["check", str(edited), "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert result.exit_code == 3 and checks["matching head image tokens"]["passed"] is False


@pytest.mark.parametrize("eos", ["legacy id 2: pooled at the largest id", "the end-of-text id: pooled at its first"])
def test_the_text_encoder_equals_transformers_for_both_clip_pooling_rules(tmp_path, eos):
    """CLIP's text tower pools at argmax(input_ids) when its config keeps the legacy end-of-text
    id 2 (openai's checkpoints), else at the first end-of-text token (newer ones): both export."""
    source = resolve_source("clip-vit-b16", tiny=True)
    config = copy.deepcopy(source.config)
    if eos.startswith("the end-of-text"):
        config.text_config.eos_token_id = config.text_config.vocab_size - 1  # the tokenizer's <|endoftext|>
    source = dataclasses.replace(source, config=config)
    model = load_model(source, random_weights=True).eval()
    tokenizer = load_tokenizer(source, random_weights=True)
    record = export_text_tower(model, source, tokenizer, tmp_path, 20, image_tokens=0)
    feeds = tokenize(tokenizer[0], SAMPLE_TEXTS, record.max_length)
    with torch.no_grad():
        want = model.get_text_features(**{k: torch.from_numpy(v) for k, v in feeds.items()}).pooler_output
    got = OnnxRuntimeRunner(tmp_path / record.file).run(feeds)["text_embeds"]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
