"""LLM-based VLMs in PyTorch: with every reduction off, greedy generation is transformers' own; FastV
and PyramidDrop equal plain references written from the papers on the upstream blocks; KV-cache
decode equals recomputing the reduced sequences."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
from transformers import MistralConfig, OPTConfig

from tests.conftest import pixels, tiny_pair
from tests.merging.test_spatial import reference_merge
from turbo.core.errors import UsageError
from turbo.merging.llm_drop import (
    LlmDropConfig,
    RatePredictor,
    image_tokens_per_layer,
    key_token_set,
    token_type_attention,
)
from turbo.merging.spatial import window_similarity
from turbo.models.blip2 import BLIP2
from turbo.models.llava import LLAVA
from turbo.models.llava import tower_tokens as llava_tower_tokens
from turbo.models.llm_decoder import insert_image_features
from turbo.models.llm_vocab import placeholder_tokenizer
from turbo.models.loading import load_model, resolve_source
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids

LLAVA_MODELS = ["llava-1.5-7b", "llava-interleave-qwen-0.5b"]
VLM_MODELS = [*LLAVA_MODELS, "blip2-opt-2.7b"]
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
IMAGE_FIRST_PROMPT = "Question: what is in the picture? Answer:"  # BLIP-2: the image goes before the prompt


def prompt_ids(built, image_tokens: int, prompt: str | None = None) -> torch.Tensor:
    config, language = built.source.config, built.source.adapter.language_model
    prompt = prompt or (IMAGE_FIRST_PROMPT if language.image_first else PROMPT)
    return torch.tensor([image_prompt_ids(placeholder_tokenizer(config), prompt, config.image_token_id,
                                          image_tokens, language.image_first)])


def setup(name: str, r: int = 0, drop: LlmDropConfig = LlmDropConfig()):
    merged, _, reference, built = tiny_pair(name, r=r)
    language = built.source.adapter.language_model
    image_tokens = language.image_tokens(built.source.config, built.plan.final_tokens)
    return VlmGenerator(merged, language, drop), reference, built, prompt_ids(built, image_tokens)


@pytest.mark.parametrize("name", VLM_MODELS)
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

class Upstream:
    """A VLM's upstream decoder, as the references call it: LLaMA-style (rotary positions in every
    block) or OPT (learned positions added once)."""

    def __init__(self, model):
        self.opt = hasattr(model, "qformer")
        self.lm = model.language_model.model.decoder if self.opt else model.model.language_model
        self.lm_head = model.language_model.lm_head if self.opt else model.lm_head

    def start(self, embeds, positions):
        return embeds + self.lm.embed_positions(None, position_ids=positions) if self.opt else embeds

    def run(self, layer, hidden, mask, positions):
        if self.opt:
            return layer(hidden, attention_mask=mask)
        return layer(hidden, attention_mask=mask, position_embeddings=self.lm.rotary_emb(hidden, positions))

    def logits(self, hidden):
        return self.lm_head((self.lm.final_layer_norm if self.opt else self.lm.norm)(hidden))[:, -1]

    def query_and_keys(self, layer, inputs, positions):
        """The last token's query (H, d) and every key (T, H_kv, d) of a block, rotated where the model
        rotates, before any scaling."""
        attn = layer.self_attn
        x = (layer.self_attn_layer_norm if self.opt else layer.input_layernorm)(inputs)[0]  # (T, C)
        d = attn.head_dim
        query, keys = attn.q_proj(x[-1]).view(-1, d), attn.k_proj(x).view(x.shape[0], -1, d)
        if self.opt:
            return query, keys
        cos, sin = self.lm.rotary_emb(inputs, positions)

        def rotate(v, t):  # the rotary embedding at the position of sequence index t
            half = v.shape[-1] // 2
            return v * cos[0, t] + torch.cat([-v[..., half:], v[..., :half]], dim=-1) * sin[0, t]

        return rotate(query, x.shape[0] - 1), torch.stack([rotate(keys[j], j) for j in range(x.shape[0])])

    @contextmanager
    def eager(self):
        """Eager attention, so that the blocks return their probabilities; restores the setting."""
        config = self.lm.config
        previous, config._attn_implementation = config._attn_implementation, "eager"
        try:
            yield
        finally:
            config._attn_implementation = previous


def reference_logits(model, embeds: torch.Tensor, image_start: int, image_count: int, drop: LlmDropConfig,
                     kept: dict[int, list[int]] | None = None,
                     attentions: list | None = None) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Last-token logits of the upstream blocks (eager attention) with the paper's drops; batch 1.
    `kept`: the image tokens (original indices) that go on after block l, when already chosen.
    `attentions`: filled with each block's attention probabilities (1, H, T, T)."""
    upstream = Upstream(model)
    with upstream.eager():
        return _reference_logits(upstream, embeds, image_start, image_count, drop, kept, attentions)


