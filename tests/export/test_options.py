"""Export and bench option defaults live in the library: what the CLI leaves unset is resolved
the same way for Python callers, and each stage gets only its part."""

import pytest

from turbo.core.errors import UsageError
from turbo.export.options import ExportOptions
from turbo.export.tensorrt.stage import TrtOptions
from turbo.tools.bench import DEFAULT_ITERS, BenchOptions


def test_the_opset_follows_quantization():
    assert ExportOptions().opset == 20
    assert ExportOptions(quant="gptq-int4", calib="synthetic").opset == 21  # blocked DequantizeLinear
    assert ExportOptions(quant="gptq-int4", calib="synthetic", opset=23).opset == 23


def test_the_onnx_precision_follows_the_engine():
    assert ExportOptions().precision == "fp32"
    assert ExportOptions(trt=TrtOptions("fp16")).precision == "fp16"
    assert ExportOptions(trt=TrtOptions("bf16")).precision == "fp32"  # bf16 engines build from fp32 ONNX


def test_the_quantization_stage_gets_its_part():
    assert ExportOptions().quantization() is None
    quant = ExportOptions(quant="gptq-int8", calib="images", group_size=64, calib_seed=3,
                          quant_heads=True).quantization()
    assert (quant.mode, quant.calib, quant.group_size, quant.calib_seed, quant.heads) == (
        "gptq-int8", "images", 64, 3, True)


def test_bench_defaults():
    assert BenchOptions().iters == DEFAULT_ITERS and BenchOptions(duration_s=5.0).iters is None
    assert BenchOptions().runtimes == ("torch", "ort", "trt")
    assert BenchOptions(export_dirs=["exports/x"]).runtimes == ("ort",)


def test_a_mismatched_engine_precision_is_refused(tmp_path):
    from turbo.export.pipeline import run_export

    options = ExportOptions(model="vit-b16", tiny=True, random_weights=True, trt=TrtOptions("fp16"), precision="fp32")
    with pytest.raises(UsageError, match="fp16 engine is built from fp16 ONNX"):
        run_export(options, tmp_path / "out")
    assert not (tmp_path / "out").exists()
