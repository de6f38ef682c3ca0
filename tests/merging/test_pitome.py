"""PiToMe's merge step against a plain per-image reference written from the paper and the authors'
code, its protection of distinctive tokens, and its exported form."""

import pytest
import torch

from turbo.merging.matching import MergeConfig
from turbo.merging.module import TokenMerge
from turbo.merging.pitome import layer_margin, merge_sets, pitome_sets


def pitome_reference(metric, x, size, r, margin):
    """One image at a time, in loops: energy_i = mean_j ELU(cos(i, j) − m) over the mergeable tokens
    (token 0 protected), the 2r highest-energy tokens dealt alternately to A and B by rank, each A
    token merged size-weighted into its most cosine-similar B token. Returns the outputs as the sets
    {position: (x, size)} of kept tokens and of B-side tokens, and token 0."""
    results = []
    for m, xs, ss in zip(metric, x, size):
        unit = m[1:] / m[1:].norm(dim=-1, keepdim=True)
        tokens = len(unit)
        energy = [sum(torch.nn.functional.elu(unit[i] @ unit[j] - margin).item() for j in range(tokens)) / tokens
                  for i in range(tokens)]
        order = sorted(range(tokens), key=lambda i: -energy[i])
        side_a, side_b, kept = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
        sums = {b: (xs[b + 1] * ss[b + 1], ss[b + 1].clone()) for b in side_b}
        for a in side_a:
            best = max(side_b, key=lambda b: (unit[a] @ unit[b]).item())
            sums[best] = (sums[best][0] + xs[a + 1] * ss[a + 1], sums[best][1] + ss[a + 1])
        merged = {b: (total / weight, weight) for b, (total, weight) in sums.items()}
        results.append(({k: (xs[k + 1], ss[k + 1]) for k in kept}, merged, (xs[0], ss[0])))
    return results


def as_sequence(reference):
    """The reference's sets in the order turbo emits: token 0, kept by position, B side by position."""
    xs, sizes = [], []
    for kept, merged, first in reference:
        rows = [first] + [kept[k] for k in sorted(kept)] + [merged[b] for b in sorted(merged)]
        xs.append(torch.stack([row[0] for row in rows]))
        sizes.append(torch.stack([row[1] for row in rows]))
    return torch.stack(xs), torch.stack(sizes)


def random_inputs(batch=2, tokens=25, channels=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, channels, generator=g), torch.randn(batch, tokens, 6, generator=g),
            torch.randint(1, 4, (batch, tokens, 1), generator=g).float())


@pytest.mark.parametrize("kernel", ["matmul", "scatter"])
@pytest.mark.parametrize(("r", "margin"), [(1, 0.9), (5, 0.5), (12, 0.1)])
def test_pitome_equals_reference(kernel, r, margin):
    x, metric, size = random_inputs()
    ours_x, ours_size = TokenMerge(r, MergeConfig("pitome"), kernel, margin)(x, size, metric, None)
    ref_x, ref_size = as_sequence(pitome_reference(metric, x, size, r, margin))
    torch.testing.assert_close(ours_size, ref_size, rtol=0, atol=0)
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-5, atol=1e-5)


def test_distinctive_tokens_are_protected_and_a_cluster_merges():
    """Eight near-copies of one key and eight distinct ones: every merge stays inside the cluster and
    the distinct tokens come out unchanged (a position split would pair some of them)."""
    g = torch.Generator().manual_seed(3)
    distinct = torch.eye(16)[:8] * 4  # orthogonal keys
    cluster = torch.eye(16)[8:9] * 4 + 0.05 * torch.randn(8, 16, generator=g)
    order = torch.randperm(16, generator=g)
    metric = torch.cat([torch.zeros(1, 16), torch.cat([distinct, cluster])[order]]).unsqueeze(0)  # (1, 17, 16)
    x = torch.randn(1, 17, 5, generator=g)
    merged, size = TokenMerge(4, MergeConfig("pitome"), "matmul", 0.5)(x, None, metric, None)
    distinct_positions = sorted(int(i) + 1 for i in (order < 8).nonzero())
    kept = merged[0, 1:1 + 8]  # 16 − 2·4 kept tokens, by position
    torch.testing.assert_close(kept, x[0, distinct_positions])
    assert size[0, :9, 0].tolist() == [1.0] * 9 and size[0, 9:].sum() == 8  # the cluster in 4 tokens


def test_margin_falls_with_depth():
    margins = [layer_margin(i, 12) for i in range(12)]
    assert margins[0] == pytest.approx(0.9) and margins[-1] == pytest.approx(0.9 - 0.8 * 11 / 12)
    assert all(a > b for a, b in zip(margins, margins[1:]))


def test_exported_form_equals_eager(tmp_path):
    """The graph torch.onnx.export records (sorting by TopK) on ONNX Runtime equals the eager step."""
    ort = pytest.importorskip("onnxruntime")

    class Step(torch.nn.Module):
        def forward(self, x, size, metric):
            return merge_sets(x, size, pitome_sets(metric, 6, 0.4), 6)

    x, metric, size = random_inputs(tokens=31, seed=5)
    path = tmp_path / "pitome.onnx"
    torch.onnx.export(Step(), (x, size, metric), str(path), input_names=["x", "size", "metric"], dynamo=True,
                      custom_translation_table=_gather_translation())
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    want = Step()(x, size, metric)
    torch.testing.assert_close(torch.from_numpy(got[1]), want[1], rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-5, atol=1e-5)


def _gather_translation():
    from turbo.export.onnx_export import _gather_tokens_onnx

    return {torch.ops.turbo.gather_tokens.default: _gather_tokens_onnx}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["matmul", "scatter"])
def test_pitome_on_cuda_equals_the_cpu_step(kernel):
    """ViT-B/16's first layer shape at batch 8: the same merges on the GPU (fp32), and fp16 runs."""
    x, metric, size = random_inputs(batch=8, tokens=197, channels=64, seed=7)
    step = TokenMerge(16, MergeConfig("pitome"), kernel, layer_margin(0, 12))
    want_x, want_size = step(x, size, metric, None)
    got_x, got_size = step(x.cuda(), size.cuda(), metric.cuda(), None)
    torch.testing.assert_close(got_size.cpu(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got_x.cpu(), want_x, rtol=1e-4, atol=1e-4)
    half_x, half_size = step(x.cuda().half(), size.cuda().half(), metric.cuda().half(), None)
    assert half_x.shape == want_x.shape and half_x.isfinite().all()
    assert half_size.sum(dtype=torch.float32) == size.sum()  # sizes are exact in fp16; their total is not
