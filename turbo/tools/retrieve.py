"""`turbo retrieve`: rank texts for each image and images for each text with a retrieval export."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from turbo.core.errors import TurboNote, UsageError
from turbo.data.images import image_files, unreadable_images
from turbo.runtimes.retrieval import RetrievalPipeline, rank, rerank


@dataclass(frozen=True)
class RetrieveOptions:
    export_dir: Path
    images: list[str]  # image files and folders
    texts_file: Path  # one text per line
    top_k: int = 5
    batch: int = 16
    strict: bool = False  # an unreadable image is an error, not skipped with a note
    itm_rerank: int = 0  # re-score each query's top N with the matching head (0: off)
    threads: int | None = None


def read_texts(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file (empty lines are skipped, with a note)."""
    if not path.is_file():
        raise UsageError(f"--texts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"--texts {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise UsageError(f"--texts {path} holds no text (one text per line)")
    if len(texts) < len(lines):
        skipped = len(lines) - len(texts)
        warnings.warn(f"--texts {path}: skipped {skipped} empty line{'s' * (skipped > 1)}", TurboNote, stacklevel=2)
    return texts


def run_retrieve(options: RetrieveOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    """Both rankings, each list cut to the top k, with similarity logits."""
    if options.top_k < 1 or options.batch < 1 or options.itm_rerank < 0:
        raise UsageError("--top-k and --batch must be at least 1, --itm-rerank at least 0")
    texts = read_texts(options.texts_file)
    images = image_files(options.images)
    pipeline = RetrievalPipeline.open(options.export_dir, options.threads)
    bad = unreadable_images(images)
    if bad and options.strict:
        raise UsageError(f"{bad[0]} is not a readable image ({len(bad)} unreadable; without --strict they are "
                         "skipped)")
    if bad:
        listed = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image{'s' * (len(bad) > 1)}: {listed}", TurboNote, stacklevel=2)
        images = [path for path in images if path not in set(bad)]
        if not images:
            raise UsageError("no readable images to rank")
    cut = pipeline.truncated(texts)
    if cut:
        warnings.warn(f"{len(cut)} of the texts are longer than the text encoder's {pipeline.text.max_length} tokens "
                      f"and were truncated (the first is text {cut[0] + 1})", TurboNote, stacklevel=2)
    rescore = options.itm_rerank > 0
    if rescore and pipeline.matcher is None:
        raise UsageError(f"--itm-rerank needs an image-text matching head; {pipeline.manifest.model.name} "
                         f"({pipeline.manifest.model.architecture}) has none (BLIP retrieval has: blip-retrieval)")
    image_embeds, image_tokens = pipeline.image_embeddings(images, options.batch, progress, keep_tokens=rescore)
    ranking = rank(image_embeds, pipeline.text_embeddings(texts), pipeline.logit_scale)
    if rescore:
        ranking = rerank(ranking, options.itm_rerank,
                         lambda i, t: pipeline.match_logits([texts[j] for j in t], image_tokens[i]))
    k_texts, k_images = min(options.top_k, len(texts)), min(options.top_k, len(images))
    return {
        "export": str(options.export_dir),
        "model": pipeline.manifest.model.name,
        "r": pipeline.manifest.turbo.r_requested,
        "final_tokens": pipeline.manifest.plan.final_tokens,
        "random_weights": pipeline.manifest.model.random_weights,
        "logit_scale": pipeline.logit_scale,
        "images": [str(path) for path in images],
        "texts": texts,
        "itm_rerank": options.itm_rerank,
        "image_to_text": [{"image": str(path), "matches": [
            _match("text", j, ranking.logits[i, j], ranking.match_for_image, (i, j))
            for j in ranking.texts_for_image[i, :k_texts]]} for i, path in enumerate(images)],
        "text_to_image": [{"text": text, "matches": [
            _match("image", i, ranking.logits[i, t], ranking.match_for_text, (i, t))
            for i in ranking.images_for_text[t, :k_images]]} for t, text in enumerate(texts)],
    }


def _match(kind: str, index: int, logit: float, match, pair: tuple[int, int]) -> dict:
    """One match: its index, similarity logit and, when re-scored, the matching head's logit."""
    row = {kind: int(index), "logit": float(logit)}
    if match is not None and not np.isnan(match[pair]):
        row["itm"] = float(match[pair])
    return row
