"""Visual question answering in `turbo eval`: every question answered greedily by the model in
PyTorch (each question at its own length, as transformers answers it alone) or by an export on ONNX
Runtime; VQA accuracy against the human answers, and label-free answer agreement with r=0."""

import time

import numpy as np
import torch
from torch import nn

from turbo.data.images import Sample
from turbo.data.vqa import Question, normalize_answer, vqa_accuracy
from turbo.models.build import BuiltPlan
from turbo.models.loading import ModelSource, load_tokenizer
from turbo.runtimes.vqa import ANSWER_TOKENS, VqaPipeline


class VqaSet:
    """The questions of an evaluation: the distinct images they ask about (encoded once per run)
    and, per question, its image's index, its text and the human answers."""

    def __init__(self, questions: list[Question], source: ModelSource, random_weights: bool) -> None:
        paths = list(dict.fromkeys(q.image for q in questions))
        index = {path: i for i, path in enumerate(paths)}
        self.samples = [Sample(path) for path in paths]
        self.pairs = [(index[q.image], q.question) for q in questions]
        self.humans = [q.answers for q in questions]
        self.source, self.random_weights = source, random_weights
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer, _ = load_tokenizer(self.source, self.random_weights)
        return self._tokenizer

    def torch_answers(self, model: nn.Module, built: BuiltPlan, pixels: np.ndarray, batch: int) -> tuple[list, float]:
        """(answers, seconds): greedy answers of the PyTorch model, questions grouped by length so
        none is padded (transformers' answer decoder attends to padding)."""
        answerer = built.source.adapter.question_answerer
        ids_config = answerer.decoder.generation_ids(built.source.config)
        length = answerer.max_length(built.source.config)
        tokenized = [self.tokenizer(q, truncation=True, max_length=length)["input_ids"] for _, q in self.pairs]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(tokenized):
            groups.setdefault(len(ids), []).append(i)
        answers: list[str] = [""] * len(self.pairs)
        begin = time.perf_counter()
        with torch.inference_mode():
            tokens = torch.cat([answerer.decoder.image_embeds(model, torch.from_numpy(pixels[s:s + batch]),
                                                              built.interpolate_pos_encoding)
                                for s in range(0, len(pixels), batch)])
            for indices in groups.values():
                for start in range(0, len(indices), batch):
                    rows = indices[start:start + batch]
                    ids = torch.tensor([tokenized[i] for i in rows])
                    mask = torch.ones_like(ids)
                    states = answerer.encode(model, ids, mask, tokens[[self.pairs[i][0] for i in rows]])
                    out = answerer.decoder.module(model).generate(
                        input_ids=torch.full((len(rows), 1), ids_config["bos_token_id"]),
                        encoder_hidden_states=states, encoder_attention_mask=torch.ones(states.shape[:2]),
                        eos_token_id=ids_config["eos_token_id"], pad_token_id=ids_config["pad_token_id"],
                        max_new_tokens=ANSWER_TOKENS, num_beams=1, do_sample=False)
                    for i, row in zip(rows, out):
                        answers[i] = self.tokenizer.decode(row[1:], skip_special_tokens=True).strip()
        return answers, time.perf_counter() - begin

    def onnx_answers(self, pipeline: VqaPipeline, pixels: np.ndarray, batch: int) -> tuple[list, float]:
        """(answers, seconds) of an export's pipeline on ONNX Runtime."""
        begin = time.perf_counter()
        answers = [a.answer for a in pipeline.answer(pixels, self.pairs, batch)]
        return answers, time.perf_counter() - begin

    def metrics(self, answers: list[str], base: list[str]) -> dict[str, float]:
        """Answer agreement with r=0 (normalised answers equal); VQA accuracy over the questions
        that have human answers."""
        metrics = {"answer_agreement": float(np.mean([normalize_answer(a) == normalize_answer(b)
                                                      for a, b in zip(answers, base)]))}
        scored = [vqa_accuracy(a, humans) for a, humans in zip(answers, self.humans) if humans]
        if scored:
            metrics["vqa_accuracy"] = float(np.mean(scored))
        return metrics

    @property
    def with_answers(self) -> int:
        """Questions that have human answers (those VQA accuracy is over)."""
        return sum(bool(humans) for humans in self.humans)
