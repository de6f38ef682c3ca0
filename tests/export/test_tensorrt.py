"""The TensorRT path without TensorRT: the Triton kernel against the torch merge (Triton's CPU
interpreter here, compiled on CUDA where a GPU is), its AOT PTX, the TurboMerge node's plugin
interface on real exported graphs, the native (inlined) form, every builder decision, and
`--trt` where TensorRT is missing. Tests marked `tensorrt` build real engines and are skipped
without TensorRT and a GPU."""

import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tests.cli.test_export_cli import model_dir
from tests.conftest import tiny_export
from turbo.cli.app import app
from turbo.core.errors import UsageError
from turbo.export.tensorrt.settings import (
    MAX_PROMPT_TOKENS,
    BatchProfile,
    batch_profile,
    builder_plan,
    decoder_builder_plan,
    merged_tokens,
    onnx_input_dims,
    plugin_mode,
    plugin_type_combinations,
    profile_shapes,
    timing_cache_name,
)
from turbo.merging.matching import MergeConfig, information_degree, select_merges
from turbo.merging.merge import merge_tokens, pack_indices
from turbo.runtimes.availability import tensorrt_reason

# (batch, tokens, channels, r): r at the cap (no unmerged A-side token), r=1, channels not a power of two
SHAPES = [(2, 17, 12, 5), (3, 37, 16, 18), (1, 9, 8, 1), (2, 197, 24, 16)]
HALF_ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def merge_case(batch: int, tokens: int, channels: int, r: int, dtype: torch.dtype, device: str = "cpu"):
    """Inputs with merged sizes (not all ones) and the torch reference's output."""
    g = torch.Generator().manual_seed(tokens * 100 + r)
    x = torch.randn(batch, tokens, channels, generator=g).to(device, dtype)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=g).to(device, dtype)
    degree, best = information_degree(torch.randn(batch, tokens, 8, generator=g).to(device),
                                      torch.rand(batch, tokens, generator=g).to(device), MergeConfig())
    index = pack_indices(*select_merges(degree, best, r))
    return x, size, index, merge_tokens(x, size, index)


def assert_merge_equal(got: tuple, want: tuple, dtype: torch.dtype) -> None:
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert torch.equal(got[1], want[1])  # sizes are small integers: exact in every precision
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    else:  # the kernel accumulates in fp32, the reference in the half type
        torch.testing.assert_close(got[0].float(), want[0].float(), atol=HALF_ATOL[dtype], rtol=HALF_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_the_torch_merge_in_the_interpreter(shape, dtype):
    pytest.importorskip("triton")
    from turbo.kernels.triton_merge import interpreted_kernel, turbo_merge

    x, size, index, want = merge_case(*shape, dtype)
    assert_merge_equal(turbo_merge(x, size, index, shape[3], interpreted_kernel()), want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(64, 197, 768, 16), (8, 577, 768, 30)])
def test_kernel_equals_the_torch_merge_on_cuda(shape, dtype):
    from turbo.kernels.triton_merge import turbo_merge

    x, size, index, want = merge_case(*shape, dtype, "cuda")
    assert_merge_equal(turbo_merge(x, size, index, shape[3]), want, dtype)


@pytest.mark.parametrize("dtype, capability", [("fp16", 90), ("fp32", 80)])
def test_kernel_compiles_to_ptx_that_tensorrt_can_launch(dtype, capability):
    """TensorRT passes (inputs, scalars, outputs): 8 parameters; Triton's 2 scratch pointers follow
    and must never be read."""
    pytest.importorskip("triton")
    from turbo.kernels.triton_merge import check_aot_launchable, compile_ptx, unread_parameters

    compiled = compile_ptx(dtype, 768, capability)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{capability}" in ptx and compiled.metadata.name == "turbo_merge_kernel"
    assert unread_parameters(ptx, compiled.metadata.name) == [8, 9]
    check_aot_launchable(compiled)


