"""The real bundled Triton server over a repository of tiny exports: what it serves equals the
exports it was built from, over HTTP and gRPC, under concurrent clients; bad requests get errors and
the server keeps serving."""

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from turbo.data.images import Sample, pixel_batch
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.llm_generation import split_prompt
from turbo.runtimes.llm_onnx import OnnxVlm
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.triton_client import TritonRunner
from turbo.tools.load_test import synthetic_feeds

PROTOCOLS = ["http", "grpc"]


def url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else f"grpc://{server.grpc_url}"


def png(seed: int, size=(50, 70)) -> bytes:
    image = Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()


def images(*seeds: int) -> np.ndarray:
    return np.array([[png(seed)] for seed in seeds], dtype=np.object_)  # (B, 1) bytes


def local_logits(export, encoded: list[bytes]) -> np.ndarray:
    processor = AutoImageProcessor.from_pretrained(export)
    pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB") for data in encoded],
                       return_tensors="np")["pixel_values"].astype(np.float32)
    return OnnxRuntimeRunner(export / "model.onnx").run({"pixel_values": pixels})["logits"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_encoder_equals_onnx_runtime(server, served_exports, protocol):
    pixels = np.random.default_rng(0).standard_normal((3, 3, 48, 48)).astype(np.float32)
    served = TritonRunner(url(server, protocol), "vit-encoder").run({"pixel_values": pixels})
    local = OnnxRuntimeRunner(served_exports["vit"] / "model.onnx").run({"pixel_values": pixels})
    for name in ("logits", "last_hidden_state", "token_sizes"):
        np.testing.assert_allclose(served[name], local[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_labels_are_the_exports_top_classes(server, served_exports, protocol):
    sent = images(1, 2)
    served = TritonRunner(url(server, protocol), "vit").run({"image": sent})
    logits = local_logits(served_exports["vit"], [row[0] for row in sent])
    want = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(served["classes"], want)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    np.testing.assert_allclose(served["scores"], np.take_along_axis(probabilities, want, -1), atol=1e-6)
    assert [label.decode() for label in served["labels"][0]] == [f"LABEL_{i}" for i in want[0]]  # the config's


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_captions_equal_turbo_caption(server, served_exports, tmp_path, protocol):
    paths = []
    for seed in (3, 4):
        paths.append(tmp_path / f"{seed}.png")
        paths[-1].write_bytes(png(seed))
    local = CaptionPipeline.open(served_exports["blip"])
    runner = TritonRunner(url(server, protocol), "blip")
    served = runner.run({"image": images(3, 4)})["caption"]
    assert [row[0].decode() for row in served] == [c["caption"] for c in local.caption_files(paths)]
    prompted = runner.run({"image": images(3), "prompt": np.array([[b"a photo of"]], dtype=np.object_)})["caption"]
    assert prompted[0][0].decode() == local.caption_files(paths[:1], prompt="a photo of")[0]["caption"]


def test_served_answers_equal_turbo_generate(server, served_generation):
    """Each (image, prompt) row of a request gets the answer the export gives on ONNX Runtime (DyRate
    pruning its caches at every step through the served decode model); a prompt without the image
    placeholder is that request's error."""
    from tritonclient.utils import InferenceServerException

    runner = TritonRunner(url(server, "http"), "llava")
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]
    served = runner.run({"image": images(3, 4), "prompt": np.array([[p.encode()] for p in prompts], dtype=np.object_),
                         "max_new_tokens": np.array([[6], [3]], dtype=np.int32)})["text"]
    vlm = OnnxVlm.open(served_generation)
    for row, (seed, prompt, tokens) in enumerate(zip((3, 4), prompts, (6, 3))):
        prefix, suffix = split_prompt(vlm.tokenizer, prompt, vlm.record.image_token_id)
        pixels = pixel_batch([Sample(None, image=Image.open(io.BytesIO(png(seed))))], vlm.processor, 3)
        answer = vlm.tokenizer.decode(list(vlm.greedy_tokens(pixels, prefix, suffix, tokens)), skip_special_tokens=True)
        assert served[row][0].decode() == answer and answer
    with pytest.raises(InferenceServerException) as raised:
        runner.run({"image": images(3), "prompt": np.array([[b"What is this?"]], dtype=np.object_)})
    assert "no image placeholder" in raised.value.message()
    assert server.alive() and server.ready()
    sample = synthetic_feeds(runner, 1, (40, 60))  # what turbo bench --url sends: the model's sample prompt
    assert sample["prompt"][0][0].decode().startswith("USER: <image>") and runner.run(sample)["text"].shape == (1, 1)


def test_concurrent_clients_all_get_their_own_answers(server, served_exports, tmp_path):
    seeds = list(range(10, 22))
    logits = local_logits(served_exports["vit"], [png(seed) for seed in seeds])
    want_classes = {seed: int(np.argmax(row)) for seed, row in zip(seeds, logits)}
    paths = [tmp_path / f"{seed}.png" for seed in seeds[:4]]
    for path, seed in zip(paths, seeds):
        path.write_bytes(png(seed))
    want_captions = {seed: c["caption"] for seed, c in zip(seeds, CaptionPipeline.open(served_exports["blip"])
                                                           .caption_files(paths))}
    wrong, lock = [], threading.Lock()

    def client(index: int) -> None:
        protocol = PROTOCOLS[index % 2]
        classifier, captioner = TritonRunner(url(server, protocol), "vit"), TritonRunner(url(server, protocol), "blip")
        for round_ in range(3):
            seed = seeds[(index + round_) % len(seeds)]
            got = int(classifier.run({"image": images(seed)})["classes"][0, 0])
            if got != want_classes[seed]:
                with lock:
                    wrong.append((seed, got, want_classes[seed]))
            if seed in want_captions and round_ == 0:
                caption = captioner.run({"image": images(seed)})["caption"][0, 0].decode()
                if caption != want_captions[seed]:
                    with lock:
                        wrong.append((seed, caption, want_captions[seed]))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_errors_and_the_server_keeps_serving(server, served_exports, protocol):
    from tritonclient.utils import InferenceServerException

    encoder, classifier = TritonRunner(url(server, protocol), "vit-encoder"), TritonRunner(url(server, protocol), "vit")
    captioner = TritonRunner(url(server, protocol), "blip")
    bad = [
        (lambda: encoder.run({"pixel_values": np.zeros((1, 3, 40, 40), np.float32)}), "shape"),  # wrong size
        (lambda: encoder.run({"pixel_values": np.zeros((9, 3, 48, 48), np.float32)}), "batch"),  # over max batch
        (lambda: _send_as(encoder, "pixel_values", np.zeros((1, 3, 48, 48), np.int64), "INT64"), "data-type"),
        (lambda: classifier.run({"image": np.array([[b"these bytes are not an image"]], dtype=np.object_)}),
         "not a readable image"),
        (lambda: captioner.run({"image": images(1), "prompt": np.array([[b"word " * 600]], dtype=np.object_)}),
         "shorter prompt"),
    ]
    for send, says in bad:
        with pytest.raises(InferenceServerException) as raised:
            send()
        assert says in raised.value.message(), raised.value.message()
    assert server.alive() and server.ready()
    logits = local_logits(served_exports["vit"], [png(5)])
    assert int(classifier.run({"image": images(5)})["classes"][0, 0]) == int(np.argmax(logits))


def _send_as(runner: TritonRunner, name: str, value: np.ndarray, datatype: str):
    tensor = runner.module.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return runner.client.infer(runner.model, [tensor])


def test_bench_url_reports_every_model_and_concurrency(server, tmp_path):
    from typer.testing import CliRunner

    from turbo.cli.app import app

    plot = tmp_path / "load.png"
    result = CliRunner().invoke(app, ["bench", "--url", server.http_url, "--model", "vit,vit-encoder",
                                      "--baseline", "vit", "--concurrency", "1,3", "--duration", "1", "--json",
                                      "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {(row["model"], row["concurrency"]): row for row in report["rows"]}
    assert set(rows) == {(m, c) for m in ("vit", "vit-encoder") for c in (1, 3)}
    assert all(row["requests"] > 0 and row["errors"] == 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["p50"]
               for row in rows.values()), report["rows"]
    assert rows[("vit", 3)]["speedup"] == 1.0 and rows[("vit-encoder", 1)]["speedup"] == pytest.approx(
        rows[("vit-encoder", 1)]["throughput"] / rows[("vit", 1)]["throughput"], rel=1e-2)
    assert report["models"]["vit"]["turbo_r"] == "4" and plot.stat().st_size > 0
