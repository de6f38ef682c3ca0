"""Every registered model (tiny variant): exactness at r=0, the plan honoured, batching,
kernels, duplicate tokens, and proof that the patch applied."""

import inspect
from dataclasses import replace

import pytest
import torch

from tests.conftest import encoder_output, pixels, tiny_pair, tiny_plan, upstream_outputs
from turbo.core.errors import PatchError, UsageError
from turbo.merging.matching import CLS_METHODS, MergeConfig
from turbo.merging.plan import make_plan
from turbo.models.adapters import BlockParts
from turbo.models.patch import TurboState, apply_turbo, is_patched, turbo_block


def test_r0_equals_upstream_bit_for_bit(model_name):
    """The patched model's export outputs at r=0 are transformers' own forward's, bit for bit."""
    merged, state, reference, built = tiny_pair(model_name, r=0)
    x = pixels(model_name, batch=3)
    with torch.no_grad():
        ours = built.source.adapter.export_outputs(merged, x, False)
    theirs = upstream_outputs(reference, x)
    deployed = next(iter(ours))
    assert deployed in theirs
    for name in set(ours) & set(theirs):
        assert torch.equal(ours[name], theirs[name]), name
    assert sum(is_patched(m) for m in merged.modules()) == len(state.token_counts)


def test_turbo_block_without_merging_equals_upstream_block(model_name):
    """The re-implemented block (proportional attention with all sizes 1) is the upstream block."""
    merged, _, _, built = tiny_pair(model_name, r=0)
    layer = built.source.adapter.encoder_layers(merged)[1]
    hidden = torch.randn(2, built.plan.tokens_in, built.source.adapter.vision_config(built.source.config).hidden_size)
    state = TurboState(size=torch.ones(2, built.plan.tokens_in, 1))
    with torch.no_grad():
        ours = turbo_block(layer, built.source.adapter, hidden, state)
        forward = type(layer).__mro__[1].forward
        no_mask = {"attention_mask": None} if "attention_mask" in inspect.signature(forward).parameters else {}
        upstream = forward(layer, hidden, **no_mask)  # BLIP-2's block takes no mask
    torch.testing.assert_close(ours, upstream, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["turbo", "tome", "semantic", "pitome"])
def test_token_counts_follow_the_plan_and_sizes_sum(model_name, method):
    source = tiny_plan(model_name).source
    if method in CLS_METHODS and not source.adapter.has_cls_token(source.config):  # no CLS: tome and pitome apply
        with pytest.raises(UsageError, match=f"--method {method} needs a CLS token"):
            tiny_pair(model_name, r=None, schedule="6,4,4,2", method=method)
        return
    merged, state, _, built = tiny_pair(model_name, r=None, schedule="6,4,4,2", method=method)
    out = encoder_output(merged, pixels(model_name))
    plan = built.plan
    assert plan.final_tokens == plan.tokens_in - 16
    assert state.token_counts == [(layer.tokens_in, layer.tokens_out) for layer in plan.layers]
    assert torch.all(state.size.sum(dim=(1, 2)) == plan.tokens_in)
    hidden = built.source.adapter.export_outputs(merged, pixels(model_name), False)
    assert out.shape[0] == 2 and list(hidden.values())[-1].shape[1] == plan.final_tokens


def test_batch_items_equal_single_runs(model_name):
    merged, _, _, _ = tiny_pair(model_name, r=4)
    x = pixels(model_name, batch=3, seed=1)
    batched = encoder_output(merged, x)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], encoder_output(merged, x[i : i + 1]), rtol=1e-5, atol=1e-5)


def test_scatter_and_matmul_models_agree(model_name):
    matmul, _, _, _ = tiny_pair(model_name, r=4, kernel="matmul")
    scatter, _, _, _ = tiny_pair(model_name, r=4, kernel="scatter")
    x = pixels(model_name, seed=2)
    torch.testing.assert_close(encoder_output(matmul, x), encoder_output(scatter, x), rtol=1e-5, atol=1e-5)


def test_merging_changes_the_output(model_name):
    """Guards the tests above against a patch that silently does nothing."""
    merged, _, reference, _ = tiny_pair(model_name, r=4)
    x = pixels(model_name, seed=3)
    ours, theirs = encoder_output(merged, x), encoder_output(reference, x)
    assert ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("kernel", ["matmul", "scatter"])