def _reference_logits(upstream, embeds, image_start, image_count, drop, kept, attentions):
    counts = image_tokens_per_layer(drop, len(upstream.lm.layers), image_count)
    chosen = dict(kept or {})
    images = list(range(image_count))  # original indices of the image tokens still in the sequence
    positions = torch.arange(embeds.shape[1])[None]
    hidden = upstream.start(embeds, positions)
    for index, layer in enumerate(upstream.lm.layers):
        length = hidden.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        seen = {}
        handle = layer.self_attn.register_forward_hook(lambda _m, _i, out: seen.update(attention=out[1]))
        inputs = hidden
        hidden = upstream.run(layer, hidden, mask, positions)
        handle.remove()
        if attentions is not None:
            attentions.append(seen["attention"])
        if index in chosen or index + 1 < len(counts) and counts[index + 1] < counts[index]:
            if index not in chosen:
                scores = paper_scores(drop, upstream, layer, inputs, positions, seen["attention"], image_start,
                                      len(images))
                best = sorted(range(len(images)), key=lambda i: -scores[i])[:counts[index + 1]]
                chosen[index] = [images[i] for i in sorted(best)]
            keep = [images.index(original) for original in chosen[index]]
            rows = [*range(image_start), *(image_start + i for i in keep), *range(image_start + len(images), length)]
            images = chosen[index]
            hidden, positions = hidden[:, rows], positions[:, rows]
    return upstream.logits(hidden), chosen


