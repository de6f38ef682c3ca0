"""A decoder-only language model (a `DecoderStack`) run block by block with an explicit KV cache, so
that image tokens can leave the sequence between blocks (FastV, PyramidDrop, MustDrop) or its cache
while decoding (DyRate, MustDrop): each block's cache holds the image tokens that reached it.

FastV's and PyramidDrop's survivors keep their position ids, MustDrop's are renumbered (as each
paper's code does); decoded tokens continue from the full prompt's length, as without reduction.
"""

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from turbo.merging.llm_drop import (
    IntOrTensor,
    LlmDropConfig,
    RatePredictor,
    coverage_keep,
    dual_attention_keep,
    fastv_keep,
    image_tokens_per_layer,
    keep_tokens,
    key_token_set,
    most_received,
    pyramid_keep,
    token_type_attention,
)
from turbo.models.decoder_stacks import BlockOutput, DecoderStack

# per block: keys, values (B, H_kv, T_block, d), as attention reads them (rotated where the model rotates)
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ImageSpan:
    """Where the image tokens sit in the prompt."""

    start: int
    count: int


@dataclass
class Prefill:
    logits: torch.Tensor  # (B, V) at the last prompt token
    cache: KVCache
    positions: list[torch.Tensor]  # per block: position ids (B, T_block) of the tokens it saw
    next_position: int  # the first decoded token's position id


def image_keep(drop: LlmDropConfig, out: BlockOutput, image: ImageSpan, keep: int) -> torch.Tensor:
    """Which image tokens (indices among the block's `image.count`, ascending, (B, keep)) go on,
    ranked from the block that was just run."""
    if drop.method == "fastv":  # the attention each image token received, mean over heads and queries
        return fastv_keep(out.attention, image.start, image.count, keep)
    groups = out.queries.shape[1] // out.keys.shape[1]
    image_keys = out.keys[:, :, image.start:image.start + image.count].repeat_interleave(groups, dim=1)
    return pyramid_keep(out.queries[:, :, -1], image_keys, keep)  # the last instruction token's query


