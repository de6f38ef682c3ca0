"""LLM-side image-token reduction: FastV and PyramidDrop rankings against plain references written
from the papers, the per-layer token plans, their FLOPs, and the token gather."""

import math

import pytest
import torch

from turbo.core.errors import UsageError
from turbo.merging.llm_drop import (
    LlmDropConfig,
    coverage_keep,
    decode_flops,
    dual_attention_keep,
    fastv_keep,
    image_tokens_per_layer,
    keep_tokens,
    key_token_set,
    llm_layer_flops,
    most_received,
    parse_llm_drop,
    prefill_flops,
    pyramid_keep,
)


def test_fastv_keeps_the_most_attended_image_tokens():
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 3, 9, 9, generator=g).softmax(-1)  # (B, H, Q, T); image tokens at 2..6
    got = fastv_keep(attention, 2, 5, 3)
    for b in range(2):  # FastV: the attention each image token receives, averaged over heads and queries
        received = {j: sum(attention[b, h, q, j].item() for h in range(3) for q in range(9)) / 27 for j in range(2, 7)}
        assert (got[b] + 2).tolist() == sorted(sorted(received, key=received.get, reverse=True)[:3])


def test_pyramid_keeps_the_image_tokens_the_last_instruction_attends():
    g = torch.Generator().manual_seed(1)
    query, keys = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 10, 8, generator=g)
    got = pyramid_keep(query, keys, 4)
    for b in range(2):
        per_head = [torch.softmax(torch.stack([keys[b, h, n] @ query[b, h] / math.sqrt(8) for n in range(10)]), 0)
                    for h in range(4)]
        attention = torch.stack(per_head).mean(0)
        assert got[b].tolist() == sorted(attention.topk(4).indices.tolist())


def test_mustdrop_keeps_the_image_tokens_the_text_attends_to_and_its_key_set():
    g = torch.Generator().manual_seed(2)
    attention = torch.rand(1, 3, 12, 12, generator=g).softmax(-1)  # image tokens at 2..7, text 8..11
    for global_thr, individual_thr in ((0.15, 0.09), (0.2, 0.1), (0.0, 1.0), (1.0, 0.0)):
        protected = torch.tensor([1])
        got = dual_attention_keep(attention, 2, 6, global_thr, individual_thr, protected).tolist()
        text_on_image = [[sum(attention[0, h, q, 2 + n].item() for h in range(3)) / 3 for n in range(6)]
                         for q in range(8, 12)]
        received = [sum(row[n] for row in text_on_image) for n in range(6)]
        goes = [received[n] < global_thr * sum(received) and max(row[n] for row in text_on_image) < individual_thr
                for n in range(6)]
        assert got == [n for n in range(6) if not goes[n] or n == 1]
    assert dual_attention_keep(attention, 2, 6, 1.0, 1.0, torch.tensor([4])).tolist() == [4]  # only the key set
    assert key_token_set(torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05]), 0.4).tolist() == [1, 3]  # ceil(0.4 · 5) = 2


def test_token_plans():
    assert image_tokens_per_layer(LlmDropConfig(), 4, 576) == [576] * 4
    assert image_tokens_per_layer(LlmDropConfig("fastv"), 6, 576) == [576, 576] + [288] * 4
    assert image_tokens_per_layer(LlmDropConfig("pyramid"), 8, 576) == [576, 576, 288, 288, 144, 144, 72, 72]
    assert image_tokens_per_layer(LlmDropConfig("pyramid", stages=3), 7, 100) == [100, 100, 50, 50, 25, 25, 25]


@pytest.mark.parametrize(("config", "layers", "message"), [
    (LlmDropConfig("fastv", layer=4), 4, "beyond the language model's 4 layers"),
    (LlmDropConfig("pyramid", stages=5), 4, "need at least as many layers"),
    (LlmDropConfig("pyramid", stages=4, keep=0.01), 8, "would drop every image token"),
    (LlmDropConfig("mustdrop"), 14, "pruning layers 2, 6, 10, 14 need a later layer"),
])
def test_impossible_plans_are_refused(config, layers, message):
    with pytest.raises(ValueError, match=message):
        image_tokens_per_layer(config, layers, 16)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown LLM-side reduction"):
        LlmDropConfig("bogus")
    with pytest.raises(ValueError, match="ratio must be in"):
        LlmDropConfig("fastv", ratio=1.0)


