"""The token plan against the analytic reference table, caps, threshold and schedules."""

import pytest

from turbo.merging.plan import ArchSpec, make_plan, max_r
from turbo.merging.schedule import parse_schedule, resolve_schedule

VIT_B = ArchSpec(num_layers=12, num_tokens=197, hidden_size=768, mlp_size=3072, patch_area=256)
BLIP_B = ArchSpec(num_layers=12, num_tokens=577, hidden_size=768, mlp_size=3072, patch_area=256)


@pytest.mark.parametrize(
    "arch, r, final_tokens, gflops, bound",
    [
        (VIT_B, 0, 197, 35.1, 1.00),
        (VIT_B, 8, 101, 26.2, 1.34),
        (VIT_B, 16, 11, 17.6, 2.00),
        (BLIP_B, 30, 217, 74.0, 1.50),
    ],
)
def test_plan_matches_reference_table(arch, r, final_tokens, gflops, bound):
    plan = make_plan(arch, r)
    assert plan.final_tokens == final_tokens
    assert plan.flops / 1e9 == pytest.approx(gflops, abs=0.15)
    assert plan.speedup_bound == pytest.approx(bound, abs=0.01)


def test_token_counts_chain_and_cap_is_reported():
    plan = make_plan(VIT_B, 16)
    for before, after in zip(plan.layers, plan.layers[1:]):
        assert after.tokens_in == before.tokens_out
        assert before.tokens_out == before.tokens_in - before.r
    assert plan.clamped_layers == [11]
    assert plan.layers[11].r == max_r(21) == 10


def test_threshold_stops_merging_below_it():
    plan = make_plan(VIT_B, 16, threshold=40)
    assert [layer.r for layer in plan.layers] == [16] * 10 + [0, 0]
    assert plan.final_tokens == 37


def test_method_none_merges_nothing():
    plan = make_plan(VIT_B, 16, method="none")
    assert plan.r == [0] * 12 and plan.speedup_bound == 1.0


def test_decreasing_schedule_ramps_from_2r_to_0():
    values = resolve_schedule(12, 8, "decreasing")
    assert values[0] == 16 and values[-1] == 0
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert abs(sum(values) - 8 * 12) <= 12


def test_explicit_schedule_is_used_as_given():
    plan = make_plan(VIT_B, 0, parse_schedule("20,10,0,0,5,5,5,5,5,5,5,5"))
    assert plan.r == [20, 10, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=-1), "r must be >= 0"),
        (dict(r=99), "at most r=98"),
        (dict(r=4, schedule=[1, 2]), "lists 2 values"),
        (dict(r=4, schedule="zigzag"), "unknown schedule"),
        (dict(r=4, method="fast"), "unknown method"),
        (dict(r=4, threshold=-3), "threshold"),
    ],
)
def test_bad_choices_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(VIT_B, **kwargs)


def test_parse_schedule_rejects_junk():
    with pytest.raises(ValueError, match="comma-separated"):
        parse_schedule("8,x")
