"""Greedy and beam search over any decoder that steps with a key/value cache, in numpy.

Both follow transformers 5.x `generate` step for step (greedy: `_sample` without sampling;
beam: the vectorised `_beam_search` with its length penalty and early-stop heuristic), so a
backend whose logits equal PyTorch's yields the same token ids.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

NEG = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class GenerationSettings:
    """Token ids and search settings (max/min count generated tokens after the prompt)."""

    eos_token_id: int
    pad_token_id: int
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False


class StepDecoder(Protocol):
    """The decoder as the search sees it. Logits are the last position's, (rows, V) float32."""

    def start(self, input_ids: np.ndarray, rows_per_input: int) -> tuple[np.ndarray, object]:
        """Run the prompt (B, T); every row repeated `rows_per_input` times (beams)."""

    def step(self, tokens: np.ndarray, cache: object) -> tuple[np.ndarray, object]:
        """One new token per row (rows,) with the cache of the rows so far."""

    def reorder(self, cache: object, rows: np.ndarray) -> object:
        """The cache of rows `rows` (beam search picks which beams go on)."""


def _suppress_eos(scores: np.ndarray, generated: int, settings: GenerationSettings) -> np.ndarray:
    if generated < settings.min_new_tokens:
        scores = scores.copy()
        scores[:, settings.eos_token_id] = -np.inf
    return scores


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy_search(decoder: StepDecoder, prompt: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """prompt (B, T) -> ids (B, T + generated); finished rows are padded with pad_token_id."""
    ids = prompt.astype(np.int64)
    unfinished = np.ones(len(ids), dtype=bool)
    logits, cache = decoder.start(ids, 1)
    for generated in range(settings.max_new_tokens):
        tokens = _suppress_eos(logits, generated, settings).argmax(axis=-1)
        tokens = np.where(unfinished, tokens, settings.pad_token_id)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        unfinished &= tokens != settings.eos_token_id
        if not unfinished.any() or generated + 1 == settings.max_new_tokens:
            break
        logits, cache = decoder.step(tokens, cache)
    return ids


def _take(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Gather along axis 1: (B, K, ...) by (B, J) -> (B, J, ...)."""
    return np.take_along_axis(array, indices.reshape(indices.shape + (1,) * (array.ndim - 2)), axis=1)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first (ties: lower index first)."""
    if k < scores.shape[-1]:
        candidates = np.argpartition(-scores, k - 1, axis=-1)[:, :k]  # the k best, unordered
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    values = np.take_along_axis(scores, candidates, axis=-1)
    order = np.lexsort((candidates, -values), axis=-1)  # by score, then by index
    return np.take_along_axis(candidates, order, axis=-1)


def beam_search(decoder: StepDecoder, prompt: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """prompt (B, T) -> the best beam's ids per input (B, T + generated)."""
    batch, prompt_len = prompt.shape
    beams, penalty, early = settings.num_beams, settings.length_penalty, settings.early_stopping
    max_length = prompt_len + settings.max_new_tokens
    keep = 2 * beams  # candidates kept per step, so `beams` stay open when some end with EOS
    fill = settings.pad_token_id or settings.eos_token_id  # transformers' output fill value
    running = np.full((batch, beams, max_length), fill, dtype=np.int64)
    running[:, :, :prompt_len] = prompt[:, None, :]
    finished_ids = running.copy()
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = NEG  # only the first beam may extend the prompt
    finished_scores = np.full((batch, beams), NEG, dtype=np.float32)
    is_finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    running_origin = np.full((batch, beams, settings.max_new_tokens), -1, dtype=np.int64)
    finished_origin = running_origin.copy()
    top_beams = np.arange(keep) < beams
    batch_offset = np.arange(batch)[:, None] * beams

    logits, cache = decoder.start(prompt.astype(np.int64), beams)
    cur_len = prompt_len
    while True:
        scores = _suppress_eos(_log_softmax(logits.astype(np.float32)), cur_len - prompt_len, settings)
        scores = (scores.reshape(batch, beams, -1) + running_scores[:, :, None]).reshape(batch, -1)  # (B, K*V)
        vocab = scores.shape[-1] // beams
        top = _topk(scores, keep)  # (B, 2K)
        top_scores = np.take_along_axis(scores, top, axis=1)
        source_beam, tokens = top // vocab, top % vocab
        top_ids = _take(running, source_beam)
        top_ids[:, :, cur_len] = tokens
        top_origin = _take(running_origin, source_beam)
        top_origin[:, :, cur_len - prompt_len] = source_beam + batch_offset
        ends = (tokens == settings.eos_token_id) | (cur_len + 1 >= max_length)  # (B, 2K)

        open_scores = top_scores + ends.astype(np.float32) * np.float32(NEG)
        chosen = _topk(open_scores, beams)
        running, running_scores, running_origin = (_take(top_ids, chosen), _take(open_scores, chosen),
                                                   _take(top_origin, chosen))

        new_scores = top_scores / np.float32((cur_len + 1 - prompt_len) ** penalty)
        full = is_finished.all(axis=-1, keepdims=True) & (early is True)
        new_scores = new_scores + full.astype(np.float32) * np.float32(NEG)
        new_scores = new_scores + (~improvable).astype(np.float32) * np.float32(NEG)
        just_finished = ends & top_beams[None, :]
        new_scores = new_scores + (~just_finished).astype(np.float32) * np.float32(NEG)
        merged_scores = np.concatenate([finished_scores, new_scores], axis=1)
        best = _topk(merged_scores, beams)
        finished_ids = _take(np.concatenate([finished_ids, top_ids], axis=1), best)
        finished_scores = _take(merged_scores, best)
        finished_origin = _take(np.concatenate([finished_origin, top_origin], axis=1), best)
        is_finished = _take(np.concatenate([is_finished, just_finished], axis=1), best)

        rows = running_origin[:, :, cur_len - prompt_len].reshape(-1)
        cur_len += 1
        hypothetical = (max_length if early == "never" and penalty > 0.0 else cur_len) - prompt_len
        best_running = running_scores[:, :1] / np.float32(hypothetical ** penalty)
        worst_finished = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), np.float32(NEG))
        improvable = improvable & (best_running > worst_finished).any(axis=-1, keepdims=True)
        if not (improvable.any() and not (is_finished.all() and early is True) and not ends.all()):
            break
        logits, cache = decoder.step(running[:, :, cur_len - 1].reshape(-1), decoder.reorder(cache, rows))

    generated = ((finished_origin[:, 0] + 1) != 0).sum(axis=1).max()
    return finished_ids[:, 0, :prompt_len + generated]


def generate(decoder: StepDecoder, prompt: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    search = beam_search if settings.num_beams > 1 else greedy_search
    return search(decoder, prompt, settings)
