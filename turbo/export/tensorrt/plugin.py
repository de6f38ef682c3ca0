"""The `turbo::TurboMerge` TensorRT plugin (tensorrt.plugin); importing this module registers it.

Shapes: x (B, N, C), size (B, N, 1), index (B, Na + r) int64 -> x (B, N - r, C), size
(B, N - r, 1). The implementation is the Triton kernel in turbo/kernels/triton_merge.py: from TensorRT 10.9
compiled ahead of time to PTX that the engine carries (it runs in trtexec or C++ without Python);
on 10.6-10.8 a JIT implementation launches it from Python instead. Written against the documented
tensorrt.plugin API; not run here (no TensorRT on our machines).
"""

from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from turbo.export.tensorrt.settings import AOT_VERSION, merged_tokens, parse_version, plugin_type_combinations
from turbo.kernels import triton_merge as merge_kernel

PLUGIN_ID = "turbo::TurboMerge"
TRITON_DTYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}


@trtp.register(PLUGIN_ID)
def turbo_merge_description(x: trtp.TensorDesc, size: trtp.TensorDesc, index: trtp.TensorDesc, r: int,
                            kernel: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    merged_x, merged_size = x.like(), size.like()
    merged_x.shape_expr[1] = merged_tokens(x.shape_expr[1], r)
    merged_size.shape_expr[1] = merged_tokens(size.shape_expr[1], r)
    return merged_x, merged_size


@trtp.autotune(PLUGIN_ID)
def turbo_merge_autotune(x: trtp.TensorDesc, size: trtp.TensorDesc, index: trtp.TensorDesc,
                         outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(plugin_type_combinations(), "LINEAR")]


@trtp.impl(PLUGIN_ID)
def turbo_merge_jit(x: trtp.Tensor, size: trtp.Tensor, index: trtp.Tensor, r: int, kernel: str,
                    outputs: Tuple[trtp.Tensor], stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        merge_kernel.launch(*(torch.as_tensor(t, device="cuda") for t in (x, size, index)), r,
                            *(torch.as_tensor(t, device="cuda") for t in outputs))


if parse_version(trt.__version__) >= AOT_VERSION:
    @trtp.aot_impl(PLUGIN_ID)
    def turbo_merge_aot(x: trtp.TensorDesc, size: trtp.TensorDesc, index: trtp.TensorDesc, r: int, kernel: str,
                        outputs: Tuple[trtp.TensorDesc], tactic: int
                        ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        channels = x.shape_expr[2]
        if not channels.is_constant:
            raise ValueError("TurboMerge needs a static channel dimension")
        compiled = merge_kernel.compile_ptx(TRITON_DTYPES[x.dtype], channels.constant_value(),
                                            int("".join(map(str, torch.cuda.get_device_capability()))))
        merge_kernel.check_aot_launchable(compiled)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = outputs[0].shape_expr[1]  # one program per output token ...
        launch.grid_y = x.shape_expr[0]  # ... and batch row
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (x.shape_expr[1], channels, r)])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, scalars