class ReducedDecoder:
    """A decoder-only language model whose image tokens are reduced inside it."""

    def __init__(self, stack: DecoderStack, drop: LlmDropConfig = LlmDropConfig()):
        self.stack, self.drop = stack, drop

    @property
    def num_layers(self) -> int:
        return len(self.stack.layers)

    def plan(self, image_tokens: int) -> list[int]:
        """Image tokens each block sees."""
        return image_tokens_per_layer(self.drop, self.num_layers, image_tokens)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.stack.embed(input_ids)

    def prefill(self, embeds: torch.Tensor, image: ImageSpan, cls_attention: torch.Tensor | None = None) -> Prefill:
        """embeds (B, T, C): the prompt with its image tokens. Runs every block, dropping image
        tokens where the plan says; returns the last token's logits and each block's cache.
        `cls_attention` (B, N): the tower's CLS attention on each image token, which MustDrop
        chooses its key set from; the other reductions read none."""
        batch, length, _ = embeds.shape
        counts = [*self.plan(image.count), None]
        positions = torch.arange(length, device=embeds.device).expand(batch, -1)  # (B, T)
        stack = self.stack
        hidden, cache, seen = stack.start(embeds, positions), [], []
        for index, layer in enumerate(stack.layers):
            dropping = counts[index + 1] is not None and counts[index + 1] < counts[index]
            out = stack.block(layer, hidden, stack.positional(hidden, positions),
                              attention=dropping and self.drop.method == "fastv")
            cache.append((out.keys, out.values))
            seen.append(positions)
            hidden = out.hidden
            if dropping:
                span = ImageSpan(image.start, counts[index])
                kept = image_keep(self.drop, out, span, counts[index + 1])
                hidden, positions = keep_tokens(hidden, positions, image.start, span.count, kept)
        return Prefill(stack.logits(hidden[:, -1:]), cache, seen, length)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, 1) at positions (B, 1) -> their logits (B, V) and the grown cache."""
        logits, grown, _ = self._step(input_ids, positions, cache)
        return logits, grown

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              attention_in: int | None = None) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
        """One decode step; with `attention_in`, also that block's attention row for the new token
        (B, H, T)."""
        stack = self.stack
        hidden = stack.start(stack.embed(input_ids), positions)  # (B, 1, C)
        positional = stack.positional(hidden, positions)
        grown, row = [], None
        for index, (layer, past) in enumerate(zip(stack.layers, cache, strict=True)):
            out = stack.block(layer, hidden, positional, past, attention=index == attention_in)
            if out.attention is not None:
                row = out.attention[:, :, -1]
            grown.append((out.keys, out.values))
            hidden = out.hidden
        return stack.logits(hidden), grown, row


@dataclass(frozen=True)
class CachedImages:
    """DyRate's view of the caches while decoding: the prompt's image run, and which of its tokens
    the layers from K on still hold (the layers before K keep every one). The bounds are 0-d
    tensors where an exported decode step reads them as inputs."""

    start: IntOrTensor
    total: int  # the prompt's image tokens
    prompt_tokens: IntOrTensor
    kept: torch.Tensor  # (B, n): original indices among the image tokens, ascending


class PruningDecoder(ReducedDecoder):
    """DyRate: after each decode step, prune image tokens from the caches of layers K.. at a rate
    chosen from that step's attention (layer K − 1's row for the new token): a rate predictor's, or
    the training-free schedule's (keep the fewest holding `coverage` of the image attention). The
    ones that received the least of that attention go first; survivors keep their order. Counts
    stay tensors, so the step exports as one graph whatever they come to."""

    def __init__(self, stack: DecoderStack, drop: LlmDropConfig, predictor: RatePredictor | None = None):
        super().__init__(stack, drop)
        self.predictor = predictor

    def images(self, prefill: Prefill, image: ImageSpan) -> CachedImages:
        batch = prefill.logits.shape[0]
        kept = torch.arange(image.count, device=prefill.logits.device).expand(batch, -1)
        return CachedImages(image.start, image.count, prefill.next_position, kept)

    def decode_pruning(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       images: CachedImages) -> tuple[torch.Tensor, KVCache, CachedImages]:
        """One step (as `decode`), then the pruning it decides: logits (B, V), caches, images."""
        # layer K − 1's row (B, H, T) is over a cache that holds every image token
        logits, grown, row = self._step(input_ids, positions, cache, attention_in=self.drop.layer - 1)
        return logits, *self._prune(grown, row, images)

    def _prune(self, cache: KVCache, row: torch.Tensor, images: CachedImages) -> tuple[KVCache, CachedImages]:
        present = images.kept.shape[1]
        received = row.mean(dim=1).gather(1, images.kept + images.start)  # (B, n)
        if self.predictor is not None:
            features = token_type_attention(row, images.start, images.total, images.prompt_tokens)  # (B, H, 4)
            keep = present - (self.predictor.rate(features) * present).floor().long()
        else:
            keep = coverage_keep(received, self.drop.coverage)
        keep = keep.clamp(min=math.ceil(self.drop.min_keep * images.total), max=present)
        order = most_received(received, keep)  # (B, keep) among the present ones
        pruned = cache[:self.drop.layer] + [keep_cached(pair, images.start, present, order)
                                            for pair in cache[self.drop.layer:]]
        return pruned, replace(images, kept=images.kept.gather(1, order))


def keep_cached(pair: tuple[torch.Tensor, torch.Tensor], image_start: IntOrTensor, image_tokens: int,
                kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's keys and values (B, H_kv, T, d) without the image tokens not in `kept` (B, K)
    (indices among its `image_tokens`, ascending): text before, kept image tokens, text after."""
    keys = pair[0]
    batch, _, length, _ = keys.shape
    before = torch.arange(image_start, device=keys.device).expand(batch, -1)
    after = torch.arange(image_start + image_tokens, length, device=keys.device).expand(batch, -1)
    rows = torch.cat([before, kept + image_start, after], dim=1)  # (B, T')
    if batch == 1:  # one index row: a plain gather along the sequence, no per-element index tensor
        return tuple(t.index_select(2, rows[0]) for t in pair)
    return tuple(t.gather(2, rows[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in pair)


class MustDropDecoder(ReducedDecoder):
    """MustDrop inside the language model (batch 1: its counts are decided per prompt).

    Prefill: after each pruning layer, the image tokens that layer's text tokens (the prompt after
    the image) attend to too little, summed and each, leave the sequence (dual-attention
    filtering); the key set never does. The paper's code renumbers the survivors' positions
    consecutively, and so does this. Decoding (its output-aware cache policy): the caches of the
    pruning layers and every layer between them hold only the image tokens that survived the
    last pruning layer; the layers before the first keep them all. Decoded tokens continue from
    the whole prompt's length."""

    def prefill(self, embeds: torch.Tensor, image: ImageSpan, cls_attention: torch.Tensor | None = None) -> Prefill:
        if embeds.shape[0] != 1 or cls_attention is None:
            missing = "" if cls_attention is not None else " and without the tower's CLS attention"
            raise ValueError("MustDrop decides per prompt which image tokens stay, from the tower's CLS attention: it "
                             f"runs at batch 1 with that attention, not batch {embeds.shape[0]}{missing}")
        drop, stack = self.drop, self.stack
        pruning = set(drop.pruning_layers)
        key = key_token_set(cls_attention[0], drop.key)  # (K,) never dropped
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]  # (1, T)
        present = torch.arange(image.count, device=embeds.device)  # original indices of the image tokens still in
        hidden, cache, seen, held = stack.start(embeds, positions), [], [], []
        for index, layer in enumerate(stack.layers):
            out = stack.block(layer, hidden, stack.positional(hidden, positions), attention=index in pruning)
            cache.append((out.keys, out.values))
            seen.append(positions)
            held.append(present)
            hidden = out.hidden
            if index in pruning:
                protected = (present[:, None] == key).any(dim=1).nonzero()[:, 0]
                kept = dual_attention_keep(out.attention, image.start, present.shape[0], drop.global_thr,
                                           drop.individual_thr, protected)
                hidden, _ = keep_tokens(hidden, positions, image.start, present.shape[0], kept[None])
                present = present[kept]
                positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # renumbered
        for index in range(drop.layer, len(cache)):  # the output-aware cache policy
            survivors = (held[index][:, None] == present).any(dim=1).nonzero()[:, 0]
            cache[index] = keep_cached(cache[index], image.start, held[index].shape[0], survivors[None])
        return Prefill(stack.logits(hidden[:, -1:]), cache, seen, embeds.shape[1])


def insert_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                          image_token_id: int) -> tuple[torch.Tensor, ImageSpan]:
    """The prompt's embeddings (B, T, C) with its one run of image placeholders replaced by
    `features` (B, N, C); ValueError when the placeholders are not one run of N in every row."""
    placeholder = input_ids == image_token_id  # (B, T)
    counts = placeholder.sum(dim=1).tolist()
    starts = placeholder.int().argmax(dim=1).tolist()
    count = features.shape[1]
    if set(counts) != {count} or len(set(starts)) != 1 or not placeholder[:, starts[0]:starts[0] + count].all():
        raise ValueError(f"the prompt must hold the {count} image tokens as one run at the same place in every row; "
                         f"it holds {counts}")
    merged = embeds.clone()
    merged[:, starts[0]:starts[0] + count] = features.to(embeds.dtype)
    return merged, ImageSpan(starts[0], count)