def paper_scores(drop: LlmDropConfig, upstream: Upstream, layer, inputs, positions, attention, image_start: int,
                 count: int) -> list[float]:
    """FastV: the attention each image token received in this block, averaged over heads and all
    queries. PyramidDrop: the last instruction token's attention over the image tokens' keys, this
    block's projections, one query row, averaged over heads."""
    image = range(image_start, image_start + count)
    if drop.method == "fastv":
        heads, queries = attention.shape[1], attention.shape[2]
        return [float(sum(attention[0, h, q, j] for h in range(heads) for q in range(queries)) / (heads * queries))
                for j in image]
    query, keys = upstream.query_and_keys(layer, inputs, positions)
    heads, kv_heads, d = query.shape[0], keys.shape[1], query.shape[1]
    per_head = []
    for h in range(heads):
        logits = torch.stack([query[h] @ keys[j, h // (heads // kv_heads)] / math.sqrt(d) for j in image])
        per_head.append(logits.softmax(0))
    return torch.stack(per_head).mean(0).tolist()


@pytest.mark.parametrize("name", VLM_MODELS)
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


def test_a_post_norm_opt_generates_what_transformers_generates():
    """OPT-350m's block style: the norms after each residual, no final norm."""
    source = resolve_source("blip2-opt-2.7b", tiny=True)
    source.config.text_config = OPTConfig(**{**source.config.text_config.to_dict(), "do_layer_norm_before": False})
    model = load_model(source, random_weights=True)
    ids = prompt_ids(tiny_pair("blip2-opt-2.7b", r=0)[3], 8)
    x = pixels("blip2-opt-2.7b", batch=1, seed=8)
    ours = VlmGenerator(model, BLIP2.language_model, LlmDropConfig()).generate(x, ids, 6)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                return_dict_in_generate=True, output_logits=True)
    assert ours.tolist() == theirs.sequences[:, ids.shape[1]:].tolist()
    decoder = VlmGenerator(model, BLIP2.language_model, LlmDropConfig()).decoder
    with torch.inference_mode():
        features = BLIP2.language_model.image_features(model, x, False)
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, 590)
        torch.testing.assert_close(decoder.prefill(embeds, image).logits, theirs.logits[0], rtol=1e-4, atol=1e-5)


def mustdrop_reference(model, embeds: torch.Tensor, image_start: int, image_count: int, drop: LlmDropConfig,
                       key: list[int]):
    """MustDrop's prefill as its code runs it, on the upstream blocks (eager): after each pruning
    layer, mean the layer's attention over heads; an image token goes when the text after the
    image gives it, summed, less than global_thr of all the text's image attention and, each,
    less than individual_thr, unless it is in the key set; positions are renumbered. Returns the
    last token's logits, the surviving image tokens (original indices), and each layer's input,
    positions and image tokens (original indices) for the decode reference."""
    upstream = Upstream(model)
    positions = torch.arange(embeds.shape[1])[None]
    hidden, images, layers = upstream.start(embeds, positions), list(range(image_count)), []
    with upstream.eager():
        for index, layer in enumerate(upstream.lm.layers):
            length = hidden.shape[1]
            mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
            seen = {}
            handle = layer.self_attn.register_forward_hook(lambda _m, _i, out: seen.update(attention=out[1]))
            layers.append((hidden, positions, list(images)))
            hidden = upstream.run(layer, hidden, mask, positions)
            handle.remove()
            if index in drop.pruning_layers:
                attention, end = seen["attention"][0], image_start + len(images)
                heads = attention.shape[0]
                text_on = [[sum(float(attention[h, q, image_start + n]) for h in range(heads)) / heads
                            for n in range(len(images))] for q in range(end, length)]
                received = [sum(row[n] for row in text_on) for n in range(len(images))]
                kept = [n for n in range(len(images))
                        if images[n] in key or not (received[n] < drop.global_thr * sum(received)
                                                    and max(row[n] for row in text_on) < drop.individual_thr)]
                rows = [*range(image_start), *(image_start + n for n in kept), *range(end, length)]
                hidden, images = hidden[:, rows], [images[n] for n in kept]
                positions = torch.arange(len(rows))[None]
    return upstream.logits(hidden), images, layers


def mustdrop_decode_reference(model, token: torch.Tensor, position: int, layers, image_start: int,
                              survivors: list[int], first: int) -> torch.Tensor:
    """One decoded token under MustDrop's output-aware cache: in layers from the first pruning layer
    on it sees only the final survivors among the image tokens, before it all of them."""
    upstream = Upstream(model)
    hidden = upstream.start(upstream.lm.embed_tokens(token), torch.tensor([[position]]))
    with upstream.eager():
        for index, (layer, (inputs, positions, images)) in enumerate(zip(upstream.lm.layers, layers)):
            keep = [n for n, original in enumerate(images) if index < first or original in survivors]
            rows = [*range(image_start), *(image_start + n for n in keep),
                    *range(image_start + len(images), inputs.shape[1])]
            x = torch.cat([inputs[:, rows], hidden], dim=1)
            mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1)[None, None]
            at = torch.cat([positions[:, rows], torch.tensor([[position]])], dim=1)
            hidden = upstream.run(layer, x, mask, at)[:, -1:]
    return upstream.logits(hidden)


@pytest.mark.parametrize("drop", [
    LlmDropConfig("mustdrop", layer=1, every=1, stages=2, global_thr=0.5, individual_thr=0.06, key=0.1, window=0),
    LlmDropConfig("mustdrop", layer=1, every=2, stages=1, global_thr=0.9, individual_thr=0.5, key=0.25, window=0)])
def test_mustdrop_prefill_and_decode_equal_the_paper_reference(drop):
    generator, _, built, ids = setup("llava-1.5-7b", r=2, drop=drop)
    model, decoder = generator.model, generator.decoder
    with torch.inference_mode():
        features, attention = generator.image_tokens(pixels("llava-1.5-7b", batch=1, seed=11))
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, 590)
        prefill = decoder.prefill(embeds, image, attention)
        key = key_token_set(attention[0], drop.key)
        want, survivors, layers = mustdrop_reference(model, embeds, image.start, image.count, drop, key.tolist())
        torch.testing.assert_close(prefill.logits, want, rtol=1e-4, atol=1e-5)
        assert set(key.tolist()) <= set(survivors) and len(survivors) < image.count  # it dropped, kept the key set
        text = ids.shape[1] - image.count
        assert [keys.shape[2] - text for keys, _ in prefill.cache] == \
            [image.count] * drop.layer + [len(survivors)] * (len(layers) - drop.layer)  # the output-aware cache
        token = prefill.logits.argmax(dim=-1, keepdim=True)
        logits, _ = decoder.decode(token, torch.tensor([[prefill.next_position]]), prefill.cache)
        torch.testing.assert_close(logits, mustdrop_decode_reference(model, token, prefill.next_position, layers,
                                                                     image.start, survivors, drop.layer),
                                   rtol=1e-4, atol=1e-5)


