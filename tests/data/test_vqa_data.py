"""VQA evaluation data: both question layouts, the official accuracy and answer normalisation,
and files that are neither, in one line."""

import json

import pytest
from PIL import Image

from turbo.core.errors import UsageError
from turbo.data.vqa import normalize_answer, vqa_accuracy, vqa_questions


def test_accuracy_is_the_official_leave_one_out_mean():
    humans = ("2",) * 3 + ("3",) * 7
    # each subset of 9 keeps 2 or 3 of the "2"s: (3 × min(1, 2/3) + 7 × 1) / 10
    assert vqa_accuracy("two", humans) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("A dog.", ("dog",)) == 1.0 and vqa_accuracy("dogs", ("dog",)) == 0.0


def test_normalisation():
    assert normalize_answer("  The Red, bus! ") == "red bus"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("Yes.") == "yes"
    assert normalize_answer("two") == "2" and normalize_answer("none") == "0"


def test_both_layouts(tmp_path):
    for name in ("COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    blip = tmp_path / "blip.json"
    blip.write_text(json.dumps([{"image": "COCO_val2014_000000000042.jpg", "question": "what?", "answer": ["a", "b"]},
                                {"image": "COCO_val2014_000000000007.jpg", "question": "who?", "answer": "c"},
                                {"image": "COCO_val2014_000000000007.jpg", "question": "why?"}]))
    questions = vqa_questions(blip, tmp_path)
    assert [(q.image.name[-6:], q.question, q.answers) for q in questions] == [
        ("42.jpg", "what?", ("a", "b")), ("07.jpg", "who?", ("c",)), ("07.jpg", "why?", ())]
    vqav2 = tmp_path / "vqav2.json"
    vqav2.write_text(json.dumps({
        "questions": [{"image_id": 42, "question": "what?", "question_id": 420}, {"image_id": 7, "question": "who?",
                                                                                  "question_id": 70}],
        "annotations": [{"question_id": 70, "answers": [{"answer": "me"}, {"answer": "you"}]}]}))
    questions = vqa_questions(vqav2, tmp_path)
    assert [(q.image.name, q.answers) for q in questions] == [("COCO_val2014_000000000042.jpg", ()),
                                                             ("COCO_val2014_000000000007.jpg", ("me", "you"))]


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read questions"),
    ('{"images": []}', "is not a BLIP or VQAv2 questions file"),
    ('[{"image": "x.jpg"}]', "is not a BLIP or VQAv2 questions file"),
    ('[{"image": "missing.jpg", "question": "what?"}]', "1 of 1 questions' images missing"),
    ('{"questions": [{"image_id": 5, "question": "what?", "question_id": 1}]}', "1 of 1 questions' images missing"),
    ('[{"image": "x.jpg", "question": " "}]', "1 questions are empty"),
    ("[]", "0 of 0"),
])
def test_bad_files_are_one_line(tmp_path, content, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as error:
        vqa_questions(path, tmp_path)
    assert "\n" not in str(error.value)
