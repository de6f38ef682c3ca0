"""Image-token reduction inside a vision-language model's language model: which image tokens each
LLM layer keeps, from attention scores, and what that saves. Pure torch, no model knowledge.

- FastV (Chen et al., ECCV 2024): after layer K − 1, keep the image tokens that received the most
  attention in that layer (mean over heads and over every query), dropping a fraction R; layers
  K onwards see the rest. Defaults K = 2, R = 0.5.
- PyramidDrop (Xing et al., 2024): S equal stages; at the end of each stage but the last keep a
  fraction λ of the image tokens, ranked by the attention of the last instruction token's query
  on their keys (that one query row only; softmax over the image keys, mean over heads), so the
  count falls as N·λ^s. Defaults S = 4, λ = 0.5.
- DyRate (decoding) and MustDrop (Liu et al., 2024; prefill and decoding): counts decided per
  input at run time, see `coverage_keep`, `dual_attention_keep` and the decoders; they stay
  tensors, so one exported graph serves every count.

FastV's and PyramidDrop's survivors keep their order and their position ids, as both papers' code
does; their counts are Python ints fixed at build time, so their graphs have static TopK sizes.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from turbo.core.errors import UsageError
from turbo.merging.spatial import SpatialMerge

LLM_DROPS = ("none", "fastv", "pyramid", "dyrate", "mustdrop")
TOKEN_TYPES = ("system", "image", "instruction", "response")  # DyRate's four token types
IntOrTensor = int | torch.Tensor  # a count or bound; a 0-d tensor where an exported graph reads it


@dataclass(frozen=True)
class LlmDropConfig:
    method: str = "none"
    layer: int = 2  # FastV's K: the first layer that sees the reduced tokens
    ratio: float = 0.5  # FastV's R: the fraction of image tokens dropped
    stages: int = 4  # PyramidDrop's S
    keep: float = 0.5  # PyramidDrop's λ: the fraction kept at each stage's end
    coverage: float = 0.95  # DyRate's schedule: keep the image tokens holding this much of a step's image attention
    min_keep: float = 0.1  # DyRate: never fewer than this fraction of the prompt's image tokens
    predictor: str = ""  # DyRate: a rate predictor file (JSON) instead of the training-free schedule
    every: int = 4  # MustDrop: layers between its pruning layers (layer, layer + every, ...; `stages` of them)
    global_thr: float = 0.011  # MustDrop: an image token with less of the text's summed attention may go...
    individual_thr: float = 0.01  # ...if no text token gives it this much either
    key: float = 0.08  # MustDrop: the share of image tokens in the key set (the tower's CLS attention), never dropped
    window: int = 3  # MustDrop's spatial merge in the tower: w×w windows (0: off)
    spatial_thr: float = 0.8  # ...merged when their tokens' mean cosine similarity reaches this

    def __post_init__(self) -> None:
        if self.method not in LLM_DROPS:
            raise ValueError(f"unknown LLM-side reduction {self.method!r}; choose one of {', '.join(LLM_DROPS)}")
        if not 0 <= self.ratio < 1 or not 0 < self.keep <= 1:
            raise ValueError(f"FastV's ratio must be in [0, 1) and PyramidDrop's keep in (0, 1]; got {self.ratio} "
                             f"and {self.keep}")
        if not 0 < self.coverage <= 1 or not 0 < self.min_keep <= 1:
            raise ValueError(f"DyRate's coverage and min_keep must be in (0, 1]; got {self.coverage} and "
                             f"{self.min_keep}")
        if self.window < 0:
            raise ValueError(f"MustDrop's window must be >= 0 (0: no spatial merge); got {self.window}")
        if self.layer < 1 or self.stages < 1 or self.every < 1:
            raise ValueError(f"layer, stages and every must be >= 1; got {self.layer}, {self.stages} and {self.every}")
        if not 0 < self.key <= 1 or self.global_thr < 0 or self.individual_thr < 0:
            raise ValueError(f"MustDrop's key must be in (0, 1] (its key set keeps image tokens whatever the "
                             f"thresholds) and its thresholds >= 0; got key {self.key}, "
                             f"global_thr {self.global_thr}, individual_thr {self.individual_thr}")

    def spatial_merge(self) -> SpatialMerge | None:
        """MustDrop's spatial merge in the tower, where it merges."""
        return SpatialMerge(self.window, self.spatial_thr) if self.method == "mustdrop" and self.window else None

    @property
    def pruning_layers(self) -> list[int]:
        """MustDrop's layers whose attention prunes the image tokens the next layers see."""
        return [self.layer + stage * self.every for stage in range(self.stages)]

    def parameters(self) -> dict[str, float]:
        """The settings its method reads."""
        names = {"none": (), "fastv": ("layer", "ratio"), "pyramid": ("stages", "keep"),
                 "dyrate": ("layer", "coverage", "min_keep", "predictor"),
                 "mustdrop": ("layer", "every", "stages", "global_thr", "individual_thr", "key", "window",
                              "spatial_thr")}[self.method]
        return {name: getattr(self, name) for name in names if name != "predictor" or self.predictor}

    @property
    def label(self) -> str:
        """As `--llm-drop` takes it: `fastv:layer=2,ratio=0.5`."""
        settings = ",".join(f"{name}={value}" if isinstance(value, str) else f"{name}={value:g}"
                            for name, value in self.parameters().items())
        return f"{self.method}:{settings}" if settings else self.method