def test_unread_parameters_sees_every_load():
    from turbo.kernels.triton_merge import unread_parameters

    ptx = (".entry k(\n .param .u64 .ptr .global .align 1 k_param_0,\n .param .u32 k_param_1,\n"
           " .param .u64 k_param_2\n)\n{\n ld.param.b64 %rd1, [k_param_0];\n ld.param.b64 %rd2, [k_param_2];\n}")
    assert unread_parameters(ptx, "k") == [1]
    with pytest.raises(ValueError, match="no .entry"):
        unread_parameters(ptx, "other")


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    types = {v.name: v for v in model.graph.value_info}
    model.graph.output.extend(types[name] for name in names if name not in {o.name for o in model.graph.output})
    return model


@pytest.mark.parametrize("name", ["vit-b16", "blip-caption"])
def test_turbo_merge_nodes_have_the_plugin_interface_and_compute_the_kernel(tmp_path_factory, name):
    """On a real export: every TurboMerge node reads (x, size, index) and writes (x, size) with the
    plugin's shapes, and what ONNX Runtime computes for it is what the Triton kernel computes."""
    result = tiny_export(tmp_path_factory, name, 4)  # shared with test_export
    model = onnx.load(str(result.directory / "model.onnx"))
    nodes = [node for node in model.graph.node if node.op_type == "TurboMerge"]
    types = {v.name: v.type.tensor_type for v in model.graph.value_info}

    def dims(tensor: str) -> list:
        return [d.dim_value or d.dim_param for d in types[tensor].shape.dim]

    assert len(nodes) == 4
    for node in nodes:
        r = next(a.i for a in node.attribute if a.name == "r")
        x, size, index = node.input
        _, tokens, channels = dims(x)
        assert types[index].elem_type == onnx.TensorProto.INT64 and dims(index)[1] == (tokens - 1) // 2 + r
        assert dims(size)[1:] == [tokens, 1]
        assert [dims(out)[1:] for out in node.output] == [[merged_tokens(tokens, r), channels],
                                                          [merged_tokens(tokens, r), 1]]
    pytest.importorskip("triton")
    from turbo.kernels.triton_merge import interpreted_kernel, turbo_merge

    probe = _with_outputs(model, [name for node in nodes for name in [*node.input, *node.output]])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, *result.manifest.onnx.pixel_shape)).astype(np.float32)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": pixels})))
    for node in nodes:
        r = next(a.i for a in node.attribute if a.name == "r")
        got = turbo_merge(*(torch.from_numpy(values[n]) for n in node.input), r, interpreted_kernel())
        np.testing.assert_array_equal(got[1].numpy(), values[node.output[1]])
        np.testing.assert_allclose(got[0].numpy(), values[node.output[0]], atol=1e-5, rtol=1e-5)


def test_the_native_form_equals_the_function_graph_in_ort(tmp_path_factory, tmp_path):
    from turbo.export.tensorrt.engine import inline_merge_functions

    result = tiny_export(tmp_path_factory, "vit-b16", 4)
    native = inline_merge_functions(result.directory / "model.onnx", tmp_path / "native.onnx")
    inlined = onnx.load(str(native))
    assert not inlined.functions and not any(n.op_type == "TurboMerge" for n in inlined.graph.node)
    pixels = np.random.default_rng(1).standard_normal((3, *result.manifest.onnx.pixel_shape)).astype(np.float32)
    want = ort.InferenceSession(str(result.directory / "model.onnx")).run(None, {"pixel_values": pixels})
    got = ort.InferenceSession(str(native)).run(None, {"pixel_values": pixels})
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_builder_flags_per_version_and_precision():
    plan = builder_plan((10, 8), "fp16", "fp16", None, "plugin")
    assert not plan.strongly_typed and plan.builder_flags == ("FP16",) and plan.network_flags == ()
    assert builder_plan((10, 13), "bf16", "fp32", None, "plugin").network_flags == ("PREFER_AOT_PYTHON_PLUGINS",)
    assert builder_plan((10, 13), "bf16", "fp32", None, "native").builder_flags == ("BF16",)
    assert builder_plan((10, 8), "bf16", "fp32", None, "native").builder_flags == ("BF16",)
    assert builder_plan((10, 13), "int8", "fp32", "int8", "native").builder_flags == ("INT8", "FP16")
    assert builder_plan((10, 13), "fp32", "fp32", "int8", "native").builder_flags == ("INT8", "FP16")
    eleven = builder_plan((11, 4), "fp16", "fp16", None, "plugin")
    assert eleven.strongly_typed and eleven.builder_flags == () and "fp16 ONNX" in eleven.note
    assert builder_plan((11, 0), "int8", "fp32", "int8", "native").note == "strongly typed (int8 ONNX)"
    for version, precision, onnx_precision, quant, message in [
        ((11, 4), "fp16", "fp32", None, "strongly typed"),
        ((11, 4), "bf16", "fp32", None, "bf16 needs TensorRT 10"),
        ((10, 13), "int8", "fp32", None, "needs --quant int8"),
        ((10, 13), "fp16", "fp32", "int8", "--quant int8 builds an INT8 engine"),
        ((10, 13), "fp32", "fp16", None, "fp32 engine needs an fp32 export"),
        ((9, 3), "fp32", "fp32", None, "too old"),
        ((10, 13), "tf32", "fp32", None, "unknown TensorRT precision"),
        ((10, 8), "bf16", "fp32", None, "cannot hand bf16 tensors"),  # tensorrt.plugin's JIT tensors have no bf16
    ]:
        with pytest.raises(UsageError, match=message):
            builder_plan(version, precision, onnx_precision, quant, "plugin")


