"""Image-text retrieval in `turbo eval`: recall@K both ways against the captions' pairing, and
label-free fidelity of a merged model's similarities to r=0's (top-1 agreement, rank correlation),
over every caption of the evaluation images."""

import numpy as np
import torch

from turbo.core.manifest import Manifest
from turbo.export.text_export import TextEmbedder
from turbo.models.loading import ModelSource, load_model, load_tokenizer
from turbo.runtimes.retrieval import RetrievalPipeline, normalized, tokenize

RECALL_AT = (1, 5, 10)


def _recall(first_hit: np.ndarray) -> dict[int, float]:
    """Fraction of queries whose first correct match ranks within K, for each K (ranks from 0)."""
    return {k: float(np.mean(first_hit < k)) for k in RECALL_AT}


def recalls(logits: np.ndarray, text_image: np.ndarray) -> dict[str, float]:
    """logits (I, T) similarities; text_image (T,) the image each text captions. Image-to-text:
    the best-ranked of an image's own captions; text-to-image: its one image. `recall_mean` is
    the mean of the six, as BLIP and the Turbo paper report it."""
    images = logits.shape[0]
    order_i2t = np.argsort(-logits, axis=1, kind="stable")  # (I, T) texts, best first
    correct = text_image[order_i2t] == np.arange(images)[:, None]  # (I, T)
    i2t = _recall(np.argmax(correct, axis=1))  # every image has a caption (the loader guarantees it)
    order_t2i = np.argsort(-logits.T, axis=1, kind="stable")  # (T, I)
    t2i = _recall(np.argmax(order_t2i == text_image[:, None], axis=1))
    metrics = {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}
    metrics["recall_mean"] = float(np.mean(list(metrics.values())))
    return metrics


def _ranks(rows: np.ndarray) -> np.ndarray:
    """Each row's values replaced by their rank (0 = smallest)."""
    return np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float64)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman correlation of a's and b's values (1 where a row is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return float(np.mean(np.where(norm > 0, (ra * rb).sum(axis=1) / np.where(norm > 0, norm, 1), 1.0)))


def fidelity(logits: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """How closely a merged model's similarities (I, T) follow r=0's, without labels: how often
    the best match is r=0's (mean of both directions) and the rank correlation of every query's
    scores (mean of both directions)."""
    images = np.mean(logits.argmax(axis=1) == base.argmax(axis=1))  # each image's best text
    texts = np.mean(logits.argmax(axis=0) == base.argmax(axis=0))  # each text's best image
    return {"top1_agreement": float((images + texts) / 2),
            "rank_correlation": (_spearman(logits, base) + _spearman(logits.T, base.T)) / 2}


class RetrievalTexts:
    """The captions of the evaluation images as retrieval queries: each caption, the image it
    belongs to, and its embedding by each runtime (PyTorch for a model, ONNX Runtime for an
    export's text encoder), computed once."""

    def __init__(self, samples: list, source: ModelSource, options, manifest: Manifest | None) -> None:
        self.texts = [caption for sample in samples for caption in sample.references]
        self.text_image = np.array([i for i, sample in enumerate(samples) for _ in sample.references])
        self.source, self.options, self.manifest = source, options, manifest
        self._embeddings: dict[str, np.ndarray] = {}

    def embeddings(self, runtime: str) -> np.ndarray:
        """Normalised text embeddings (T, D) by `runtime` ("torch" or "ort")."""
        if runtime not in self._embeddings:
            if runtime == "ort":
                vectors = RetrievalPipeline(self.options.export_dir, self.manifest).text_embeddings(self.texts)
            else:
                vectors = self._torch_embeddings()
            self._embeddings[runtime] = vectors
        return self._embeddings[runtime]

    def _torch_embeddings(self, batch: int = 64) -> np.ndarray:
        tower = self.source.adapter.text_tower
        model = load_model(self.source, self.options.random_weights, self.options.seed).eval()
        tokenizer, _ = load_tokenizer(self.source, self.options.random_weights)
        embedder, length, rows = TextEmbedder(model, tower), tower.max_length(self.source.config), []
        with torch.inference_mode():
            for start in range(0, len(self.texts), batch):
                feeds = tokenize(tokenizer, self.texts[start:start + batch], length)
                rows.append(embedder(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy())
        return normalized(np.concatenate(rows))

    def logits(self, run) -> np.ndarray:
        """Cosine similarities (I, T) of a run's image embeddings with the texts."""
        return normalized(np.asarray(run.outputs, dtype=np.float32)) @ self.embeddings(run.runtime).T

    def metrics(self, run, base_run) -> dict[str, float]:
        """Recall@K of `run`, and its fidelity to `base_run` (r=0; itself when None)."""
        logits = self.logits(run)
        base = self.logits(base_run) if base_run is not None else logits
        return {**recalls(logits, self.text_image), **fidelity(logits, base)}