def test_duplicate_tokens_merge_without_changing_the_output(model_name, kernel):
    """Tokens that are exact copies, merged with proportional attention (and the sizes in any
    pooling), leave the deployed output unchanged: a pooled output equal, an output of tokens the
    same set of tokens, each copy once."""
    merged, _, reference, built = tiny_pair(model_name, r=None, schedule="6,0,0,0", method="tome", kernel=kernel)
    protected = built.plan.protected_tokens
    copies = list(range(built.plan.tokens_in))
    for pair in range(1, 7):  # 6 A-side tokens of the merge's view copy their B-side neighbour
        copies[protected + 2 * pair - 1] = protected + 2 * pair - 2

    def duplicate(_module, args, kwargs):
        if args:
            return (args[0][:, copies], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, copies]}

    adapter, config = built.source.adapter, built.source.config
    outputs = []
    for model in (merged, reference):
        first_block = adapter.encoder_layers(model)[0]
        handle = first_block.register_forward_pre_hook(duplicate, with_kwargs=True)
        with torch.no_grad():  # the first output of tokens (BLIP-2's first holds the Q-Former's queries)
            named = adapter.export_outputs(model, pixels(model_name, seed=4), False)
        handle.remove()
        outputs.append(next(out for name, out in named.items() if name not in adapter.fixed_tokens(config)))
    if outputs[0].dim() == 2:
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        return
    assert outputs[0].shape[1] == outputs[1].shape[1] - 6
    merged_tokens, reference_tokens = outputs
    distances = torch.cdist(merged_tokens, reference_tokens, compute_mode="donot_use_mm_for_euclid_dist")
    for nearest, (a, b) in ((distances.argmin(dim=2), outputs), (distances.argmin(dim=1), outputs[::-1])):
        matched = b.gather(1, nearest.unsqueeze(-1).expand(-1, -1, b.shape[-1]))  # each token's nearest
        torch.testing.assert_close(a, matched, rtol=1e-5, atol=1e-5)


def test_patch_refuses_a_plan_for_another_depth(model_name):
    _, _, reference, built = tiny_pair(model_name, r=2)
    arch = built.source.adapter.arch_spec(built.source.config)
    deeper = make_plan(replace(arch, num_layers=arch.num_layers + 1), 2)
    with pytest.raises(PatchError, match="5 layers"):
        apply_turbo(reference, built.source.adapter, deeper, MergeConfig())


def test_patch_refuses_unknown_block_classes(model_name):
    _, _, reference, built = tiny_pair(model_name, r=2)
    built.source.adapter.encoder_layers(reference)[2].__class__ = torch.nn.Identity
    with pytest.raises(PatchError, match="encoder block 2 is Identity"):
        apply_turbo(reference, built.source.adapter, built.plan, MergeConfig())


def test_block_parts_are_the_models_own_modules(model_name):
    merged, _, _, built = tiny_pair(model_name, r=2)
    layer = built.source.adapter.encoder_layers(merged)[0]
    parts: BlockParts = built.source.adapter.block_parts(layer)
    owned = {id(m) for m in layer.modules()}
    assert {id(parts.norm1), id(parts.norm2)} <= owned
    assert all(id(part) in owned for part in (parts.mlp, parts.out_proj) if isinstance(part, torch.nn.Module))
    assert parts.norm1 is not parts.norm2


def test_blip_generate_cross_attends_to_the_planned_tokens():
    merged, _, _, built = tiny_pair("blip-caption", r=4)
    seen = []
    cross_key = merged.text_decoder.bert.encoder.layer[0].crossattention.self.key
    cross_key.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        ids = merged.generate(pixel_values=pixels("blip-caption"), max_new_tokens=4, num_beams=2)
    assert ids.shape[0] == 2 and ids.shape[1] > 1
    assert seen and set(seen) == {built.plan.final_tokens} and built.plan.final_tokens < built.plan.tokens_in


def test_blip_random_weights_give_distinct_tokens():
    merged, _, _, _ = tiny_pair("blip-caption", r=0)
    embeds = encoder_output(merged, pixels("blip-caption"))
    assert embeds[0].std(dim=0).mean() > 1e-3  # with BLIP's default 1e-10 init every token is the same
