"""LLM-based VLMs in PyTorch: with every reduction off, greedy generation is transformers' own; FastV
and PyramidDrop equal plain references written from the papers on the upstream blocks; KV-cache
decode equals recomputing the reduced sequences."""

import math

import pytest
import torch
from transformers import MistralConfig

from tests.conftest import pixels, tiny_pair
from turbo.core.errors import UsageError
from turbo.merging.llm_drop import LlmDropConfig, image_tokens_per_layer
from turbo.models.llava import LLAVA, placeholder_tokenizer
from turbo.models.llm_decoder import insert_image_features
from turbo.models.loading import load_model, resolve_source
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids

LLAVA_MODELS = ["llava-1.5-7b", "llava-interleave-qwen-0.5b"]
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def prompt_ids(built, image_tokens: int, prompt: str = PROMPT) -> torch.Tensor:
    config = built.source.config
    return torch.tensor([image_prompt_ids(placeholder_tokenizer(config), prompt, config.image_token_id,
                                          image_tokens)])


def setup(name: str, r: int = 0, drop: LlmDropConfig = LlmDropConfig()):
    merged, _, reference, built = tiny_pair(name, r=r)
    language = built.source.adapter.language_model
    image_tokens = language.image_tokens(built.source.config, built.plan.final_tokens)
    return VlmGenerator(merged, language, drop), reference, built, prompt_ids(built, image_tokens)


@pytest.mark.parametrize("name", LLAVA_MODELS)
def test_unreduced_generation_is_transformers_generate(name):
    generator, reference, built, ids = setup(name)
    x = pixels(name, batch=1)
    ours = generator.generate(x, ids, max_new_tokens=12)
    with torch.no_grad():
        out = reference.generate(input_ids=ids, pixel_values=x, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 return_dict_in_generate=True, output_logits=True)
    assert ours.tolist() == out.sequences[:, ids.shape[1]:].tolist()
    decoder = generator.decoder  # and each step's logits are transformers' (a constant stream proves little)
    with torch.inference_mode():
        features = generator.language.image_features(generator.model, x, False)
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, built.source.config.image_token_id)
        prefill = decoder.prefill(embeds, image)
        logits, cache = prefill.logits, prefill.cache
        for step, want in enumerate(out.logits):
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
            position = torch.tensor([[prefill.next_position + step]])
            logits, cache = decoder.decode(ours[:, step:step + 1], position, cache)


@pytest.mark.parametrize("name", LLAVA_MODELS)
def test_the_language_model_reads_the_merged_image_tokens(name):
    generator, _, built, ids = setup(name, r=3)
    assert built.plan.final_tokens < built.plan.tokens_in
    image_tokens = generator.language.image_tokens(built.source.config, built.plan.final_tokens)
    with torch.inference_mode():
        features = generator.language.image_features(generator.model, pixels(name, batch=1), False)
        embeds, image = insert_image_features(generator.decoder.embed(ids), ids, features, 590)
        prefill = generator.decoder.prefill(embeds, image)
    assert features.shape[1] == image.count == image_tokens
    assert [p.shape[1] for p in prefill.positions] == [ids.shape[1]] * 4
    assert prefill.positions[0].tolist() == [list(range(ids.shape[1]))]  # as transformers numbers them


# --- plain references, written from the papers on the upstream decoder blocks --------------------