def flat_cache(cache: KVCache) -> tuple[torch.Tensor, ...]:
    """keys 0, values 0, keys 1, ... as graphs take and give them."""
    return tuple(tensor for pair in cache for tensor in pair)


def paired_cache(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> KVCache:
    return list(zip(tensors[0::2], tensors[1::2], strict=True))


class _DecoderGraph(nn.Module):
    """A reduced decoder as an exportable module: its decoder and head registered as the weights."""

    def __init__(self, decoder: ReducedDecoder):
        super().__init__()
        self.decoder, self.lm_head = decoder.stack.decoder, decoder.stack.lm_head
        self.reduced = decoder


class PrefillGraph(_DecoderGraph):
    """The prefill as one graph: (prefix_ids (B, P), image_features (B, N, C), suffix_ids (B, S)
    [, MustDrop: cls_attention (1, N)]) -> (logits (B, V), keys 0, values 0, ...), each block's
    cache (B, H_kv, P + N_block + S, d); for DyRate also the image tokens its caches hold (B, N),
    which its decode steps carry on; for MustDrop, whose counts are decided inside the graph, the
    tokens each block read (L,)."""

    def forward(self, prefix_ids: torch.Tensor, image_features: torch.Tensor, suffix_ids: torch.Tensor,
                *cls_attention: torch.Tensor) -> tuple[torch.Tensor, ...]:
        reduced = self.reduced
        embeds = torch.cat([reduced.embed(prefix_ids), image_features, reduced.embed(suffix_ids)], dim=1)
        image = ImageSpan(prefix_ids.shape[1], image_features.shape[1])
        prefill = reduced.prefill(embeds, image, *cls_attention)
        if isinstance(reduced, PruningDecoder):
            return prefill.logits, *flat_cache(prefill.cache), reduced.images(prefill, image).kept
        if isinstance(reduced, MustDropDecoder):  # what each layer read (its cache holds fewer from layer K on)
            read = torch.stack([torch.ones_like(seen[0]).sum() for seen in prefill.positions])  # lengths as tensors
            return prefill.logits, *flat_cache(prefill.cache), read
        return prefill.logits, *flat_cache(prefill.cache)


class DecodeGraph(_DecoderGraph):
    """One decode step as one graph: (input_ids (B, 1), positions (B, 1), keys 0, values 0, ...) ->
    (logits (B, V), the grown keys 0, values 0, ...)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, cache = self.reduced.decode(input_ids, positions, paired_cache(past))
        return logits, *flat_cache(cache)


class PruningDecodeGraph(_DecoderGraph):
    """DyRate's decode step as one graph: (input_ids (B, 1), positions (B, 1), image_start (1,),
    prompt_tokens (1,), image_kept (B, n), keys 0, values 0, ...) -> (logits (B, V), the grown
    and pruned keys 0, values 0, ..., image_kept (B, n')); n' is decided inside the graph."""

    def __init__(self, decoder: PruningDecoder, image_tokens: int):
        super().__init__(decoder)
        self.image_tokens = image_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, image_start: torch.Tensor,
                prompt_tokens: torch.Tensor, image_kept: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = CachedImages(image_start[0], self.image_tokens, prompt_tokens[0], image_kept)
        logits, cache, images = self.reduced.decode_pruning(input_ids, positions, paired_cache(past), images)
        return logits, *flat_cache(cache), images.kept