def test_batch_profiles():
    assert batch_profile("dynamic", None, None, None) == BatchProfile(1, 8, 64)
    assert batch_profile("dynamic", None, None, 4) == BatchProfile(1, 4, 4)
    assert batch_profile("dynamic", 16, None, None) == BatchProfile(16, 16, 64)
    assert batch_profile("dynamic", None, 128, None) == BatchProfile(1, 128, 128)
    assert batch_profile(4, None, None, None) == BatchProfile(4, 4, 4)
    assert profile_shapes({"pixel_values": ["batch", 3, 224, 224]}, {"batch": (1, 8, 64)}) == {
        "pixel_values": ((1, 3, 224, 224), (8, 3, 224, 224), (64, 3, 224, 224))}
    with pytest.raises(ValueError, match="past"):
        profile_shapes({"k": ["batch", 4, "past", 8]}, {"batch": (1, 8, 64)})
    for args, message in [((4, None, None, 8), "static batch of 4"), (("dynamic", 8, None, 4), "min <= opt <= max"),
                          (("dynamic", 0, None, None), "positive")]:
        with pytest.raises(UsageError, match=message):
            batch_profile(*args)


def test_plugin_rules():
    assert [plugin_mode(v) for v in [(10, 6), (10, 8), (10, 9), (11, 0)]] == ["jit", "jit", "aot", "aot"]
    with pytest.raises(UsageError, match="--trt-merge native"):
        plugin_mode((10, 5))
    assert merged_tokens(197, 16) == 181
    positions = [p.split("|") for p in plugin_type_combinations().split(", ")]
    assert len(positions) == 5 and all(len(p) == 3 for p in positions)  # x, size, index -> x, size
    assert positions[0] == positions[1] == positions[3] == positions[4] == ["FP32", "FP16", "BF16"]
    assert set(positions[2]) == {"INT64"}
    h100, a100 = timing_cache_name("10.13.2", "NVIDIA H100", (9, 0)), timing_cache_name("10.13.2", "A100", (8, 0))
    assert h100 != a100 and h100 == timing_cache_name("10.13.2", "NVIDIA H100", (9, 0)) and "sm90" in h100


def _decorated(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """plugin.py's functions by their tensorrt.plugin decorator (register, autotune, impl, aot_impl)."""
    return {decorator.func.attr: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for decorator in node.decorator_list if isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Attribute) and ast.unparse(decorator.func.value) == "trtp"}