def parse_llm_drop(text: str) -> LlmDropConfig:
    """`fastv`, `fastv:layer=3,ratio=0.75`, `pyramid:stages=4,keep=0.5`, `none` -> its config;
    UsageError naming what is wrong."""
    try:
        return _parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _parse(text: str) -> LlmDropConfig:
    method, _, settings = text.partition(":")
    try:
        config = LlmDropConfig(method.strip())
    except ValueError as exc:
        raise ValueError(f"--llm-drop {text}: {exc}") from None
    allowed = {**config.parameters(), **({"predictor": ""} if config.method == "dyrate" else {})}
    values = {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        name, _, value = item.partition("=")
        if name == "predictor" and name in allowed:
            values[name] = value
            continue
        if name not in allowed:
            raise ValueError(f"--llm-drop {text}: {method} takes {', '.join(allowed) or 'no settings'}, not {name!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--llm-drop {text}: {name} must be a number, not {value!r}") from None
        if isinstance(allowed[name], int):
            if not number.is_integer():
                raise ValueError(f"--llm-drop {text}: {name} must be a whole number, not {value}")
            number = int(number)
        values[name] = number
    try:
        return replace(config, **values)
    except ValueError as exc:
        raise ValueError(f"--llm-drop {text}: {exc}") from None


def image_tokens_per_layer(config: LlmDropConfig, num_layers: int, image_tokens: int) -> list[int]:
    """How many image tokens each of the LLM's layers sees; ValueError for a plan that cannot run
    (FastV's layer beyond the model, more stages than layers) or that drops every image token."""
    if config.method in ("none", "dyrate", "mustdrop"):  # the last two decide their counts per input
        if config.method == "dyrate" and config.layer >= num_layers:
            raise ValueError(f"DyRate's layer {config.layer} is beyond the language model's {num_layers} layers")
        if config.method == "mustdrop" and config.pruning_layers[-1] >= num_layers - 1:
            layers = ", ".join(map(str, config.pruning_layers))
            raise ValueError(f"MustDrop's pruning layers {layers} need a later layer to prune for; the language model "
                             f"has {num_layers} (lower layer, every or stages)")
        return [image_tokens] * num_layers
    if config.method == "fastv":
        if config.layer >= num_layers:
            raise ValueError(f"FastV's layer {config.layer} is beyond the language model's {num_layers} layers")
        kept = image_tokens - math.floor(config.ratio * image_tokens)
        counts = [image_tokens] * config.layer + [kept] * (num_layers - config.layer)
    else:
        if config.stages > num_layers:
            raise ValueError(f"PyramidDrop's {config.stages} stages need at least as many layers; the language model "
                             f"has {num_layers}")
        counts = [round(image_tokens * config.keep ** stage_of(layer, num_layers, config.stages))
                  for layer in range(num_layers)]
    if image_tokens and min(counts) == 0:
        raise ValueError(f"{config.method} would drop every image token ({image_tokens} in, {min(counts)} left); keep "
                         "more")
    return counts


def stage_of(layer: int, num_layers: int, stages: int) -> int:
    """PyramidDrop's stage of a layer: S equal stages, the remainder layers in the last."""
    return min(layer // (num_layers // stages), stages - 1)


def llm_layer_flops(tokens: int, hidden: int, intermediate: int, mlp_matrices: int = 3) -> int:
    """The papers' FLOPs of one decoder layer on n tokens: 4nd² + 2n²d + k·ndm (attention
    projections, attention, and the FFN's k matrices: 3 gated (LLaMA-style), 2 plain (OPT))."""
    n, d, m = tokens, hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m


def prefill_flops(text_tokens: int, image_per_layer: list[int], hidden: int, intermediate: int,
                  mlp_matrices: int = 3) -> int:
    return sum(llm_layer_flops(text_tokens + images, hidden, intermediate, mlp_matrices)
               for images in image_per_layer)


def decode_flops(cached_per_layer: list[int], hidden: int, intermediate: int, mlp_matrices: int = 3) -> int:
    """One decoded token's FLOPs, in the same count: per layer 4d² + 2nd + k·dm, with n the tokens
    its cache holds (the new one included)."""
    d, m = hidden, intermediate
    return sum(4 * d * d + 2 * n * d + mlp_matrices * d * m for n in cached_per_layer)


def fastv_keep(attention: torch.Tensor, image_start: int, image_tokens: int, keep: int) -> torch.Tensor:
    """attention (B, H, Q, T): one layer's attention probabilities, the image tokens at T-axis
    positions image_start .. image_start + image_tokens − 1. Returns the indices (B, keep) among
    the image tokens of those that received the most attention, mean over heads and queries, in
    ascending order."""
    received = attention.mean(dim=(1, 2))[:, image_start:image_start + image_tokens]  # (B, N)
    return received.topk(keep, dim=-1).indices.sort(dim=-1).values


def pyramid_keep(query: torch.Tensor, image_keys: torch.Tensor, keep: int) -> torch.Tensor:
    """query (B, H, d): the last instruction token's query; image_keys (B, H, N, d), after the
    rotary embedding as attention sees them. Returns the indices (B, keep) among the N image
    tokens with the most attention from that query, in ascending order."""
    scores = (image_keys @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(query.shape[-1])  # (B, H, N)
    attention = scores.softmax(dim=-1).mean(dim=1)  # (B, N)
    return attention.topk(keep, dim=-1).indices.sort(dim=-1).values


def keep_tokens(hidden: torch.Tensor, positions: torch.Tensor, image_start: int, image_tokens: int,
                kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the image tokens not in `kept` (B, K) (indices among the image tokens, ascending) from
    hidden (B, T, C) and their position ids (B, T): text before, kept image tokens, text after."""
    batch, tokens, channels = hidden.shape
    before = torch.arange(image_start, device=hidden.device).expand(batch, -1)
    after = torch.arange(image_start + image_tokens, tokens, device=hidden.device).expand(batch, -1)
    index = torch.cat([before, kept + image_start, after], dim=1)  # (B, T − N + K)
    return (hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, channels)), positions.gather(1, index))


def token_type_attention(row: torch.Tensor, image_start: IntOrTensor, image_tokens: int,
                         prompt_tokens: IntOrTensor) -> torch.Tensor:
    """DyRate's features: row (B, H, T), one query's attention over a cache that holds every image
    token -> (B, H, 4), each head's attention on the system tokens (before the image), the image,
    the instruction (the prompt after the image) and the response (generated tokens). The bounds
    may be 0-d tensors (an exported decode step reads them as inputs)."""
    position = torch.arange(row.shape[-1], device=row.device)
    kind = (position >= image_start).long() + (position >= image_start + image_tokens).long() + \
        (position >= prompt_tokens).long()  # (T,) 0 system .. 3 response
    one_hot = (kind[:, None] == torch.arange(len(TOKEN_TYPES), device=row.device)).to(row.dtype)  # (T, 4)
    return row @ one_hot


def coverage_keep(image_attention: torch.Tensor, coverage: float) -> torch.Tensor:
    """DyRate's training-free schedule: image_attention (B, n), one step's attention on the image
    tokens still cached. How many to keep (a 0-d tensor): the fewest holding `coverage` of it, in
    the row that needs the most."""
    share = image_attention / image_attention.sum(dim=-1, keepdim=True)
    cumulative = share.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (B, n)
    return (cumulative < coverage).sum(dim=-1).max() + 1


def most_received(received: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """received (B, n), keep a 0-d count -> the indices (B, keep), ascending, of the `keep` that
    received the most in each row. Shapes follow the count's value, so one exported graph serves
    every count."""
    rank = received.argsort(dim=-1, descending=True).argsort(dim=-1)  # (B, n): 0 for the most received
    return (rank < keep).nonzero()[:, 1].reshape(received.shape[0], -1)


def dual_attention_keep(attention: torch.Tensor, image_start: int, image_tokens: int, global_thr: float,
                        individual_thr: float, protected: torch.Tensor) -> torch.Tensor:
    """MustDrop's prefill filter. attention (1, H, T, T): one layer's probabilities, the image at
    T-axis positions image_start .. + image_tokens − 1, the text after it the queries that judge.
    Mean over heads; an image token may go when both the text's summed attention on it is below
    global_thr of the whole text-to-image attention and no text token's attention on it reaches
    individual_thr. `protected` (K,): indices among the image tokens kept whatever (the key set).
    Returns the kept indices (n,), ascending."""
    end = image_start + image_tokens
    text_on_image = attention[0, :, end:, image_start:end].mean(dim=0)  # (T_text, N)
    received = text_on_image.sum(dim=0)  # (N,) the global attention
    droppable = (received < received.sum() * global_thr) & (text_on_image.amax(dim=0) < individual_thr)
    droppable[protected] = False
    return (~droppable).nonzero()[:, 0]


def key_token_set(cls_attention: torch.Tensor, share: float) -> torch.Tensor:
    """MustDrop's key set: cls_attention (N,), the tower's CLS attention on each image token ->
    the indices (ceil(share · N),) of those it attends to most, ascending."""
    count = math.ceil(share * cls_attention.shape[0])
    return cls_attention.topk(count).indices.sort().values


@dataclass(frozen=True)
class RatePredictor:
    """DyRate's rate predictor: a linear classifier over the four token types' attention per head
    (H · 4 features, head-major) choosing one of its pruning rates (the fraction of the cached
    image tokens to prune at this step). DyRate trains it; turbo loads one, it does not train it."""

    rates: tuple[float, ...]
    weight: torch.Tensor  # (R, H · 4)
    bias: torch.Tensor  # (R,)

    @classmethod
    def load(cls, path: str, heads: int) -> "RatePredictor":
        """From JSON {"rates": [R], "weight": [R][heads · 4], "bias": [R]}; UsageError otherwise."""
        try:
            data = json.loads(Path(path).read_text())
            rates = tuple(float(rate) for rate in data["rates"])
            weight = torch.tensor(data["weight"], dtype=torch.float32)
            bias = torch.tensor(data["bias"], dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"DyRate predictor {path}: not a readable predictor ({exc.__class__.__name__}); it is "
                             'JSON {"rates": [...], "weight": [[...]], "bias": [...]}') from None
        if weight.shape != (len(rates), heads * len(TOKEN_TYPES)) or bias.shape != (len(rates),) or \
                not all(0 <= rate < 1 for rate in rates):
            raise UsageError(f"DyRate predictor {path}: needs rates in [0, 1), weight {len(rates)}×{heads * 4} (the "
                             f"model's {heads} heads × 4 token types) and bias {len(rates)}; got weight "
                             f"{tuple(weight.shape)}, bias {tuple(bias.shape)}")
        return cls(rates, weight, bias)

    def rate(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, H, 4) -> the rate its classifier chooses, the highest among the rows (0-d)."""
        logits = features.flatten(1).float() @ self.weight.T + self.bias  # (B, R)
        rates = torch.tensor(self.rates, dtype=torch.float64, device=features.device)
        return rates[logits.argmax(dim=-1)].max()
