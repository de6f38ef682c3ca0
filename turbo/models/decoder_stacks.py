"""Decoder-only language models run block by block with an explicit KV cache, one class per block
style: LLaMA-style (Llama, Qwen2, Mistral: RMSNorm, rotary positions, gated MLP) and OPT (LayerNorm,
learned absolute positions added to the input, fc1/fc2 MLP). The model's own modules; SDPA
attention, eager where the probabilities are wanted."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class BlockOutput:
    hidden: torch.Tensor  # (B, T, C)
    keys: torch.Tensor  # (B, H_kv, T_past + T, d), as attention reads them (rotated where the model rotates)
    values: torch.Tensor
    queries: torch.Tensor  # (B, H, T, d), unscaled, rotated where the model rotates
    attention: torch.Tensor | None  # (B, H, T, T_past + T) probabilities, when asked for


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           past: tuple[torch.Tensor, torch.Tensor] | None, attention: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Causal attention of the new tokens q (B, H, T, d) over the past and themselves (k, v:
    (B, H_kv, T, d)) -> context (B, T, H·d), the grown keys and values, the probabilities if asked."""
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T_all, d)
    new, total = q.shape[2], keys.shape[2]
    query_at = torch.arange(new, device=q.device)[:, None] + (total - new)  # each new token's place among all
    mask = torch.arange(total, device=q.device)[None, :] <= query_at  # (T, T_all)
    probabilities = None
    if attention:  # the probabilities themselves are wanted: attention computed once, eagerly
        scores = (q @ keys.transpose(-1, -2)) * scaling
        probabilities = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        context = probabilities @ values
    else:
        context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return context.transpose(1, 2).flatten(2), k, v, probabilities


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H·d) -> (B, H, T, d)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


class DecoderStack(ABC):
    """A decoder's embeddings, blocks and head, one subclass per block style. `start` turns
    embeddings at position ids into the first block's input; `positional` gives each block what it
    needs of the positions; `block` runs one; `logits` reads the last hidden state."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Linear):
        self.decoder, self.lm_head = decoder, lm_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C_embed): the space a VLM's image features are projected into."""
        return self.decoder.embed_tokens(input_ids)

    def start(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeds

    def positional(self, hidden: torch.Tensor, positions: torch.Tensor) -> object:
        return None

    @abstractmethod
    def block(self, layer: nn.Module, hidden: torch.Tensor, positional: object,
              past: tuple[torch.Tensor, torch.Tensor] | None = None, attention: bool = False) -> BlockOutput:
        """One block: causal over the new tokens in `hidden` (B, T, C), each seeing the whole past."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, 1, C) -> (B, V)."""


class LlamaStack(DecoderStack):
    """Pre-norm blocks with rotary positions (Llama, Qwen2, Mistral)."""

    def positional(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, positions)

    def block(self, layer, hidden, positional, past=None, attention=False) -> BlockOutput:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q, k, v = (_heads(proj(x), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *positional)  # (B, H, T, d), (B, H_kv, T, d)
        context, k, v, probabilities = attend(q, k, v, attn.scaling, past, attention)
        hidden = hidden + attn.o_proj(context)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return BlockOutput(hidden, k, v, q, probabilities)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.decoder.norm(hidden))[:, 0]


class OptStack(DecoderStack):
    """OPT blocks (pre- or post-norm as the config says), learned positions added to the input once.
    Embeddings as wide as the blocks (no project_in / project_out; BLIP-2 checks)."""

    def start(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeds + self.decoder.embed_positions(None, position_ids=positions)

    def block(self, layer, hidden, positional, past=None, attention=False) -> BlockOutput:
        attn, before = layer.self_attn, layer.do_layer_norm_before
        x = layer.self_attn_layer_norm(hidden) if before else hidden
        q, k, v = (_heads(proj(x), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        context, k, v, probabilities = attend(q, k, v, attn.scaling, past, attention)
        hidden = hidden + attn.out_proj(context)
        if not before:
            hidden = layer.self_attn_layer_norm(hidden)
        x = layer.final_layer_norm(hidden) if before else hidden
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
        if not before:
            hidden = layer.final_layer_norm(hidden)
        return BlockOutput(hidden, k, v, q, probabilities)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder.final_layer_norm is not None:  # pre-norm blocks end with one
            hidden = self.decoder.final_layer_norm(hidden)
        return self.lm_head(hidden)[:, 0]