def test_plugin_functions_follow_the_tensorrt_plugin_schema():
    """tensorrt.plugin checks each decorated function when plugin.py registers them (its _validate.py,
    read for TensorRT 10.x): argument order per role, annotated returns. The same rules, without it."""
    tree = ast.parse((Path(__file__).parents[2] / "turbo/export/tensorrt/plugin.py").read_text())
    functions = _decorated(tree)
    assert set(functions) == {"register", "autotune", "impl", "aot_impl"}

    def names(role: str) -> list[str]:
        return [a.arg for a in functions[role].args.args]

    register = functions["register"].args.args
    tensors = [a.arg for a in register if ast.unparse(a.annotation) == "trtp.TensorDesc"]
    attributes = [a.arg for a in register if ast.unparse(a.annotation) in ("int", "float", "str", "bool", "bytes")]
    assert names("register") == tensors + attributes and tensors and attributes  # tensors first, then attributes
    assert ast.unparse(functions["register"].returns) == "Tuple[trtp.TensorDesc, trtp.TensorDesc]"
    assert names("impl") == tensors + attributes + ["outputs", "stream"]
    assert names("aot_impl") == tensors + attributes + ["outputs", "tactic"]
    assert names("autotune")[:len(tensors)] == tensors and names("autotune")[-1] == "outputs"
    assert set(names("autotune")[len(tensors):-1]) <= set(attributes)
    aot_returns = functions["aot_impl"].returns  # mandatory: (kernel name, PTX, launch params, scalar args)
    assert isinstance(aot_returns, ast.Subscript) and ast.unparse(aot_returns.value) in ("Tuple", "tuple")
    assert [ast.unparse(e) for e in aot_returns.slice.elts][2:] == ["trtp.KernelLaunchParams", "trtp.SymIntExprs"]
    autotune_returns = functions["autotune"].returns  # optional, but a bare `list` is refused
    assert autotune_returns is None or ast.unparse(autotune_returns) in (
        "List[trtp.AutoTuneCombination]", "list[trtp.AutoTuneCombination]", "trtp.AutoTuneCombination")


class RecordingRunner:
    """Wraps a runner and records every input shape it is fed."""

    def __init__(self, runner) -> None:
        self.runner, self.shapes = runner, []

    def run(self, feeds: dict) -> dict:
        self.shapes.append({name: tuple(np.shape(value)) for name, value in feeds.items()})
        return self.runner.run(feeds)


def test_decoder_engine_profiles_cover_every_shape_captioning_feeds(tmp_path_factory):
    """On a real captioning export: the decoder engines' profiles, built from the ONNX graphs'
    dynamic dims, contain every input shape that greedy and beam captioning feed the decoder graphs,
    and the decoder graphs pass the TensorRT lint."""
    from turbo.export.tensorrt.stage import decoder_engine_plan
    from turbo.graph.trt_lint import lint
    from turbo.runtimes.caption import CaptionPipeline

    result = tiny_export(tmp_path_factory, "blip-caption", 4, decoder=True)  # shared with test_export
    directory, decoder = result.directory, result.manifest.decoder
    pipeline = CaptionPipeline.open(directory)
    plan = decoder_engine_plan(decoder, BatchProfile(1, 2, 6), pipeline)
    assert plan["built"], plan
    profiles = {key: profile_shapes(onnx_input_dims(directory / getattr(decoder, key)), plan["ranges"])
                for key in ("first_step", "with_past")}
    prompt = len(pipeline.prompt_ids(decoder.prompt))
    assert profiles["first_step"]["input_ids"] == ((1, 1), (2, prompt), (6, MAX_PROMPT_TOKENS))
    assert {s[1] for s in profiles["first_step"]["image_embeds"]} == {decoder.image_tokens}
    first, with_past = RecordingRunner(pipeline.decoder.first), RecordingRunner(pipeline.decoder.with_past)
    pipeline.decoder.first, pipeline.decoder.with_past = first, with_past
    shape, longest = result.manifest.onnx.pixel_shape, pipeline.settings.max_new_tokens
    pixels = np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)
    pipeline.caption(pixels, batch=6, min_new_tokens=longest)  # greedy, the generation config's full length
    pipeline.caption(pixels[:2], batch=2, num_beams=3)  # 6 rows
    pipeline.caption(pixels[:1], prompt="", batch=1)  # the shortest prompt: past starts at 1
    for key, recorder in (("first_step", first), ("with_past", with_past)):
        assert recorder.shapes
        for fed in recorder.shapes:
            for name, shape in fed.items():
                low, _, high = profiles[key][name]
                assert all(a <= s <= b for a, s, b in zip(low, shape, high)), (key, name, shape, low, high)
    assert max(fed["past.0.self.key"][2] for fed in with_past.shapes) == prompt + longest - 2  # all tokens made
    for key in ("first_step", "with_past"):
        assert not [f for f in lint(directory / getattr(decoder, key)) if f.severity == "error"]
    quantized = decoder_engine_plan(replace(decoder, precision="fp32 with quantized weights"), BatchProfile(1, 2, 6),
                                    pipeline)
    assert not quantized["built"] and "quantized" in quantized["reason"]
    plan = decoder_builder_plan((10, 13))
    assert plan.cleared_flags == ("TF32",) and not plan.builder_flags and not plan.strongly_typed
    assert decoder_builder_plan((11, 0)).strongly_typed