def test_mustdrop_key_set_is_what_the_cls_attends_to_most_after_the_feature_layer():
    generator, _, built, _ = setup("llava-1.5-7b", r=2, drop=LlmDropConfig("mustdrop", key=0.25, window=0))
    model, x = generator.model, pixels("llava-1.5-7b", batch=1, seed=12)
    with torch.inference_mode():
        features, attention = generator.image_tokens(x)
        key = key_token_set(attention[0], 0.25)
        torch.testing.assert_close(features, generator.language.image_features(model, x, False))
        hidden = llava_tower_tokens(model, x, False)  # (1, N_final, C), CLS first
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        block = layers[4]  # the block after the feature layer (-2)
        x_norm = block.layer_norm1(hidden)[0]
        attn, heads = block.self_attn, block.self_attn.num_heads
        q, k = attn.q_proj(x_norm).view(-1, heads, 8), attn.k_proj(x_norm).view(-1, heads, 8)
        sizes = layers[3].turbo_state.size[0, :, 0]
        rows = [torch.softmax(k[:, h] @ q[0, h] * attn.scale + sizes.log(), 0) for h in range(heads)]
        received = torch.stack(rows).mean(0)[1:]  # on the image tokens (the CLS is not one)
    assert key.tolist() == sorted(received.topk(math.ceil(0.25 * features.shape[1])).indices.tolist())


def test_mustdrop_spatial_merge_runs_after_the_towers_first_block():
    """The upstream CLIP blocks with the reference merge after block 0 give the features; the prompt's
    image run takes their count."""
    _, reference, built, ids = setup("llava-1.5-7b", r=0)
    x = pixels("llava-1.5-7b", batch=1, seed=13)
    tower = reference.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    with torch.inference_mode():
        hidden = vision.encoder.layers[0](vision.pre_layrnorm(vision.embeddings(x)), attention_mask=None)
        scores = window_similarity(hidden[:, 1:], (6, 6), 3)[0].sort(descending=True).values
        threshold = float(scores[1] + scores[2]) / 2  # the two most similar of the 4 windows merge
        hidden = reference_merge(hidden, (6, 6), 3, threshold)
        for layer in vision.encoder.layers[1:4]:  # up to the feature layer (-2 of 5)
            hidden = layer(hidden, attention_mask=None)
        want = reference.model.multi_modal_projector(hidden[:, 1:])
    drop = LlmDropConfig("mustdrop", layer=1, every=1, stages=2, window=3, spatial_thr=threshold)
    generator = VlmGenerator(reference, built.source.adapter.language_model, drop)
    with torch.inference_mode():
        features, attention = generator.image_tokens(x)
    assert features.shape[1] == 36 - 8 * 2 and attention.shape == (1, features.shape[1])
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-5)
    tokens = generator.generate(x, ids, 3)  # the prompt holds 36 placeholders; the LLM reads the merged count
    assert tokens.shape == (1, 3) and generator.image_per_layer[0] == features.shape[1]


