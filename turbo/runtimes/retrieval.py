"""Image-text retrieval from an export directory on ONNX Runtime: the (merged) image encoder and
the text encoder give normalised embeddings; similarity is their cosine times the model's
logit scale, and rankings are sorted similarities."""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import UsageError
from turbo.core.files import IMAGE_TOKENS, MATCH_LOGITS, TEXT_EMBEDS, TEXT_INPUTS
from turbo.core.manifest import Manifest
from turbo.data.images import Sample, batches, pixel_batch
from turbo.graph.export_dir import open_export
from turbo.models.registry import adapter_for
from turbo.runtimes.base import Runner
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

Progress = Callable[[int, int], None]  # (done, total)


def tokenize(tokenizer, texts: list[str] | tuple[str, ...], max_length: int) -> dict[str, np.ndarray]:
    """Texts as the text encoder takes them: padded and truncated to `max_length`, int64."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in TEXT_INPUTS}


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (B, D)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Ranking:
    """Similarity logits (images x texts) and, both ways, the indices of the best matches first;
    after `rerank`, the matching head's logits of the pairs it re-scored (NaN elsewhere)."""

    logits: np.ndarray  # (I, T)
    texts_for_image: np.ndarray  # (I, T) text indices, best first
    images_for_text: np.ndarray  # (T, I) image indices, best first
    match_for_image: np.ndarray | None = None  # (I, T) match logits of each image's re-scored texts
    match_for_text: np.ndarray | None = None  # (I, T) match logits of each text's re-scored images


def rank(image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float) -> Ranking:
    """Rank normalised embeddings (I, D) and (T, D) against each other (stable: ties keep order)."""
    logits = logit_scale * image_embeds @ text_embeds.T  # (I, T)
    return Ranking(logits, np.argsort(-logits, axis=1, kind="stable"), np.argsort(-logits.T, axis=1, kind="stable"))


PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image indices, text indices) (P,) -> logits (P,)