runner = CliRunner()


@pytest.mark.skipif(tensorrt_reason() is None,
                    reason="TensorRT and a GPU are here: the engine is built (see the tensorrt-marked test)")
def test_trt_without_tensorrt_writes_the_validated_onnx_then_exits_4(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "-m", str(model_dir(tmp_path)), "--r", "4", "--random-weights", "-o",
                                 str(out), "--trt", "--max-batch", "16"])
    assert result.exit_code == 4, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no TensorRT engine: TensorRT is not installed") and "pypi.nvidia.com" in last
    manifest = json.loads((out / "turbo.json").read_text())
    assert manifest["status"] == "passed" and manifest["onnx"]["precision"] == "fp32"
    assert manifest["tensorrt"]["built"] is False and not (out / "model.plan").exists()


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "needs --quant int8"),
    (["--batch", "4", "--max-batch", "8"], "static batch of 4"),
    (["--trt-merge", "fused"], "unknown --trt-merge"),
    (["--workspace", "0"], "--workspace"),
])
def test_bad_trt_options_exit_2_before_writing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "-m", str(model_dir(tmp_path)), "--random-weights", "-o", str(out),
                                 "--trt", *args])
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_profile_flags_need_trt(tmp_path):
    result = runner.invoke(app, ["export", "-m", str(model_dir(tmp_path)), "--random-weights", "-o",
                                 str(tmp_path / "out"), "--max-batch", "8"])
    assert result.exit_code == 2 and "belong to --trt" in result.output


@pytest.mark.tensorrt
@pytest.mark.parametrize("merge", ["plugin", "native"])
def test_engine_builds_and_matches_onnx_runtime(tmp_path, merge):
    from turbo.export.options import ExportOptions
    from turbo.export.pipeline import run_export
    from turbo.export.tensorrt.stage import TrtOptions

    result = run_export(ExportOptions(model="vit-b16", r=4, threshold=0, tiny=True, random_weights=True,
                                      trt=TrtOptions("fp32", merge=merge, max_batch=4)), tmp_path / "out")
    engine = result.manifest.tensorrt.to_dict()
    assert engine["built"] and (tmp_path / "out" / "model.plan").stat().st_size > 0
    assert result.engine_report is not None and result.engine_report.passed, engine["validation"]
    assert engine["merge"] == merge and (tmp_path / "out" / engine["build_log"]).exists()


@pytest.mark.tensorrt
def test_caption_engines_build_and_caption_like_onnx_runtime(tmp_path):
    from turbo.export.options import ExportOptions
    from turbo.export.pipeline import run_export
    from turbo.export.tensorrt.stage import TrtOptions
    from turbo.runtimes.caption import CaptionPipeline

    out = tmp_path / "out"
    result = run_export(ExportOptions(model="blip-caption", r=4, threshold=0, tiny=True, random_weights=True,
                                      trt=TrtOptions("fp32", max_batch=4)), out)
    decoder = result.manifest.tensorrt.decoder
    assert decoder["built"] and all((out / e["file"]).stat().st_size > 0 for e in decoder["engines"].values())
    assert result.engine_report.passed, result.manifest.tensorrt.build["validation"]
    assert any(c.run == "greedy, tensorrt vs onnx" for c in result.engine_report.captions)
    shape = result.manifest.onnx.pixel_shape
    captions = CaptionPipeline.open(out, tensorrt=True).caption(np.zeros((2, *shape), np.float32))
    assert len(captions) == 2 and all(c["ids"] for c in captions)
