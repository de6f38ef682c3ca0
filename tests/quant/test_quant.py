"""Weight-only quantization: GPTQ against plain rounding, the block-by-block driver on a merged
model, and the blocked DequantizeLinear graph in ONNX Runtime against the fake-quantized model."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import tiny_plan
from turbo.export.onnx_export import ExportModule, export_onnx
from turbo.graph.weight_quant import insert_dequantize
from turbo.models.build import build_merged_model
from turbo.quant.gptq import HessianAccumulator, gptq, quantize_rtn
from turbo.quant.quantize import quantize_blocks, quantize_sequential


def correlated_inputs(tokens: int = 4096, features: int = 256, rank: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(rank, features, generator=generator)
    return torch.randn(tokens, rank, generator=generator) @ mixing + 0.1 * torch.randn(tokens, features,
                                                                                       generator=generator)


def test_hessian_accumulates_over_batches():
    x = correlated_inputs(1000, 64)
    accumulator = HessianAccumulator(64)
    for chunk in x.split(300):
        accumulator.add(chunk.reshape(-1, 10, 64) if len(chunk) % 10 == 0 else chunk)
    torch.testing.assert_close(accumulator.hessian, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits, group, act_order", [(4, 32, False), (4, 128, False), (4, 32, True), (8, 64, False)])
def test_gptq_beats_rounding_on_correlated_inputs(bits, group, act_order):
    torch.manual_seed(0)
    weight = torch.nn.Linear(256, 128).weight.detach()
    x = correlated_inputs()
    accumulator = HessianAccumulator(256)
    accumulator.add(x)
    rtn, ours = quantize_rtn(weight, bits, group), gptq(weight, accumulator.hessian, bits, group, act_order)
    for quantized in (rtn, ours):  # integers on the symmetric grid, one scale per group of columns
        assert quantized.q.dtype == torch.int8 and quantized.scales.shape == (128, 256 // group)
        assert quantized.q.min() >= -(2 ** (bits - 1)) and quantized.q.max() <= 2 ** (bits - 1) - 1

    def error(q) -> float:
        return float(((x @ q.dequantize().T - x @ weight.T) ** 2).mean())

    assert error(ours) < 0.2 * error(rtn)


def _vit_with_calibration():
    built = tiny_plan("vit-b16", 4)
    model, _ = build_merged_model(built, random_weights=True)
    adapter = built.source.adapter
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 48, 48, generator=generator) for _ in range(4)]
    return built, model, adapter, batches


def test_blockwise_quantization_covers_every_encoder_linear():
    built, model, adapter, batches = _vit_with_calibration()
    layers = adapter.encoder_layers(model)
    before = {name: m.weight.detach().clone() for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}
    weights, reports = quantize_blocks(layers, lambda x: adapter.export_outputs(model, x, False), batches,
                                       "gptq-int4", group=8)
    assert set(weights) == set(before) and len(reports) == len(before) == 4 * 6
    for name, module in layers.named_modules():
        if name in weights:  # the model now holds the dequantized weights
            torch.testing.assert_close(module.weight, weights[name].dequantize())
            assert not torch.equal(module.weight, before[name])
    assert all(0 < report.relative_error < 0.1 for report in reports)


def test_sequential_quantization_equals_the_whole_model_driver():
    """Blocks run one after another (a language model's): feeding each block the quantized blocks'
    outputs quantizes exactly as re-running the whole model up to it does."""
    generator = torch.Generator().manual_seed(2)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
                                 for _ in range(3))
    for parameter in blocks.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    inputs = list(correlated_inputs(72, 32, 4).view(3, 1, 24, 32))  # three batches (1, 24, 32)
    twin = copy.deepcopy(blocks)

    def whole(x: torch.Tensor) -> torch.Tensor:
        for block in twin:
            x = block(x)
        return x

    want, _ = quantize_blocks(twin, whole, inputs, "gptq-int4", group=8)
    got, reports, outputs = quantize_sequential(blocks, inputs, lambda block, x: block(x), "gptq-int4", group=8)
    assert set(got) == set(want) == {f"{i}.{j}" for i in range(3) for j in (0, 2)} and len(reports) == 6
    for name in want:
        torch.testing.assert_close(got[name].q, want[name].q)
        torch.testing.assert_close(got[name].scales, want[name].scales)
    with torch.inference_mode():
        torch.testing.assert_close(outputs[0], whole(inputs[0]))  # the last block's outputs, quantized


def test_dequantize_graph_equals_the_fake_quantized_model(tmp_path):
    built, model, adapter, batches = _vit_with_calibration()
    layers = adapter.encoder_layers(model)
    weights, _ = quantize_blocks(layers, lambda x: adapter.export_outputs(model, x, False), batches,
                                 "rtn-int4", group=8)
    module = ExportModule(model, built)
    export_onnx(module, tmp_path / "fp32.onnx", opset=21)
    quantized, missing = insert_dequantize(onnx.load(str(tmp_path / "fp32.onnx")), weights)
    assert missing == []
    onnx.save(quantized, str(tmp_path / "int4.onnx"))
    dequantize = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(weights)
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} == {"axis": 0, "block_size": 8}
               for n in dequantize)
    fp32_bytes = sum(w.q.numel() * 4 for w in weights.values())
    int4_bytes = sum(w.q.numel() / 2 + w.scales.numel() * 4 for w in weights.values())
    shrink = (tmp_path / "fp32.onnx").stat().st_size - (tmp_path / "int4.onnx").stat().st_size
    assert shrink == pytest.approx(fp32_bytes - int4_bytes, rel=0.05)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # no int8 activations
    session = ort.InferenceSession(str(tmp_path / "int4.onnx"), options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {"pixel_values": x.numpy()})
    with torch.inference_mode():
        want = module(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)


def _calibration_folder(root):
    """Five images, one grayscale and one RGBA among them (converted to the model's channels)."""
    from PIL import Image

    for i, mode in enumerate(("RGB", "RGB", "L", "RGBA", "RGB")):
        folder = root / ("nested" if i % 2 else ".")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (np.random.default_rng(i).random((40, 40, len(mode))) * 255).astype("uint8")
        Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("name, args", [
    ("vit-b16", ["--quant", "gptq-int4", "--group-size", "8", "--calib", "{calib}", "--calib-size", "4"]),
    pytest.param("vit-b16", ["--quant", "gptq-int8", "--group-size", "16", "--act-order", "--calib", "synthetic",
                             "--quant-heads"], marks=pytest.mark.slow),  # CI time: int8 and act-order are covered
    # layer by layer above, --quant-heads by the captioner's decoder test
    pytest.param("blip-caption", ["--quant", "rtn-int4", "--group-size", "16", "--calib", "synthetic", "--calib-size",
                                  "8"], marks=pytest.mark.slow),  # CI time: caption tests quantize the decoder
    pytest.param("dinov2-reg-b14", ["--quant", "rtn-int4", "--group-size", "8", "--calib", "{calib}", "--calib-size",
                                    "4"], marks=pytest.mark.slow),  # CI time: a family the other cases cover in kind
])
def test_merge_and_quant_export_validates_and_runs(tmp_path, name, args):
    import json

    from typer.testing import CliRunner

    from turbo.cli.app import app

    calib = _calibration_folder(tmp_path / "calib")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "-m", name, "--tiny", "--random-weights", "--r", "4", "--threshold",
                                      "0", "-o", str(out), "--json", *[a.format(calib=calib) for a in args]])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    quantization = manifest["quantization"]
    assert manifest["onnx"]["opset"] == 21 and quantization["mode"] == args[1]
    heads = int("--quant-heads" in args)  # the classifier
    linears = 4 * (4 if name == "blip-caption" else 6) + heads  # q, k, v, o, fc1, fc2; BLIP: qkv, projection, fc1, fc2
    decoder = 2 * 10 if name == "blip-caption" else 0  # BLIP's text decoder: 10 Linears in each of 2 layers
    assert quantization["quantized_linears"] == linears and len(quantization["layers"]) == linears + decoder
    assert [layer["name"].split(".")[0] for layer in quantization["layers"][:linears]] == (
        ["encoder"] * (linears - heads) + ["classifier"] * heads)
    if decoder:  # image-only calibration: the decoder calibrates on the model's own captions
        assert quantization["decoder"]["quantized_linears"] == decoder
        assert "own greedy captions" in quantization["decoder"]["calibration_text"]
    calibration = quantization["calibration"]
    if "synthetic" in args:
        assert calibration["synthetic"] is True
    else:
        assert (calibration["count"], calibration["available"], calibration["synthetic"]) == (4, 5, False)
    assert all(q["passed"] for q in manifest["validation"]["quality"])
    model = onnx.load(str(out / "model.onnx"))
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8}
    quantized = [t for t in model.graph.initializer if t.data_type in bits]
    assert len(quantized) == linears and {bits[t.data_type] for t in quantized} == {quantization["bits"]}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # default kernels
    outputs = session.run(None, {"pixel_values": np.zeros((2, 3, 48, 48), np.float32)})
    assert all(np.isfinite(o).all() for o in outputs)
    if "{calib}" in args and name == "vit-b16":  # check quantizes again from the manifest's calibration source
        check = CliRunner().invoke(app, ["check", str(out), "--json"])
        assert check.exit_code == 0, check.output
        checks = {c["name"]: c for c in json.loads(check.stdout)["checks"]}
        assert checks["ORT vs PyTorch"]["passed"] is True
        # the export's own quality gate, re-run: the same checks with the same values
        recorded = "; ".join(f"{q['name']} {q['value']:.4f}" for q in manifest["quantization"]["quality"])
        assert checks["quantized vs fp32"]["passed"] is True
        assert [part.split(" (min")[0] for part in checks["quantized vs fp32"]["detail"].split("; ")] == \
            recorded.split("; ")