def rerank(ranking: Ranking, k: int, match: PairScorer) -> Ranking:
    """BLIP's re-ranking (its `k_test`): each image's top k texts and each text's top k images by
    similarity are scored again by the matching head; they come first, ordered by match logit plus
    similarity, as BLIP's evaluation orders them; the rest follow in similarity order."""
    images, texts = ranking.logits.shape
    k_texts, k_images = min(k, texts), min(k, images)
    scored = np.full((images, texts), np.nan)  # every pair's match logit, each pair scored once
    rows = np.repeat(np.arange(images), k_texts), ranking.texts_for_image[:, :k_texts].reshape(-1)
    scored[rows] = match(*rows)
    columns = ranking.images_for_text[:, :k_images].reshape(-1), np.repeat(np.arange(texts), k_images)
    new = np.isnan(scored[columns])  # pairs the images' top k did not already score
    if new.any():
        scored[columns[0][new], columns[1][new]] = match(columns[0][new], columns[1][new])
    for_image, for_text = np.full_like(scored, np.nan), np.full_like(scored, np.nan)
    for_image[rows], for_text[columns] = scored[rows], scored[columns]

    def reorder(order: np.ndarray, scored: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
        top = order[:, :k]  # (Q, k)
        combined = np.take_along_axis(scored + logits, top, axis=1)
        return np.concatenate([np.take_along_axis(top, np.argsort(-combined, axis=1, kind="stable"), axis=1),
                               order[:, k:]], axis=1)

    return Ranking(ranking.logits, reorder(ranking.texts_for_image, for_image, ranking.logits, k_texts),
                   reorder(ranking.images_for_text, for_text.T, ranking.logits.T, k_images), for_image, for_text)


class RetrievalPipeline:
    """`turbo retrieve`'s engine: images -> image embeddings, texts -> text embeddings, rankings."""

    def __init__(self, directory: Path, manifest: Manifest, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.directory, self.manifest, self.text = directory, manifest, manifest.text
        self.encoder = OnnxRuntimeRunner(directory / manifest.onnx.file, providers, threads)
        self.text_encoder = OnnxRuntimeRunner(directory / self.text.file, providers, threads)
        self.matcher = (OnnxRuntimeRunner(directory / self.text.match_file, providers, threads)
                        if self.text.match_file else None)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.processor = AutoImageProcessor.from_pretrained(directory)

    @classmethod
    def open(cls, directory: str | Path, threads: int | None = None,
             providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> "RetrievalPipeline":
        """The pipeline of a verified export directory with a text encoder."""
        directory = Path(directory)
        manifest = open_export(directory)
        if manifest.text is None:
            raise UsageError(f"{directory} has no text encoder (a {manifest.model.architecture} export); retrieval "
                             "needs an image-text model: turbo export --model clip-vit-b16")
        return cls(directory, manifest, threads, providers)

    @property
    def logit_scale(self) -> float:
        return self.text.logit_scale

    def image_embeddings(self, images: list[Path], batch: int = 16, progress: Progress | None = None,
                         keep_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised embeddings (I, D) of image files, each computed once, `batch` at a time (the
        export's batch when it is static); with keep_tokens, also the image tokens (I, N, C) the
        matching head reads."""
        static = self.manifest.onnx.static_batch
        size = static or batch
        vectors, tokens = [], []
        for start in range(0, len(images), size):
            pixels = pixel_batch([Sample(path) for path in images[start:start + size]], self.processor,
                                 self.manifest.onnx.pixel_shape[0])
            for chunk, count in batches(pixels, size, static=bool(static)):
                outputs = self.encoder.run({self.encoder.input_names[0]: chunk})
                vectors.append(next(iter(outputs.values()))[:count])
                if keep_tokens:
                    tokens.append(outputs[self.match_input][:count])
            if progress is not None:
                progress(min(start + size, len(images)), len(images))
        return normalized(np.concatenate(vectors).astype(np.float32)), np.concatenate(tokens) if keep_tokens else None

    @property
    def match_input(self) -> str:
        """The image encoder output the matching head reads."""
        return adapter_for(self.manifest.model.architecture).text_tower.match.image_tokens_output

    def text_embeddings(self, texts: list[str], batch: int = 64) -> np.ndarray:
        """Normalised embeddings (T, D) of texts, truncated to the text encoder's length."""
        rows = []
        for start in range(0, len(texts), batch):
            feeds = tokenize(self.tokenizer, texts[start:start + batch], self.text.max_length)
            rows.append(self.text_encoder.run(feeds)[TEXT_EMBEDS])
        return normalized(np.concatenate(rows).astype(np.float32))

    def match_logits(self, texts: list[str], image_tokens: np.ndarray, batch: int = 32) -> np.ndarray:
        """The matching head's logit that each text matches its image's tokens (P,), pairs in order."""
        if self.matcher is None:
            raise UsageError(f"{self.directory} has no image-text matching head (a {self.manifest.model.architecture} "
                             "export); re-ranking needs one, e.g. --model blip-retrieval")
        logits = []
        for start in range(0, len(texts), batch):
            feeds = tokenize(self.tokenizer, texts[start:start + batch], self.text.max_length)
            feeds[IMAGE_TOKENS] = image_tokens[start:start + batch]
            logits.append(self.matcher.run(feeds)[MATCH_LOGITS][:, 1])
        return np.concatenate(logits)

    def truncated(self, texts: list[str]) -> list[int]:
        """Indices of texts longer than the text encoder's length (they are cut)."""
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        return [i for i, length in enumerate(lengths) if length > self.text.max_length]


class MatchRunner(Runner):
    """The matching head on a batch of (text, image) pairs behind the Runner interface, for bench:
    pixel_values (B, C, H, W) -> match logits (B, 2). The images' merged tokens are computed once
    per batch size by the export's image encoder and are not timed; each run scores B pairs of one
    text (padded to the text length, so any text costs the same) and each image."""

    def __init__(self, pipeline: RetrievalPipeline, text: str = "a dog running on a beach") -> None:
        self.pipeline, self.text, self.name = pipeline, text, pipeline.encoder.name
        self._pairs: dict[int, dict[str, np.ndarray]] = {}

    @property
    def input_names(self) -> list[str]:
        return self.pipeline.encoder.input_names

    @property
    def output_names(self) -> list[str]:
        return [MATCH_LOGITS]

    def _feeds(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if len(pixels) not in self._pairs:
            feeds = tokenize(self.pipeline.tokenizer, [self.text] * len(pixels), self.pipeline.text.max_length)
            feeds[IMAGE_TOKENS] = self.pipeline.encoder.run({self.input_names[0]: pixels})[self.pipeline.match_input]
            self._pairs[len(pixels)] = feeds
        return self._pairs[len(pixels)]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.pipeline.matcher.run(self._feeds(feeds[self.input_names[0]]))

    def memory_probe(self) -> "MatchRunner":
        """The same pairs on a matching-head session without ONNX Runtime's memory arena."""
        probe = copy.copy(self)
        probe.pipeline = copy.copy(self.pipeline)
        probe.pipeline.matcher = self.pipeline.matcher.memory_probe()
        return probe

    def describe(self) -> dict:
        return self.pipeline.matcher.describe()
