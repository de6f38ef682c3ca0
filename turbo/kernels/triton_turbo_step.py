"""The whole Turbo step of a layer as four Triton kernels for eager PyTorch on CUDA.

The ops form dispatches 34 small ATen ops per layer (the CLS attention row, scores, top-k,
gathers and the weighted merge), most a kernel launch of a few µs of GPU time even at batch 64,
where a late ViT-B layer takes ~0.1 ms. Here the step is four launches, all arithmetic in fp32 whatever the model dtype:
1. `unit_metric_kernel`: head-averaged keys scaled to unit length (B, N, D) and the CLS query's
   logits with +log(size) per head (B, H, N).
2. `degree_kernel`: each A-side token's best B-side match (a tl.dot per block of B-side tokens)
   and its information degree (the CLS row's softmax averaged over heads for the semantic term).
3. `select_kernel`: ranks by degree (ties to the lower index) into the packed index
   [src (r), dst (r), unmerged A-side ascending (Na - r)], exactly as `select_merges` orders it.
4. the TurboMerge plugin's kernel (turbo/kernels/triton_merge.py): gather and weighted merge.
"""

import torch
import triton
import triton.language as tl

from turbo.kernels.triton_merge import launch as launch_merge
from turbo.merging.matching import ALPHA_SCALE, MergeConfig
from turbo.merging.module import FUSED_METHODS, check_step_inputs, fused_step_may_run

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_T, BLOCK_A, BLOCK_B, BLOCK_RANK = 32, 32, 64, 64


