"""`turbo eval` of an LLM-based VLM: greedy answers of each setting (vision merge r, reduction
inside the language model) against the unmerged, unreduced model's on the same prompts.

Label-free fidelity: token agreement (the share of the unreduced answer's positions where the
setting generated the same token) and answer agreement (the share of prompts whose normalised
answers are equal). With a VQA questions file whose questions have human answers, VQA accuracy
too. The baseline runs in PyTorch; a setting runs in PyTorch, or an export on ONNX Runtime.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from turbo.core.errors import UsageError
from turbo.data.images import Sample, image_folder, pixel_batch
from turbo.data.vqa import Question, normalize_answer, vqa_accuracy, vqa_questions
from turbo.merging.llm_drop import parse_llm_drop
from turbo.models.build import BuiltPlan, build_plan
from turbo.models.llm_plan import llm_plan
from turbo.models.loading import load_image_processor, load_model, load_tokenizer
from turbo.models.patch import apply_turbo
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids, split_prompt
from turbo.runtimes.llm_onnx import OnnxVlm

UNLABELED_QUESTION = "What is in the image?"

Answer = Callable[[np.ndarray, str], list[int]]  # (pixels (1, C, H, W), prompt) -> greedy token ids


@dataclass(frozen=True)
class Setting:
    r: int
    llm_drop: str  # as --llm-drop takes it


def prompts(data: Path, questions: Path | None, template: str, limit: int | None) -> list[Question]:
    """(image, question, human answers) to ask: the questions file's, or each image of `data` with
    one generic question; the template must hold {question} (and the image placeholder, where the
    model takes one)."""
    if "{question}" not in template:
        raise UsageError("--prompt must hold {question} where each question goes (and <image> once, where the "
                         "model takes a placeholder)")
    if questions is not None:
        asked = vqa_questions(questions, data)
    else:
        samples, _ = image_folder(data)
        asked = [Question(sample.path, UNLABELED_QUESTION, ()) for sample in samples]
    return asked[:limit] if limit else asked


def _torch_answerer(model, built: BuiltPlan, drop_text: str, tokenizer, max_tokens: int,
                    read: list[list[int]] | None = None) -> Answer:
    """Greedy answers of `model` re-patched for `built`'s merge, with `drop_text` inside its LLM;
    `read` gets the image tokens each LLM layer read, per answer."""
    language = built.source.adapter.language_model
    config = built.source.config
    image_tokens = language.image_tokens(config, built.plan.final_tokens)
    eos = language.special_ids(config).get("eos_token_id")
    generator = VlmGenerator(model, language, parse_llm_drop(drop_text), built.interpolate_pos_encoding)

    def answer(pixels: np.ndarray, prompt: str) -> list[int]:
        if getattr(model, "turbo_plan", None) is not built.plan:  # the settings share one model
            apply_turbo(model, built.source.adapter, built.plan, built.merge_config)
        ids = image_prompt_ids(tokenizer, prompt, language.image_token_id(config), image_tokens,
                               language.image_first)
        tokens = generator.generate(torch.from_numpy(pixels), torch.tensor([ids]), max_tokens, eos)[0].tolist()
        if read is not None:
            read.append(generator.image_per_layer)
        return tokens

    return answer


def _onnx_answerer(directory: Path, max_tokens: int, read: list[list[int]]) -> Answer:
    vlm = OnnxVlm.open(directory)
    record = vlm.record

    def answer(pixels: np.ndarray, prompt: str) -> list[int]:
        prefix, suffix = split_prompt(vlm.tokenizer, prompt, record.image_token_id, record.image_first)
        tokens = list(vlm.greedy_tokens(pixels, prefix, suffix, max_tokens))
        read.append(vlm.image_per_layer)
        return tokens

    return answer


def token_agreement(answer: list[int], reference: list[int]) -> float:
    """The share of the reference's positions where `answer` has the same token."""
    return sum(a == b for a, b in zip(answer, reference)) / max(len(reference), 1)


