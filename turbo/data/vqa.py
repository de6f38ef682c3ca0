"""VQA evaluation data: questions about images and their human answers, read from the layouts
they ship in, and the VQA accuracy metric with its answer normalisation."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from turbo.core.errors import UsageError


@dataclass(frozen=True)
class Question:
    image: Path
    question: str
    answers: tuple[str, ...]  # the human answers (empty: none given, fidelity only)


def vqa_questions(path: str | Path, image_root: str | Path) -> list[Question]:
    """Questions from a JSON file in one of two layouts: BLIP's (a list of `image`, `question` and
    optionally `answer`, one string or a list) or VQAv2's (`questions` with `image_id`, `question`,
    `question_id`, and optionally `annotations` with `question_id` and `answers[].answer` in the
    same file; image files are found under `image_root` by the id in their name, as COCO names
    them). A file in neither layout, or naming missing images, is one line saying so."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read questions {path} ({exc.__class__.__name__})") from None
    root = Path(image_root)
    try:
        questions = _blip_layout(data, root) if isinstance(data, list) else _vqav2_layout(data, root)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UsageError(f"{path} is not a BLIP or VQAv2 questions file ({exc.__class__.__name__}: {exc}); see "
                         "docs/guides/eval.md") from None
    missing = [q.image for q in questions if not q.image.is_file()]
    if not questions or missing:
        raise UsageError(f"{path}: {len(missing)} of {len(questions)} questions' images missing under {root}"
                         + (f" (first: {missing[0]})" if missing else ""))
    empty = sum(not q.question.strip() for q in questions)
    if empty:
        raise UsageError(f"{path}: {empty} questions are empty")
    return questions


def _answers(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(a) for a in value)


def _blip_layout(data: list, root: Path) -> list[Question]:
    return [Question(root / item["image"], str(item["question"]), _answers(item.get("answer", item.get("answers"))))
            for item in data]


def _vqav2_layout(data: dict, root: Path) -> list[Question]:
    answers = {ann["question_id"]: tuple(str(a["answer"]) for a in ann["answers"])
               for ann in data.get("annotations", [])}
    files = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digits = re.findall(r"\d+", file.stem)
        if digits:
            files.setdefault(int(digits[-1]), file)
    return [Question(files.get(int(item["image_id"]), root / f"missing image {item['image_id']}"),
                     str(item["question"]), answers.get(item["question_id"], ())) for item in data["questions"]]


# The official VQA evaluation's answer normalisation (contractions left out: answers are compared
# after lower-casing, punctuation removal, number words to digits and article removal)
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|':]")


def normalize_answer(answer: str) -> str:
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PUNCTUATION.sub(" ", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)  # full stops, not decimal points
    words = [_NUMBERS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(answer: str, humans: tuple[str, ...]) -> float:
    """VQA accuracy of one answer: min(1, humans who gave it / 3), averaged over every subset that
    leaves one human answer out (the official metric; one human answer: exact match)."""
    given = normalize_answer(answer)
    normalized = [normalize_answer(h) for h in humans]
    if len(normalized) == 1:
        return float(given == normalized[0])
    scores = []
    for left_out in range(len(normalized)):
        matches = sum(h == given for i, h in enumerate(normalized) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