@triton.jit
def unit_metric_kernel(keys_ptr, query_ptr, size_ptr, metric_ptr, logits_ptr, key_sb, key_sh, key_sn, query_sb,
                       query_sh, tokens, heads, dim, scale, HAS_SIZE: tl.constexpr, CLS_ROW: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    in_t = t < tokens
    in_d = d < dim
    total = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    log_size = tl.zeros((BLOCK_T,), tl.float32)
    if HAS_SIZE:
        log_size = tl.log(tl.load(size_ptr + b * tokens + t, mask=in_t, other=1).to(tl.float32))
    for h in range(heads):
        k = tl.load(keys_ptr + b * key_sb + h * key_sh + t[:, None] * key_sn + d[None, :],
                    mask=in_t[:, None] & in_d[None, :], other=0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
        total += k
        if CLS_ROW:
            q = tl.load(query_ptr + b * query_sb + h * query_sh + d, mask=in_d, other=0).to(tl.float32)
            logit = tl.sum(k * q[None, :], axis=1) * scale + log_size
            tl.store(logits_ptr + (b * heads + h) * tokens + t, logit, mask=in_t)
    mean = total / heads
    norm = tl.where(in_t, tl.sqrt(tl.sum(mean * mean, axis=1)), 1.0)
    unit = mean / norm[:, None]
    tl.store(metric_ptr + (b * tokens + t[:, None]) * BLOCK_D + d[None, :], unit, mask=in_t[:, None])


@triton.jit
def degree_kernel(metric_ptr, logits_ptr, degree_ptr, best_ptr, tokens, heads, alpha, METHOD: tl.constexpr,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    num_a = (tokens - 1) // 2
    num_b = tokens - 1 - num_a
    i = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = i < num_a
    d = tl.arange(0, BLOCK_D)
    metric = metric_ptr + b * tokens * BLOCK_D
    a = tl.load(metric + (2 * i + 2)[:, None] * BLOCK_D + d[None, :], mask=in_a[:, None], other=0)
    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_j = tl.zeros((BLOCK_A,), tl.int32)
    for j0 in range(0, num_b, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        in_b = j < num_b
        side_b = tl.load(metric + (2 * j + 1)[:, None] * BLOCK_D + d[None, :], mask=in_b[:, None], other=0)
        similarity = tl.dot(a, tl.trans(side_b), input_precision="ieee")  # (BLOCK_A, BLOCK_B)
        similarity = tl.where(in_b[None, :], similarity, float("-inf"))
        block_best, block_j = tl.max(similarity, axis=1, return_indices=True)
        better = block_best > best  # ties keep the earlier block: the lower index, as torch's max
        best = tl.where(better, block_best, best)
        best_j = tl.where(better, block_j + j0, best_j)
    degree = best
    if METHOD != 0:
        semantic = tl.zeros((BLOCK_A,), tl.float32)
        n = tl.arange(0, BLOCK_N)
        for h in range(heads):
            row = logits_ptr + (b * heads + h) * tokens
            logit = tl.load(row + n, mask=n < tokens, other=float("-inf"))
            top = tl.max(logit, axis=0)
            total = tl.sum(tl.exp(logit - top), axis=0)
            semantic += tl.exp(tl.load(row + 2 * i + 2, mask=in_a, other=0) - top) / total
        semantic = semantic / heads
        if METHOD == 1:
            degree = -semantic
        elif METHOD == 2:
            degree = best - alpha * semantic
        else:
            degree = best / tl.maximum(semantic, 1.1754943508222875e-38)
    tl.store(degree_ptr + b * num_a + i, degree, mask=in_a)
    tl.store(best_ptr + b * num_a + i, best_j, mask=in_a)


@triton.jit
def select_kernel(degree_ptr, best_ptr, index_ptr, num_a, r, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    degree = degree_ptr + b * num_a
    index = index_ptr + b * (num_a + r)
    kept_before = tl.sum(tl.zeros((BLOCK,), tl.int32), axis=0)
    for i0 in range(0, num_a, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        in_i = i < num_a
        degree_i = tl.load(degree + i, mask=in_i, other=0)
        rank = tl.zeros((BLOCK,), tl.int32)
        for j0 in range(0, num_a, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            degree_j = tl.load(degree + j, mask=j < num_a, other=0)
            ahead = (degree_j[None, :] > degree_i[:, None]) | ((degree_j[None, :] == degree_i[:, None])
                                                              & (j[None, :] < i[:, None]))
            rank += tl.sum((ahead & (j < num_a)[None, :]).to(tl.int32), axis=1)
        merged = in_i & (rank < r)
        tl.store(index + rank, i.to(tl.int64), mask=merged)
        tl.store(index + r + rank, tl.load(best_ptr + b * num_a + i, mask=merged, other=0).to(tl.int64), mask=merged)
        kept = (in_i & (rank >= r)).to(tl.int32)
        tl.store(index + 2 * r + kept_before + tl.cumsum(kept, axis=0) - 1, i.to(tl.int64), mask=kept > 0)
        kept_before += tl.sum(kept, axis=0)


class TritonTurboStep:
    """TokenMerge.forward plus the CLS attention row it reads, as four kernel launches (a FusedStep).

    device_type "cpu" is for Triton's interpreter only (TRITON_INTERPRET=1 set before triton is
    imported): the same kernels on CPU tensors, the checks without a GPU."""

    def __init__(self, device_type: str = "cuda") -> None:
        self.device_type = device_type

    def accepts(self, x: torch.Tensor, config: MergeConfig) -> bool:
        return x.device.type == self.device_type and x.dtype in DTYPES and fused_step_may_run(x, config)

    def __call__(self, x: torch.Tensor, size: torch.Tensor | None, query: torch.Tensor, keys: torch.Tensor, r: int,
                 config: MergeConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C), size (B, N, 1) or None (one patch each), query and keys (B, H, N, d)
        -> x (B, N - r, C), size (B, N - r, 1)."""
        check_step_inputs(x, size, query, keys, r, "Triton Turbo step")
        batch, tokens, channels = x.shape
        heads, dim = keys.shape[1], keys.shape[3]
        num_a = (tokens - 1) // 2
        method = FUSED_METHODS[config.method, config.fusion]
        query, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys))
        block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 or more
        metric = x.new_empty(batch, tokens, block_d, dtype=torch.float32)  # unit metric, zero-padded to block_d
        logits = x.new_empty(batch, heads, tokens, dtype=torch.float32) if method else metric
        unit_metric_kernel[batch, triton.cdiv(tokens, BLOCK_T)](
            keys, query, keys if size is None else size, metric, logits, keys.stride(0), keys.stride(1),
            keys.stride(2), query.stride(0), query.stride(1), tokens, heads, dim, scale, HAS_SIZE=size is not None,
            CLS_ROW=method != 0, BLOCK_T=BLOCK_T, BLOCK_D=block_d)
        degree = x.new_empty(batch, num_a, dtype=torch.float32)
        best = x.new_empty(batch, num_a, dtype=torch.int32)
        degree_kernel[batch, triton.cdiv(num_a, BLOCK_A)](
            metric, logits, degree, best, tokens, heads, ALPHA_SCALE * config.alpha, METHOD=method, BLOCK_A=BLOCK_A,
            BLOCK_B=BLOCK_B, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(tokens))
        index = x.new_empty(batch, num_a + r, dtype=torch.int64)  # [src (r), dst (r), unm (Na - r)]
        select_kernel[(batch,)](degree, best, index, num_a, r, BLOCK=BLOCK_RANK)
        if size is None:
            size = x.new_ones(batch, tokens, 1)
        merged, merged_size = x.new_empty(batch, tokens - r, channels), x.new_empty(batch, tokens - r, 1)
        launch_merge(x.contiguous(), size.contiguous(), index, r, merged, merged_size)
        return merged, merged_size

    def __deepcopy__(self, memo: dict) -> "TritonTurboStep":
        return self  # stateless
