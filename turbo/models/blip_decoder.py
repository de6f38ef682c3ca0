"""BLIP's text decoder as two export-friendly steps with explicit key/value tensors.

The upstream `BlipTextLMHeadModel` keeps its keys and values in a transformers Cache object;
these modules run the same submodules (same weights, same eager attention) but take and
return plain tensors, so each one exports to a static-rank ONNX graph:

- first step: input_ids (B, T) + image_embeds (B, N, C) -> logits (B, T, V) and, per layer,
  self-attention keys/values (B, H, T, d) and cross-attention keys/values (B, H, N, d);
- with past: input_ids (B, 1) + the cache -> logits (B, 1, V) and the self-attention
  keys/values grown by one position (the cross-attention ones never change).

The masked variants also take a (B, S) mask over the cross-attended states, for states of padded
texts (VQA's encoded questions); image tokens are attended unmasked.
"""

import math

import torch
from torch import nn

SELF_KV = ("self.key", "self.value")
CROSS_KV = ("cross.key", "cross.value")


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    return x.view(x.shape[0], x.shape[1], -1, head_size).transpose(1, 2)


def cross_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) of 1 (attend) and 0 (padding) -> the additive (B, 1, 1, S) upstream extends it to."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_size: int,
            causal: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's eager attention: (B,H,T,d), (B,H,S,d) -> (B, T, H*d); bias (B, 1, 1, S) or None."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_size)  # (B, H, T, S)
    if causal:  # first step: position t sees 0..t (no past)
        steps = scores.shape[-1]
        allowed = torch.ones(steps, steps, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if bias is not None:
        scores = scores + bias
    context = torch.matmul(scores.softmax(dim=-1), value)  # (B, H, T, d)
    return context.transpose(1, 2).flatten(2)


class _DecoderStep(nn.Module):
    def __init__(self, text_decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = text_decoder
        config = text_decoder.config
        self.layers = config.num_hidden_layers
        self.head_size = config.hidden_size // config.num_attention_heads

    def _embed(self, input_ids: torch.Tensor, start: torch.Tensor | int) -> torch.Tensor:
        embeddings = self.decoder.bert.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + start
        hidden = embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions)[None]
        return embeddings.LayerNorm(hidden)  # (B, T, C)

    def _layer(self, index: int, hidden: torch.Tensor, self_kv: tuple[torch.Tensor, ...] | None,
               cross_kv: tuple[torch.Tensor, torch.Tensor] | None, image_embeds: torch.Tensor | None,
               bias: torch.Tensor | None):
        """One decoder layer; returns hidden (B,T,C), self K/V (B,H,P+T,d), cross K/V (B,H,N,d)."""
        layer = self.decoder.bert.encoder.layer[index]
        attention = layer.attention.self
        query = _heads(attention.query(hidden), self.head_size)
        key = _heads(attention.key(hidden), self.head_size)
        value = _heads(attention.value(hidden), self.head_size)
        if self_kv is not None:
            key, value = torch.cat([self_kv[0], key], dim=2), torch.cat([self_kv[1], value], dim=2)
        context = _attend(query, key, value, self.head_size, causal=self_kv is None)
        attended = layer.attention.output(context, hidden)

        cross = layer.crossattention.self
        if cross_kv is None:
            cross_kv = (_heads(cross.key(image_embeds), self.head_size),
                        _heads(cross.value(image_embeds), self.head_size))
        context = _attend(_heads(cross.query(attended), self.head_size), *cross_kv, self.head_size, causal=False,
                          bias=bias)
        attended = layer.crossattention.output(context, attended)
        hidden = layer.output(layer.intermediate(attended), attended)
        return hidden, (key, value), cross_kv

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.cls(hidden)  # (B, T, V)

    def _first(self, input_ids: torch.Tensor, states: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        hidden = self._embed(input_ids, 0)
        cache = []
        for index in range(self.layers):
            hidden, self_kv, cross_kv = self._layer(index, hidden, None, None, states, bias)
            cache += [*self_kv, *cross_kv]
        return (self._logits(hidden), *cache)

    def _with_past(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> tuple:
        hidden = self._embed(input_ids, past[0].shape[2])
        present = []
        for index in range(self.layers):
            self_kv, cross_kv = past[4 * index:4 * index + 2], past[4 * index + 2:4 * index + 4]
            hidden, self_kv, _ = self._layer(index, hidden, self_kv, cross_kv, None, bias)
            present += list(self_kv)
        return (self._logits(hidden), *present)


class DecoderFirstStep(_DecoderStep):
    """input_ids (B, T), image_embeds (B, N, C) -> logits (B, T, V), then per layer self K, V
    (B, H, T, d) and cross K, V (B, H, N, d)."""

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._first(input_ids, image_embeds, None)


class DecoderWithPast(_DecoderStep):
    """input_ids (B, 1) and per layer past self K, V (B, H, P, d) and cross K, V (B, H, N, d)
    -> logits (B, 1, V) and per layer self K, V (B, H, P+1, d)."""

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._with_past(input_ids, past, None)


class MaskedDecoderFirstStep(_DecoderStep):
    """DecoderFirstStep over states (B, S, C) of which mask (B, S) says which to attend."""

    def forward(self, input_ids: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._first(input_ids, states, cross_bias(mask, states.dtype))


class MaskedDecoderWithPast(_DecoderStep):
    """DecoderWithPast with the mask (B, S) of the cached cross-attention states."""

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._with_past(input_ids, past, cross_bias(mask, past[0].dtype))