def reference_logits(model, embeds: torch.Tensor, image_start: int, image_count: int, drop: LlmDropConfig,
                     kept: dict[int, list[int]] | None = None) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Last-token logits of the upstream blocks (eager attention) with the paper's drops; batch 1.
    `kept`: the image tokens (original indices) that go on after block l, when already chosen."""
    lm = model.model.language_model
    implementation, lm.config._attn_implementation = lm.config._attn_implementation, "eager"  # weights out
    try:
        return _reference_logits(lm, model.lm_head, embeds, image_start, image_count, drop, kept)
    finally:
        lm.config._attn_implementation = implementation


def _reference_logits(lm, lm_head, embeds, image_start, image_count, drop, kept):
    counts = image_tokens_per_layer(drop, len(lm.layers), image_count)
    chosen = dict(kept or {})
    images = list(range(image_count))  # original indices of the image tokens still in the sequence
    hidden, positions = embeds, torch.arange(embeds.shape[1])[None]
    for index, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(hidden, positions)
        length = hidden.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        seen = {}
        handle = layer.self_attn.register_forward_hook(lambda _m, _i, out: seen.update(attention=out[1]))
        inputs = hidden
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        handle.remove()
        if index + 1 < len(counts) and counts[index + 1] < counts[index]:
            if index not in chosen:
                scores = paper_scores(drop, layer, inputs, cos, sin, seen["attention"], image_start, len(images))
                best = sorted(range(len(images)), key=lambda i: -scores[i])[:counts[index + 1]]
                chosen[index] = [images[i] for i in sorted(best)]
            keep = [images.index(original) for original in chosen[index]]
            rows = [*range(image_start), *(image_start + i for i in keep), *range(image_start + len(images), length)]
            images = chosen[index]
            hidden, positions = hidden[:, rows], positions[:, rows]
    return lm_head(lm.norm(hidden))[:, -1], chosen


def paper_scores(drop: LlmDropConfig, layer, inputs, cos, sin, attention, image_start: int, count: int) -> list[float]:
    """FastV: the attention each image token received in this block, averaged over heads and all
    queries. PyramidDrop: the last instruction token's attention over the image tokens' keys, this
    block's projections, one query row, averaged over heads."""
    image = range(image_start, image_start + count)
    if drop.method == "fastv":
        heads, queries = attention.shape[1], attention.shape[2]
        return [float(sum(attention[0, h, q, j] for h in range(heads) for q in range(queries)) / (heads * queries))
                for j in image]
    attn = layer.self_attn
    x = layer.input_layernorm(inputs)[0]  # (T, C)
    d = attn.head_dim
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads

    def rotate(v, t):  # the rotary embedding at the position of sequence index t
        half = v.shape[-1] // 2
        return v * cos[0, t] + torch.cat([-v[half:], v[:half]]) * sin[0, t]

    last = x.shape[0] - 1
    query = attn.q_proj(x[last]).view(heads, d)
    keys = attn.k_proj(x).view(-1, kv_heads, d)
    per_head = []
    for h in range(heads):
        q = rotate(query[h], last)
        logits = torch.stack([q @ rotate(keys[j, h // (heads // kv_heads)], j) / math.sqrt(d) for j in image])
        per_head.append(logits.softmax(0))
    return torch.stack(per_head).mean(0).tolist()


@pytest.mark.parametrize("name", LLAVA_MODELS)
@pytest.mark.parametrize("drop", [LlmDropConfig("fastv", layer=2, ratio=0.5),
                                  LlmDropConfig("fastv", layer=1, ratio=0.75),
                                  LlmDropConfig("pyramid", stages=4, keep=0.5),
                                  LlmDropConfig("pyramid", stages=2, keep=0.3)])
def test_reduced_prefill_and_decode_equal_the_paper_reference(name, drop):
    generator, _, built, ids = setup(name, r=2, drop=drop)
    model, decoder = generator.model, generator.decoder
    with torch.inference_mode():
        features = generator.language.image_features(model, pixels(name, batch=1, seed=5), False)
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, model.config.image_token_id)
        prefill = decoder.prefill(embeds, image)
        want, kept = reference_logits(model, embeds, image.start, image.count, drop)
        torch.testing.assert_close(prefill.logits, want, rtol=1e-4, atol=1e-5)
        plan = decoder.plan(image.count)
        assert [p.shape[1] - (ids.shape[1] - image.count) for p in prefill.positions] == plan
        assert plan[-1] < image.count and kept
        # decode with the reduced cache = recomputing prompt + generated tokens with the same drops
        logits, cache, tokens = prefill.logits, prefill.cache, []
        for step in range(3):
            tokens.append(int(logits.argmax()))
            logits, cache = decoder.decode(torch.tensor([[tokens[-1]]]), torch.tensor([[prefill.next_position + step]]),
                                           cache)
            grown = torch.cat([embeds, decoder.embed(torch.tensor([tokens]))], dim=1)
            recomputed, _ = reference_logits(model, grown, image.start, image.count, drop, kept)
            torch.testing.assert_close(logits, recomputed, rtol=1e-4, atol=1e-5)


def test_the_drop_changes_what_is_generated():
    """Guards the reference test: a reduction that silently did nothing would pass it too."""
    generator, _, _, ids = setup("llava-1.5-7b", r=0)
    x = pixels("llava-1.5-7b", batch=1, seed=6)
    full = generator.generate(x, ids, max_new_tokens=1)
    reduced = VlmGenerator(generator.model, generator.language, LlmDropConfig("fastv", layer=1, ratio=0.9))
    with torch.inference_mode():
        embeds, image = insert_image_features(reduced.decoder.embed(ids), ids,
                                              generator.language.image_features(generator.model, x, False), 590)
        assert not torch.allclose(reduced.decoder.prefill(embeds, image).logits,
                                  generator.decoder.prefill(embeds, image).logits)
    assert full.shape == (1, 1)


@pytest.mark.parametrize(("prompt", "message"), [("What is in the picture?", "no image placeholder"),
                                                 ("<image> and <image>: which differs?", "2 image placeholders")])
def test_a_prompt_needs_one_image_placeholder(prompt, message):
    built = tiny_pair("llava-1.5-7b", r=0)[3]
    with pytest.raises(UsageError, match=message):
        prompt_ids(built, 36, prompt)


def test_a_mistral_language_model_generates_what_transformers_generates():
    """The third LLaMA-style family turbo takes (Mistral without a sliding window)."""
    source = resolve_source("llava-1.5-7b", tiny=True)
    text = source.config.text_config
    source.config.text_config = MistralConfig(
        vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, bos_token_id=1, eos_token_id=2)
    assert LLAVA.config_problem(source.config) is None
    model = load_model(source, random_weights=True)
    ids = prompt_ids(tiny_pair("llava-1.5-7b", r=0)[3], 36)
    x = pixels("llava-1.5-7b", batch=1, seed=8)
    unreduced = VlmGenerator(model, LLAVA.language_model, LlmDropConfig()).generate(x, ids, 6)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert unreduced.tolist() == theirs[:, ids.shape[1]:].tolist()
    drop = LlmDropConfig("pyramid", stages=3)  # and PyramidDrop with one key/value head for four query heads
    reduced = VlmGenerator(model, LLAVA.language_model, drop)
    with torch.inference_mode():
        features = LLAVA.language_model.image_features(model, x, False)
        embeds, image = insert_image_features(reduced.decoder.embed(ids), ids, features, 590)
        want, _ = reference_logits(model, embeds, image.start, image.count, drop)
        torch.testing.assert_close(reduced.decoder.prefill(embeds, image).logits, want, rtol=1e-4, atol=1e-5)
