"""The TurboMerge kernel in Triton: the gather of kept tokens and the size-weighted merge.

Inputs are the TurboMerge node's: x (B, N, C), size (B, N, 1) and the packed int64 index
(B, Na + r) = [src_idx (r), dst_idx (r), unm_idx (Na - r)] from the native TopKs in front.
One program per (output token, batch row) writes one row of x (B, N - r, C) and size
(B, N - r, 1) in the reference order [CLS, unmerged A, B]. A B-side row scans the r merges for
those that land on it (no atomics: deterministic), accumulating in fp32.

The kernel arguments are ordered as TensorRT's AOT plugins launch them: inputs, scalar
arguments, outputs.
"""

import re

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

HIDDEN_PARAMS = 2  # Triton appends global and profile scratch pointers to every kernel it compiles


@triton.jit
def turbo_merge_kernel(x_ptr, size_ptr, index_ptr, tokens, channels, r, out_x_ptr, out_size_ptr,
                       BLOCK_C: tl.constexpr):
    t = tl.program_id(0)  # output token
    b = tl.program_id(1).to(tl.int64)  # batch row
    num_a = (tokens - 1) // 2
    kept = num_a - r
    index_row = index_ptr + b * (num_a + r)
    x_row = x_ptr + b * tokens * channels
    size_row = size_ptr + b * tokens
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < channels
    if t <= kept:  # CLS (t = 0) or the (t-1)-th unmerged A-side token: copied
        a_index = tl.load(index_row + 2 * r + t - 1, mask=t > 0, other=-1)
        token = 2 * a_index + 2
        value = tl.load(x_row + token * channels + cols, mask=in_row).to(tl.float32)
        weight = tl.load(size_row + token).to(tl.float32)
    else:  # B-side token j (position 2j + 1) and every A-side token merged into it
        j = t - kept - 1
        token = 2 * j.to(tl.int64) + 1
        weight = tl.load(size_row + token).to(tl.float32)
        total = tl.load(x_row + token * channels + cols, mask=in_row).to(tl.float32) * weight
        for i in range(r):
            if tl.load(index_row + r + i) == j:
                source = 2 * tl.load(index_row + i) + 2
                source_weight = tl.load(size_row + source).to(tl.float32)
                total += tl.load(x_row + source * channels + cols, mask=in_row).to(tl.float32) * source_weight
                weight += source_weight
        value = total / weight
    out_row = b * (tokens - r) + t
    tl.store(out_x_ptr + out_row * channels + cols, value.to(out_x_ptr.dtype.element_ty), mask=in_row)
    tl.store(out_size_ptr + out_row, weight.to(out_size_ptr.dtype.element_ty))


def block_channels(channels: int) -> int:
    """The constexpr BLOCK_C: channels rounded up to a power of two."""
    return triton.next_power_of_2(channels)


def launch_grid(batch: int, tokens: int, r: int) -> tuple[int, int]:
    """(output tokens, batch rows): one program per output row."""
    return tokens - r, batch


def launch(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, r: int, out_x: torch.Tensor,
           out_size: torch.Tensor, kernel=turbo_merge_kernel) -> None:
    """Write the merge of contiguous x (B, N, C), size (B, N, 1), index (B, Na + r) into out_x
    (B, N - r, C) and out_size (B, N - r, 1); allocates nothing (a plugin's enqueue may not)."""
    batch, tokens, channels = x.shape
    kernel[launch_grid(batch, tokens, r)](x, size, index, tokens, channels, r, out_x, out_size,
                                          BLOCK_C=block_channels(channels))


def turbo_merge(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, r: int,
                kernel=turbo_merge_kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on torch tensors (CUDA, or CPU with Triton's interpreter as `kernel`)."""
    batch, tokens, channels = x.shape
    out_x = x.new_empty(batch, tokens - r, channels)
    out_size = size.new_empty(batch, tokens - r, 1)
    launch(x.contiguous(), size.contiguous(), index.contiguous(), r, out_x, out_size, kernel)
    return out_x, out_size


def interpreted_kernel():
    """The same kernel source under Triton's CPU interpreter (checks without a GPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(turbo_merge_kernel.fn)


def signature(dtype: str) -> dict[str, str]:
    """Argument types for AOT compilation; dtype is fp32, fp16 or bf16 (x, size and outputs)."""
    return {"x_ptr": f"*{dtype}", "size_ptr": f"*{dtype}", "index_ptr": "*i64", "tokens": "i32", "channels": "i32",
            "r": "i32", "out_x_ptr": f"*{dtype}", "out_size_ptr": f"*{dtype}", "BLOCK_C": "constexpr"}


def compile_ptx(dtype: str, channels: int, capability: int) -> triton.compiler.CompiledKernel:
    """Compile to PTX for compute capability `capability` (e.g. 90); needs no GPU."""
    source = triton.compiler.ASTSource(fn=turbo_merge_kernel, signature=signature(dtype),
                                       constexprs={"BLOCK_C": block_channels(channels)})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


def unread_parameters(ptx: str, name: str) -> list[int]:
    """Indices of the entry's parameters that the PTX never loads."""
    entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError(f"no .entry {name} in the PTX")
    count = len(re.findall(r"\.param\s", entry.group(1)))
    return [i for i in range(count) if not re.search(rf"ld\.param[.\w]*\s+[^,]+,\s*\[{re.escape(name)}_param_{i}\]",
                                                       ptx)]


def check_aot_launchable(compiled: triton.compiler.CompiledKernel) -> None:
    """TensorRT launches an AOT kernel with (inputs, scalars, outputs) only, without the scratch
    pointers Triton appends; that is safe only when the kernel never reads them."""
    metadata = compiled.metadata
    user_params = len(signature("fp32")) - 1  # less the constexpr
    unread = unread_parameters(compiled.asm["ptx"], metadata.name)
    hidden = list(range(user_params, user_params + HIDDEN_PARAMS))
    if metadata.global_scratch_size or metadata.profile_scratch_size or not set(hidden) <= set(unread):
        raise RuntimeError("the compiled TurboMerge kernel uses Triton's scratch memory, which TensorRT's AOT "
                           "launch does not pass; pin a Triton version whose kernel does not")
