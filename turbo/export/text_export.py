"""Export a retrieval model's text side: the text encoder, input_ids and attention_mask (B, L) ->
text embeddings (B, D), and, where the family has one, the matching head, (text, image tokens
(B, N, C)) -> match logits (B, 2). L is the tower's text length (texts are padded to it) and N the
plan's final image tokens: static shapes; the batch axis is dynamic. The text encoder does not
merge, so its graph is the same at every r; the matching head reads the merged image tokens."""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from turbo.core.errors import describe_error
from turbo.core.files import IMAGE_TOKENS, MATCH_FILE, MATCH_LOGITS, TEXT_EMBEDS, TEXT_ENCODER_FILE, TEXT_INPUTS
from turbo.core.manifest import TextRecord
from turbo.export.onnx_export import EXTERNAL_DATA_BYTES, parameter_bytes, run_exporter
from turbo.export.validate import ValidationReport, exact_check
from turbo.models.adapters import MatchHead, TextTower
from turbo.models.loading import ModelSource
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.retrieval import tokenize

TEXT_RUN = "text encoder"
MATCH_RUN = "matching head"

# Validation texts: short and long, repeated words, punctuation, one past the maximum length
SAMPLE_TEXTS = ("a photo of a cat", "two dogs playing in the snow, one of them jumping over a small fence",
                "a", "a red bus on a city street. " * 12)


class TextEmbedder(nn.Module):
    """(input_ids, attention_mask) -> the family's text embeddings (B, D)."""

    def __init__(self, model: nn.Module, tower: TextTower) -> None:
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower.embed(self.model, input_ids, attention_mask)


class MatchScorer(nn.Module):
    """(input_ids, attention_mask, image_tokens) -> the family's match logits (B, 2)."""

    def __init__(self, model: nn.Module, head: MatchHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.model, input_ids, attention_mask, image_tokens)


def sample_image_tokens(batch: int, tokens: int, width: int, seed: int) -> torch.Tensor:
    """Image-token-like inputs (B, N, C): what the matching head reads, for export and validation."""
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def export_text_tower(model: nn.Module, source: ModelSource, tokenizer: tuple[object, str], directory: Path,
                      opset: int, image_tokens: int) -> TextRecord:
    """Write TEXT_ENCODER_FILE (and MATCH_FILE) and the tokenizer into `directory`; the manifest's
    `text` section. The text side stays fp32 whatever the image encoder's precision."""
    tower = source.adapter.text_tower
    tokenizer, origin = tokenizer
    length = tower.max_length(source.config)
    texts = {name: torch.from_numpy(value) for name, value in tokenize(tokenizer, SAMPLE_TEXTS[:2], length).items()}
    embedder = TextEmbedder(model, tower).eval()
    with torch.inference_mode():
        dim = embedder(**texts).shape[-1]
    batch = torch.export.Dim("batch")
    external = parameter_bytes(embedder) >= EXTERNAL_DATA_BYTES
    program = run_exporter(embedder, tuple(texts.values()), list(TEXT_INPUTS), [TEXT_EMBEDS],
                           ({0: batch}, {0: batch}), opset)
    program.save(str(directory / TEXT_ENCODER_FILE), external_data=external)
    match_file = None
    if tower.match is not None:
        width = source.adapter.vision_config(source.config).hidden_size
        program = run_exporter(MatchScorer(model, tower.match).eval(),
                               (*texts.values(), sample_image_tokens(2, image_tokens, width, 0)),
                               [*TEXT_INPUTS, IMAGE_TOKENS], [MATCH_LOGITS], ({0: batch}, {0: batch}, {0: batch}),
                               opset)
        program.save(str(directory / MATCH_FILE), external_data=external)
        match_file = MATCH_FILE
    tokenizer.save_pretrained(directory)
    return TextRecord(file=TEXT_ENCODER_FILE, max_length=length, embed_dim=int(dim),
                      logit_scale=tower.logit_scale(model), precision="fp32", tokenizer={"origin": origin},
                      match_file=match_file, image_tokens=image_tokens if match_file else None)


def validate_text_tower(model: nn.Module, tower: TextTower, directory: Path, text: TextRecord, width: int,
                        report: ValidationReport) -> None:
    """The text encoder (and matching head) graphs on ONNX Runtime against PyTorch, on
    SAMPLE_TEXTS tokenized by the export's own tokenizer, one text and all of them at once;
    `width` is the image tokens' (the vision hidden size)."""
    run = TEXT_RUN
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        encoder = OnnxRuntimeRunner(directory / text.file, exact=True)
        embedder = TextEmbedder(model, tower).eval()
        scorer = MatchScorer(model, tower.match).eval() if text.match_file else None
        matcher = OnnxRuntimeRunner(directory / text.match_file, exact=True) if text.match_file else None
        for texts in (SAMPLE_TEXTS[:1], SAMPLE_TEXTS):
            feeds = tokenize(tokenizer, texts, text.max_length)
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            run = TEXT_RUN
            with torch.inference_mode():
                want = embedder(**inputs).numpy()
            report.outputs.append(exact_check(run, TEXT_EMBEDS, want, encoder.run(feeds)[TEXT_EMBEDS]))
            if scorer is not None:
                run = MATCH_RUN
                tokens = sample_image_tokens(len(texts), text.image_tokens, width, len(texts))
                with torch.inference_mode():
                    want = scorer(**inputs, image_tokens=tokens)
                got = matcher.run({**feeds, IMAGE_TOKENS: tokens.numpy()})[MATCH_LOGITS]
                report.outputs.append(exact_check(run, MATCH_LOGITS, want.numpy(), got))
    except Exception as exc:  # ORT load or run failures are validation failures, reported as such
        report.runtime_error = f"{run}: {describe_error(exc)}"