def test_flops_follow_the_papers_formula():
    d, m = 8, 20
    assert llm_layer_flops(10, d, m) == 4 * 10 * 64 + 2 * 100 * 8 + 3 * 10 * 8 * 20
    full = prefill_flops(5, [16] * 4, d, m)
    dropped = prefill_flops(5, image_tokens_per_layer(LlmDropConfig("pyramid", stages=2), 4, 16), d, m)
    assert dropped == 2 * llm_layer_flops(21, d, m) + 2 * llm_layer_flops(13, d, m) < full


def test_keep_tokens_keeps_text_and_chosen_images_with_their_positions():
    hidden = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    positions = torch.arange(8).expand(2, -1)
    kept = torch.tensor([[0, 3], [1, 2]])  # among image tokens 2..5
    out, out_positions = keep_tokens(hidden, positions, 2, 4, kept)
    assert out_positions.tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 3, 4, 6, 7]]
    torch.testing.assert_close(out[1], hidden[1, [0, 1, 3, 4, 6, 7]])


def test_llm_drop_settings_parse():
    assert parse_llm_drop("fastv") == LlmDropConfig("fastv")
    assert parse_llm_drop("fastv:layer=3,ratio=0.75") == LlmDropConfig("fastv", layer=3, ratio=0.75)
    assert parse_llm_drop("pyramid:stages=2, keep=0.3").label == "pyramid:stages=2,keep=0.3"
    assert parse_llm_drop("none").label == "none"
    mustdrop = parse_llm_drop("mustdrop:layer=1,every=2,stages=3,global_thr=0.02")
    assert mustdrop.pruning_layers == [1, 3, 5] and mustdrop.global_thr == 0.02 and mustdrop.key == 0.08


@pytest.mark.parametrize(("text", "message"), [
    ("fastv:keep=0.5", "fastv takes layer, ratio, not 'keep'"),
    ("pyramid:stages=two", "stages must be a number"),
    ("fastv:layer=2.5", "layer must be a whole number"),
    ("fastv:ratio=1", "ratio must be in"),
    ("sparsevlm", "unknown LLM-side reduction"),
    ("mustdrop:key=0", "key must be in"),
    ("mustdrop:every=0", "every must be >= 1"),
])
def test_bad_llm_drop_settings_name_the_problem(text, message):
    with pytest.raises(UsageError, match=message):
        parse_llm_drop(text)


def test_decode_flops_grow_with_the_cache():
    assert decode_flops([10, 4], 8, 20) == (4 * 64 + 2 * 10 * 8 + 3 * 8 * 20) + (4 * 64 + 2 * 4 * 8 + 3 * 8 * 20)


def test_dyrate_keeps_every_image_token_in_the_prefill():
    assert image_tokens_per_layer(LlmDropConfig("dyrate"), 4, 10) == [10] * 4
    with pytest.raises(ValueError, match="DyRate's layer 4 is beyond"):
        image_tokens_per_layer(LlmDropConfig("dyrate", layer=4), 4, 10)


def test_coverage_keep_is_the_fewest_tokens_holding_the_coverage():
    attention = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert coverage_keep(attention[:1], 0.7) == 2  # 0.4 + 0.3
    assert coverage_keep(attention[:1], 0.71) == 3  # + 0.15
    assert coverage_keep(attention, 0.7) == 4  # the uniform row needs 4 of 5: the batch keeps its largest
    assert coverage_keep(attention[:1], 0.1) == 1


def test_most_received_keeps_the_top_count_in_each_row_in_order():
    received = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.5, 0.1, 0.2, 0.15, 0.05]])
    assert most_received(received, torch.tensor(3)).tolist() == [[1, 3, 4], [0, 2, 3]]
    assert most_received(received, torch.tensor(5)).tolist() == [[0, 1, 2, 3, 4]] * 2
