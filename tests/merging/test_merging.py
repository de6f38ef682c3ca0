"""The merge step against an independent ToMe reference, fusion rules, kernels and shapes."""

import math
from unittest import mock

import pytest
import torch

from turbo.merging.attention import proportional_attention
from turbo.merging.matching import ALPHA_SCALE, MergeConfig, information_degree, select_merges
from turbo.merging.merge import gather_tokens, merge_tokens, pack_indices
from turbo.merging.module import TokenMerge


def tome_reference(metric, x, size, r):
    """ToMe's bipartite soft matching + merge_wavg with a class token, written out as in
    facebookresearch/ToMe (argsort, scatter_reduce), independent of the project's code."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged_x, merged_size = merge(x * size), merge(size)
    return merged_x / merged_size, merged_size


def random_inputs(batch=3, tokens=37, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g)
    metric = torch.randn(batch, tokens, 8, generator=g)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float()
    cls_attn = torch.rand(batch, tokens, generator=g).softmax(-1)
    return x, metric, size, cls_attn


@pytest.mark.parametrize("kernel", ["matmul", "scatter"])
@pytest.mark.parametrize("r", [1, 7, 18])
def test_tome_equals_reference(kernel, r):
    x, metric, size, cls_attn = random_inputs()
    ours_x, ours_size = TokenMerge(r, MergeConfig("tome"), kernel)(x, size, metric, cls_attn)
    ref_x, ref_size = tome_reference(metric, x, size, r)
    torch.testing.assert_close(ours_size, ref_size, rtol=0, atol=0)
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-6, atol=1e-6)


def test_turbo_alpha_zero_equals_tome():
    x, metric, size, cls_attn = random_inputs(seed=1)
    turbo = TokenMerge(9, MergeConfig("turbo", alpha=0.0))(x, size, metric, cls_attn)
    tome = TokenMerge(9, MergeConfig("tome"))(x, size, metric, cls_attn)
    torch.testing.assert_close(turbo, tome, rtol=0, atol=0)


def test_s1_uses_authors_alpha_scale_and_s2_differs():
    x, metric, size, cls_attn = random_inputs(seed=2)
    redundancy, _ = information_degree(metric, cls_attn, MergeConfig("tome"))
    s1, _ = information_degree(metric, cls_attn, MergeConfig("turbo", alpha=5.0, fusion="s1"))
    s2, _ = information_degree(metric, cls_attn, MergeConfig("turbo", alpha=5.0, fusion="s2"))
    torch.testing.assert_close(s1, redundancy - 5.0 * ALPHA_SCALE * cls_attn[:, 2::2])
    torch.testing.assert_close(s2, redundancy / cls_attn[:, 2::2])
    merged_s1 = TokenMerge(9, MergeConfig("turbo", 5.0, "s1"))(x, size, metric, cls_attn)[0]
    merged_s2 = TokenMerge(9, MergeConfig("turbo", 5.0, "s2"))(x, size, metric, cls_attn)[0]
    assert not torch.allclose(merged_s1, merged_s2)


def test_semantic_merges_the_least_attended_tokens():
    x, metric, size, cls_attn = random_inputs(seed=3)
    degree, best = information_degree(metric, cls_attn, MergeConfig("semantic"))
    src_idx, _, _ = select_merges(degree, best, 5)
    lowest = cls_attn[:, 2::2].topk(5, largest=False).indices
    assert torch.equal(src_idx.sort(-1).values, lowest.sort(-1).values)


def test_unmerged_tokens_keep_their_order_and_sizes_add_up():
    x, metric, size, cls_attn = random_inputs(seed=4)
    degree, best = information_degree(metric, cls_attn, MergeConfig("turbo"))
    src_idx, dst_idx, unm_idx = select_merges(degree, best, 6)
    assert torch.all(unm_idx[:, 1:] > unm_idx[:, :-1])
    assert set(src_idx[0].tolist()).isdisjoint(unm_idx[0].tolist())
    assert len(set(src_idx[0].tolist()) | set(unm_idx[0].tolist())) == degree.shape[1]
    merged_x, merged_size = merge_tokens(x, size, pack_indices(src_idx, dst_idx, unm_idx))
    assert merged_x.shape == (3, 37 - 6, 16)
    torch.testing.assert_close(merged_size.sum(dim=(1, 2)), size.sum(dim=(1, 2)))
    torch.testing.assert_close(merged_x[:, 0], x[:, 0])  # CLS is protected and first


@pytest.mark.parametrize("kernel", ["matmul", "scatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,r", [(3, 37, 1), (2, 38, 7), (4, 101, 30), (2, 21, 10)])
def test_eager_form_equals_the_exported_form(kernel, dtype, batch, tokens, r):
    """Eager PyTorch runs merge_tokens_eager and a sort; exports trace merge_tokens_graph and a
    float TopK. Same token choice and order, sizes exact, values to a rounding of the dtype (the
    eager form rounds b·size + Σ src·size once, the exported form twice)."""
    x, metric, size, cls_attn = random_inputs(batch, tokens, seed=tokens + r)
    x, size = x.to(dtype), size.to(dtype)
    merge = TokenMerge(r, MergeConfig("turbo", alpha=1.0), kernel)
    eager = merge(x, size, metric, cls_attn)
    with mock.patch("torch.compiler.is_exporting", return_value=True):
        graph = merge(x, size, metric, cls_attn)
    assert torch.equal(eager[1], graph[1])
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(eager[0], graph[0], rtol=tolerance, atol=tolerance)


def test_kernels_agree():
    x, metric, size, cls_attn = random_inputs(batch=4, tokens=101, seed=5)
    config = MergeConfig("turbo", alpha=1.0)
    a = TokenMerge(30, config, "matmul")(x, size, metric, cls_attn)
    b = TokenMerge(30, config, "scatter")(x, size, metric, cls_attn)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_r_beyond_cap_is_an_error():
    x, metric, size, cls_attn = random_inputs(tokens=9)
    with pytest.raises(ValueError, match="outside 0..4"):
        TokenMerge(5, MergeConfig())(x, size, metric, cls_attn)


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_matches_explicit_softmax(fused):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g) for _ in range(3))
    size = torch.randint(1, 5, (2, 11, 1), generator=g).float()
    context, cls_attn = proportional_attention(q, k, v, size, scale=0.5, fused=fused)
    attn = (q @ k.transpose(-1, -2) * 0.5 + size.log()[:, None, None, :, 0]).softmax(-1)
    torch.testing.assert_close(context, (attn @ v).transpose(1, 2).reshape(2, 11, 12), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_attn, attn[:, :, 0].mean(1), rtol=1e-5, atol=1e-7)


def test_gather_tokens_takes_each_batch_rows_own_tokens():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 11, 5, generator=g)
    index = torch.randint(0, 11, (3, 4, 1), generator=g)
    want = torch.stack([x[b, index[b, :, 0]] for b in range(3)])  # (3, 4, 5)
    assert torch.equal(gather_tokens(x, index), want)
    assert torch.equal(torch.ops.turbo.gather_tokens(x, index), want)  # the op the exporter translates

