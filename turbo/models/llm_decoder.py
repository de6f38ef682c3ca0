"""A LLaMA-style decoder (Llama, Qwen2, Mistral) run block by block with an explicit KV cache, so
that image tokens can leave the sequence between blocks (FastV, PyramidDrop): each block's cache
holds the image tokens that reached it. The model's own modules; SDPA attention.

Survivors keep their position ids (the papers' code does so), and decoded tokens continue from the
full prompt's length, as without reduction.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from turbo.merging.llm_drop import (
    LlmDropConfig,
    RatePredictor,
    coverage_keep,
    fastv_keep,
    image_tokens_per_layer,
    keep_tokens,
    pyramid_keep,
    token_type_attention,
)

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, H_kv, T_block, d), keys rotated


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


@dataclass
class BlockOutput:
    hidden: torch.Tensor  # (B, T, C)
    keys: torch.Tensor  # (B, H_kv, T_past + T, d), rotated
    values: torch.Tensor
    queries: torch.Tensor  # (B, H, T, d), rotated
    attention: torch.Tensor | None  # (B, H, T, T_past + T) probabilities, when asked for


def run_block(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              past: tuple[torch.Tensor, torch.Tensor] | None = None, attention: bool = False) -> BlockOutput:
    """One pre-norm decoder block: causal over the new tokens, each seeing the whole past."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:2], -1, attn.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)  # (B, H, T, d), (B, H_kv, T, d)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T_all, d)
    new, total = q.shape[2], keys.shape[2]
    query_at = torch.arange(new, device=q.device)[:, None] + (total - new)  # each new token's place among all
    mask = torch.arange(total, device=q.device)[None, :] <= query_at  # (T, T_all)
    probabilities = None
    if attention:  # the probabilities themselves are wanted: attention computed once, eagerly
        scores = (q @ keys.transpose(-1, -2)) * attn.scaling
        probabilities = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        context = probabilities @ values
    else:
        context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
    hidden = hidden + attn.o_proj(context.transpose(1, 2).reshape(*x.shape[:2], -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return BlockOutput(hidden, k, v, q, probabilities)


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

    def __init__(self, decoder: nn.Module, lm_head: nn.Linear, drop: LlmDropConfig = LlmDropConfig()):
        self.decoder, self.lm_head, self.drop = decoder, lm_head, drop

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def plan(self, image_tokens: int) -> list[int]:
        """Image tokens each block sees."""
        return image_tokens_per_layer(self.drop, self.num_layers, image_tokens)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def prefill(self, embeds: torch.Tensor, image: ImageSpan) -> Prefill:
        """embeds (B, T, C): the prompt with its image tokens. Runs every block, dropping image
        tokens where the plan says; returns the last token's logits and each block's cache."""
        batch, length, _ = embeds.shape
        counts = [*self.plan(image.count), None]
        positions = torch.arange(length, device=embeds.device).expand(batch, -1)  # (B, T)
        hidden, cache, seen = embeds, [], []
        for index, layer in enumerate(self.decoder.layers):
            cos, sin = self.decoder.rotary_emb(hidden, positions)
            dropping = counts[index + 1] is not None and counts[index + 1] < counts[index]
            out = run_block(layer, hidden, cos, sin, attention=dropping and self.drop.method == "fastv")
            cache.append((out.keys, out.values))
            seen.append(positions)
            hidden = out.hidden
            if dropping:
                span = ImageSpan(image.start, counts[index])
                kept = image_keep(self.drop, out, span, counts[index + 1])
                hidden, positions = keep_tokens(hidden, positions, image.start, span.count, kept)
        logits = self.lm_head(self.decoder.norm(hidden[:, -1:]))[:, 0]
        return Prefill(logits, cache, seen, length)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, 1) at positions (B, 1) -> their logits (B, V) and the grown cache."""
        logits, grown, _ = self._step(input_ids, positions, cache)
        return logits, grown

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              attention_in: int | None = None) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
        """One decode step; with `attention_in`, also that block's attention row for the new token
        (B, H, T)."""
        hidden = self.embed(input_ids)  # (B, 1, C)
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        grown, row = [], None
        for index, (layer, past) in enumerate(zip(self.decoder.layers, cache, strict=True)):
            out = run_block(layer, hidden, cos, sin, past, attention=index == attention_in)
            if out.attention is not None:
                row = out.attention[:, :, -1]
            grown.append((out.keys, out.values))
            hidden = out.hidden
        return self.lm_head(self.decoder.norm(hidden))[:, 0], grown, row


@dataclass(frozen=True)
class CachedImages:
    """DyRate's view of the caches while decoding: the prompt's image run, and which of its tokens
    the layers from K on still hold (the layers before K keep every one)."""

    start: int
    total: int  # the prompt's image tokens
    prompt_tokens: int
    kept: torch.Tensor  # (B, n): original indices among the image tokens, ascending


class PruningDecoder(ReducedDecoder):
    """DyRate: after each decode step, prune image tokens from the caches of layers K.. at a rate
    chosen from that step's attention (layer K − 1's row for the new token): a rate predictor's, or
    the training-free schedule's (keep the fewest holding `coverage` of the image attention). The
    ones that received the least of that attention go first; survivors keep their order."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Linear, drop: LlmDropConfig,
                 predictor: RatePredictor | None = None):
        super().__init__(decoder, lm_head, drop)
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
        received = row.mean(dim=1)[:, images.start:images.start + images.total].gather(1, images.kept)  # (B, n)
        floor = math.ceil(self.drop.min_keep * images.total)
        if self.predictor is not None:
            features = token_type_attention(row, images.start, images.total, images.prompt_tokens)  # (B, H, 4)
            keep = present - math.floor(self.predictor.rate(features) * present)
        else:
            keep = coverage_keep(received, self.drop.coverage, floor)
        keep = min(present, max(keep, floor))
        if keep == present:
            return cache, images
        order = received.topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, keep) among the present ones
        pruned = list(cache[:self.drop.layer])
        for keys, values in cache[self.drop.layer:]:
            batch, _, length, _ = keys.shape
            before = torch.arange(images.start, device=keys.device).expand(batch, -1)
            after = torch.arange(images.start + present, length, device=keys.device).expand(batch, -1)
            rows = torch.cat([before, order + images.start, after], dim=1)[:, None, :, None]  # (B, 1, T', 1)
            pruned.append(tuple(t.gather(2, rows.expand(-1, t.shape[1], -1, t.shape[3])) for t in (keys, values)))
        return pruned, replace(images, kept=images.kept.gather(1, order))


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


