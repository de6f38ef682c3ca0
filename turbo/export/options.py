"""`turbo export`'s options, and each stage's part of them."""

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from turbo.core.files import IMAGE_FEATURES
from turbo.core.manifest import Manifest, OutputTokens, QuantizationRecord
from turbo.export.onnx_export import DEFAULT_OPSET
from turbo.export.quant_export import QuantOptions
from turbo.export.tensorrt.stage import TrtOptions
from turbo.graph.weight_quant import MIN_OPSET as QUANT_OPSET
from turbo.merging.llm_drop import LlmDropConfig, parse_llm_drop
from turbo.models.build import BuiltPlan, build_plan

Stage = Callable[[str], AbstractContextManager]


@dataclass
class ExportOptions:
    model: str = "blip-caption"
    r: int | None = None  # None: the model's default
    method: str | None = None  # None: the model's default (turbo; tome without a CLS token)
    alpha: float | None = None
    threshold: int | None = None
    schedule: str = "constant"
    fusion: str = "s1"
    kernel: str = "matmul"
    opset: int | None = None  # None: 20, or 21 with quant (blocked DequantizeLinear)
    batch: int | None = None  # None: dynamic batch axis
    image_size: int | tuple[int, int] | None = None  # (height, width); None: the model's input size
    precision: str | None = None  # None: fp32, or the ONNX a `trt` engine is built from
    random_weights: bool = False
    validate: bool = True
    seed: int = 0
    external_data: bool | None = None  # None: only for weights of 1 GiB or more
    tiny: bool = False  # the registry's 4-layer tiny variant (tests, CI smoke checks)
    r_auto: dict | None = None  # how `--r auto` chose r (recorded in the manifest)
    merge_auto: dict | None = None  # how `--method auto` / `--alpha auto` chose the merge (recorded in the manifest)
    merge_op: str = "function"  # one turbo::TurboMerge function node per merge block, or "inline" plain ops
    quant: str | None = None  # weight-only: gptq-int4 | gptq-int8 | rtn-int4
    group_size: int = 128
    act_order: bool = False
    calib: str | None = None  # image folder, HF datasets directory, or "synthetic" (smoke tests)
    calib_size: int = 128
    calib_seed: int = 0
    calib_images: str | None = None  # image root of a COCO-format --calib file (default: the file's folder)
    quant_heads: bool = False  # also the classifier (ViT) and the LM head (BLIP), excluded by default
    decoder: bool = True  # captioning models and VLMs: also the text side (False: the vision encoder only)
    llm_drop: str = "none"  # LLM-based VLMs: the image-token reduction inside the language model
    trt: TrtOptions | None = None  # also build a TensorRT engine (model.plan) from the validated ONNX

    def __post_init__(self) -> None:
        if self.opset is None:
            self.opset = QUANT_OPSET if self.quant else DEFAULT_OPSET
        if self.precision is None:
            self.precision = self.trt.onnx_precision() if self.trt is not None else "fp32"

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ExportOptions":
        """The options an export was made with, read back from its turbo.json."""
        model, turbo, onnx_info = manifest.model, manifest.turbo, manifest.onnx
        schedule = turbo.schedule
        return cls(
            model=model.name, r=turbo.r_requested, method=turbo.method, alpha=turbo.alpha,
            threshold=turbo.threshold, fusion=turbo.fusion, kernel=turbo.merge_kernel,
            schedule=",".join(map(str, schedule)) if isinstance(schedule, list) else schedule,
            opset=onnx_info.opset, batch=onnx_info.static_batch, image_size=onnx_info.image_size,
            precision=onnx_info.precision, random_weights=model.random_weights,
            seed=model.seed if model.seed is not None else 0, tiny=model.tiny, merge_op=onnx_info.merge_op,
            **_quant_options(manifest.quantization), decoder=manifest.decoder is not None or manifest.llm is not None,
            llm_drop=manifest.llm.llm_drop if manifest.llm else "none",
        )

    def quantization(self) -> QuantOptions | None:
        """The quantization stage's part of these options (None without --quant)."""
        if self.quant is None:
            return None
        return QuantOptions(self.quant, self.calib, self.group_size, self.act_order, self.calib_size, self.calib_seed,
                            self.calib_images, self.quant_heads, language_model=self.decoder)

    def llm_drop_config(self) -> LlmDropConfig:
        return parse_llm_drop(self.llm_drop)

    def output_tokens(self, built: BuiltPlan) -> OutputTokens:
        """What each token output of the vision graph holds: the family's counts; the image
        features' count is decided per image where MustDrop's spatial merge runs."""
        tokens = built.source.adapter.output_tokens(built.source.config)
        return replace(tokens, decided=(IMAGE_FEATURES,) if self.llm_drop_config().spatial_merge() else ())

    def plan(self) -> BuiltPlan:
        return build_plan(self.model, self.r, self.method, self.alpha, self.schedule, self.threshold, self.fusion,
                          self.tiny, self.image_size)


def _quant_options(quantization: QuantizationRecord | None) -> dict:
    if quantization is None:
        return {}
    calibration = quantization.calibration
    group = {"group_size": quantization.group_size} if quantization.group_size is not None else {}  # INT8: none
    return {"quant": quantization.mode, **group, "act_order": quantization.act_order, "calib": calibration.source,
            "calib_size": calibration.count, "calib_seed": calibration.seed, "calib_images": calibration.images,
            "quant_heads": quantization.heads}


@contextlib.contextmanager
def no_stage(name: str) -> Iterator[None]:
    """A `Stage` that only runs the stage (the CLI's shows progress)."""
    yield