@pytest.mark.parametrize("args, message", [
    (["--quant", "gptq-int4"], "needs calibration images"),
    (["--quant", "gptq-int4", "--calib", "{empty}", "--group-size", "8"], "holds no images"),
    (["--quant", "gptq-int4", "--calib", "synthetic"], "--group-size 128 must divide"),
    (["--quant", "int3", "--calib", "synthetic"], "unknown --quant"),
    (["--quant", "gptq-int4", "--calib", "{empty}/missing", "--group-size", "8"], "missing: no such file or folder"),
    (["--quant", "rtn-int4", "--calib", "synthetic", "--opset", "20"], "needs --opset 21"),
])
def test_bad_quantization_input_writes_nothing(tmp_path, args, message):
    from typer.testing import CliRunner

    from turbo.cli.app import app

    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--r", "4", "-o",
                                      str(out), *[a.format(empty=tmp_path / "empty") for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_int8_qdq_quantizes_weight_matmuls_only(tmp_path):
    import json

    from typer.testing import CliRunner

    from turbo.cli.app import app

    calib = _calibration_folder(tmp_path / "calib")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "-m", "vit-b16", "--tiny", "--random-weights", "--r", "4",
                                      "--threshold", "0", "--quant", "int8", "--calib", str(calib), "-o", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["quantization"]["mode"] == "int8" and manifest["quantization"]["calibration"]["count"] == 5
    assert [q["name"] for q in manifest["validation"]["quality"]] == ["output cosine with fp32",
                                                                      "top-1 agreement with fp32"]
    model = onnx.load(str(out / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def dequantized_weight(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in initializers

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weight_matmuls = [n for n in matmuls if dequantized_weight(n.input[1])]
    assert len(weight_matmuls) == 4 * 6  # every encoder Linear
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]  # the classifier: float unless --quant-heads
    assert gemms and not any(dequantized_weight(n.input[1]) for n in gemms)
    for node in weight_matmuls:  # int8 per-channel weights, quantized activations
        weight = initializers[producers[node.input[1]].input[0]]
        scale = initializers[producers[node.input[1]].input[1]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weight.dims[1]]
        assert producers[node.input[0]].op_type == "DequantizeLinear"
    others = [n for n in matmuls if n not in weight_matmuls]  # attention scores, one-hot merge: float
    assert others and not any(producers.get(n.input[1]) is not None and
                              producers[n.input[1]].op_type == "DequantizeLinear" for n in others)
    check = CliRunner().invoke(app, ["check", str(out), "--json"])
    assert check.exit_code == 0, check.output
    assert {c["name"]: c["passed"] for c in json.loads(check.stdout)["checks"]}["quantized vs fp32"] is True