class PrefillGraph(nn.Module):
    """The prefill as one graph: (prefix_ids (B, P), image_features (B, N, C), suffix_ids (B, S)) ->
    (logits (B, V), keys 0, values 0, ...), each block's cache (B, H_kv, P + N_block + S, d)."""

    def __init__(self, decoder: ReducedDecoder):
        super().__init__()
        self.decoder, self.lm_head, self.drop = decoder.decoder, decoder.lm_head, decoder.drop

    def forward(self, prefix_ids: torch.Tensor, image_features: torch.Tensor,
                suffix_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        reduced = ReducedDecoder(self.decoder, self.lm_head, self.drop)
        embeds = torch.cat([reduced.embed(prefix_ids), image_features, reduced.embed(suffix_ids)], dim=1)
        prefill = reduced.prefill(embeds, ImageSpan(prefix_ids.shape[1], image_features.shape[1]))
        return prefill.logits, *flat_cache(prefill.cache)


class DecodeGraph(nn.Module):
    """One decode step as one graph: (input_ids (B, 1), positions (B, 1), keys 0, values 0, ...) ->
    (logits (B, V), the grown keys 0, values 0, ...)."""

    def __init__(self, decoder: ReducedDecoder):
        super().__init__()
        self.decoder, self.lm_head, self.drop = decoder.decoder, decoder.lm_head, decoder.drop

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        reduced = ReducedDecoder(self.decoder, self.lm_head, self.drop)
        logits, cache = reduced.decode(input_ids, positions, paired_cache(past))
        return logits, *flat_cache(cache)