def dyrate_reference(model, embeds: torch.Tensor, image_start: int, layer_k: int, visible: list[list[int]],
                     image_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DyRate as the paper trains it, with masks: the upstream blocks (eager) over the whole
    sequence, where in blocks K.. the query of generated token j sees only the image tokens
    `visible[j]` (original indices; the prompt sees them all). Returns the last token's logits and
    its attention row (H, T) in block K − 1."""
    upstream = Upstream(model)
    length = embeds.shape[1]
    prompt = length - len(visible)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    pruned = causal.clone()
    for j, seen in enumerate(visible):
        hidden_images = [image_start + i for i in range(image_count) if i not in seen]
        pruned[prompt + j, hidden_images] = False
    masks = [torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]
             for allowed in (causal, pruned)]
    seen_rows = {}
    with upstream.eager():
        positions = torch.arange(length)[None]
        hidden = upstream.start(embeds, positions)
        for index, layer in enumerate(upstream.lm.layers):
            handle = layer.self_attn.register_forward_hook(lambda _m, _i, out, i=index: seen_rows.update({i: out[1]}))
            hidden = upstream.run(layer, hidden, masks[index >= layer_k], positions)
            handle.remove()
    return upstream.logits(hidden), seen_rows[layer_k - 1][0, :, -1]


def dyrate_setup(name: str, drop: LlmDropConfig):
    generator, _, _, ids = setup(name, r=2, drop=drop)
    decoder = generator.decoder
    with torch.inference_mode():
        features = generator.language.image_features(generator.model, pixels(name, batch=1, seed=9), False)
        embeds, image = insert_image_features(decoder.embed(ids), ids, features, generator.model.config.image_token_id)
        prefill = decoder.prefill(embeds, image)
    return generator.model, decoder, embeds, image, prefill


@pytest.mark.parametrize("name", VLM_MODELS)
@pytest.mark.parametrize("drop", [LlmDropConfig("dyrate", layer=2, coverage=0.6, min_keep=0.2),
                                  LlmDropConfig("dyrate", layer=1, coverage=0.3, min_keep=0.1)])
def test_dyrate_decoding_equals_the_paper_reference(name, drop):
    """Each step: the new token's attention in layer K − 1 (which keeps every image token) decides,
    by the training-free schedule, which image tokens the caches of layers K.. keep from then on."""
    model, decoder, embeds, image, prefill = dyrate_setup(name, drop)
    images, kept, visible = decoder.images(prefill, image), list(range(image.count)), []
    logits, cache, tokens = prefill.logits, prefill.cache, []
    with torch.inference_mode():
        for step in range(4):
            tokens.append(int(logits.argmax()))
            visible.append(kept)  # what this token's query sees in blocks K..
            position = torch.tensor([[prefill.next_position + step]])
            logits, cache, images = decoder.decode_pruning(torch.tensor([[tokens[-1]]]), position, cache, images)
            grown = torch.cat([embeds, decoder.embed(torch.tensor([tokens]))], dim=1)
            want, row = dyrate_reference(model, grown, image.start, drop.layer, visible, image.count)
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
            received = [float(row[:, image.start + i].mean()) for i in kept]
            ranked = sorted(range(len(kept)), key=lambda i: -received[i])
            total, needed, held = sum(received), 0, 0.0
            while held / total < drop.coverage:
                held, needed = held + received[ranked[needed]], needed + 1
            count = min(len(kept), max(needed, math.ceil(drop.min_keep * image.count)))
            kept = sorted(kept[i] for i in ranked[:count])
            assert images.kept[0].tolist() == kept, step
    assert len(kept) < image.count  # the schedule pruned


def test_dyrate_with_a_rate_predictor(tmp_path):
    """A predictor file's classifier picks the rate: here always its second rate, 0.5."""
    heads = 4
    path = tmp_path / "predictor.json"
    path.write_text(json.dumps({"rates": [0.0, 0.5], "weight": [[0.0] * heads * 4] * 2, "bias": [0.0, 1.0]}))
    drop = LlmDropConfig("dyrate", min_keep=0.1, predictor=str(path))
    _, decoder, _, image, prefill = dyrate_setup("llava-1.5-7b", drop)
    images, cache, counts = decoder.images(prefill, image), prefill.cache, []
    with torch.inference_mode():
        for step in range(3):
            position = torch.tensor([[prefill.next_position + step]])
            _, cache, images = decoder.decode_pruning(torch.tensor([[5]]), position, cache, images)
            counts.append(images.kept.shape[1])
    assert counts == [14, 7, 4]  # 28 halved each step, never below ceil(0.1 · 28) = 3
    assert [keys.shape[2] for keys, _ in cache] == [prefill.next_position + 3] * 2 + \
        [prefill.next_position - 28 + 4 + 3] * 2  # layers from K = 2 hold the 4 survivors


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not a readable predictor"),
    (json.dumps({"rates": [0.5], "weight": [[0.0] * 3], "bias": [0.0]}), "needs rates in"),
])
def test_a_bad_rate_predictor_is_one_line(tmp_path, content, message):
    path = tmp_path / "predictor.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        RatePredictor.load(str(path), heads=4)


def test_dyrate_features_are_each_heads_attention_on_the_four_token_types():
    row = torch.rand(1, 3, 12).softmax(-1)  # (B, H, T): system 0..1, image 2..6, instruction 7..8, response 9..11
    features = token_type_attention(row, 2, 5, 9)
    spans = [(0, 2), (2, 7), (7, 9), (9, 12)]
    want = [[sum(float(row[0, h, t]) for t in range(a, b)) for a, b in spans] for h in range(3)]
    torch.testing.assert_close(features[0], torch.tensor(want))