def run_generation_eval(model: str, data: Path, rs: list[int], llm_drop: str | None, questions: Path | None,
                        template: str | None, limit: int | None, max_tokens: int, random_weights: bool, tiny: bool,
                        method: str | None, alpha: float | None, threshold: int | None, seed: int,
                        export_dir: Path | None = None, progress=lambda message: None) -> dict:
    """Every setting's answers against the unreduced model's (r=0, --llm-drop none), in PyTorch."""
    base = build_plan(model, 0, method, alpha, "constant", threshold, tiny=tiny)
    template = template or base.source.adapter.language_model.question_prompt
    asked = prompts(data, questions, template, limit)
    if export_dir is not None:
        settings = [Setting(rs[0], llm_drop or "none")]
    else:
        settings = [Setting(r, llm_drop or "none") for r in rs]
    plans = {setting: build_plan(model, setting.r, method, alpha, "constant", threshold, tiny=tiny)
             for setting in settings}
    for setting, built in plans.items():
        llm_plan(built, parse_llm_drop(setting.llm_drop))  # an impossible reduction: one line, before any run
    tokenizer, _ = load_tokenizer(base.source, random_weights)
    processor, _ = load_image_processor(base.source, base.image_size, random_weights)
    torch_model = load_model(base.source, random_weights=random_weights, seed=seed)
    answerers = {Setting(0, "none"): _torch_answerer(torch_model, base, "none", tokenizer, max_tokens)}
    read: dict[Setting, list[list[int]]] = {setting: [] for setting in plans}  # image tokens per LLM layer
    for setting, built in plans.items():
        answerers[setting] = _onnx_answerer(export_dir, max_tokens, read[setting]) if export_dir is not None else \
            _torch_answerer(torch_model, built, setting.llm_drop, tokenizer, max_tokens, read[setting])
    pixels = {question.image: pixel_batch([Sample(question.image)], processor, base.pixel_shape[0])
              for question in asked}
    answers, seconds = {}, {}
    for setting, answer in answerers.items():
        progress(f"answering {len(asked)} prompts at r={setting.r}, --llm-drop {setting.llm_drop}")
        begin = time.perf_counter()
        answers[setting] = [answer(pixels[q.image], template_prompt(template, q)) for q in asked]
        seconds[setting] = time.perf_counter() - begin
    reference = answers[Setting(0, "none")]
    decode = lambda ids: normalize_answer(tokenizer.decode(ids, skip_special_tokens=True))  # noqa: E731
    labelled = [i for i, q in enumerate(asked) if q.answers]
    results = []
    for setting, given in answers.items():
        built = base if setting == Setting(0, "none") else plans[setting]
        plan = llm_plan(built, parse_llm_drop(setting.llm_drop))
        if plan.drop.method == "mustdrop":  # counts decided per prompt: the mean of what each read
            plan = replace(plan, image_per_layer=tuple(round(float(np.mean(layer))) for layer in zip(*read[setting])))
        texts = [decode(ids) for ids in given]
        metrics = {
            "token_agreement": float(np.mean([token_agreement(a, b) for a, b in zip(given, reference)])),
            "answer_agreement": float(np.mean([t == decode(b) for t, b in zip(texts, reference)])),
        }
        if labelled:
            metrics["vqa_accuracy"] = float(np.mean([vqa_accuracy(texts[i], asked[i].answers) for i in labelled]))
        vision_flops = base.plan.flops + plan.baseline_prefill_flops
        results.append({
            "r": setting.r, "llm_drop": setting.llm_drop,
            "runtime": "onnxruntime" if export_dir is not None and setting != Setting(0, "none") else "torch",
            "final_tokens": built.plan.final_tokens, "image_tokens": list(plan.image_per_layer),
            "flops_bound": vision_flops / (built.plan.flops + plan.prefill_flops),
            "images_per_s": len(asked) / seconds[setting], "metrics": metrics,
        })
    return {"model": base.source.name, "source": base.source.location, "task": "image-text-generation",
            "random_weights": random_weights, "export": str(export_dir) if export_dir else None, "data": str(data),
            "samples": len({q.image for q in asked}), "questions": len(asked) if questions else None,
            "questions_with_answers": len(labelled) if questions else None, "prompt": template,
            "max_tokens": max_tokens, "results": results, "auto": None, "choice": None}


def template_prompt(template: str, question: Question) -> str:
    return template.replace("{question}", question.question)
