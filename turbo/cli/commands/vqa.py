"""`turbo vqa`: answers to questions about one image from a VQA export, on ONNX Runtime."""

import time
from pathlib import Path

from turbo.cli.output import print_json, stderr
from turbo.core.errors import UsageError

NOISE_WARNING = ("this export has random weights (--random-weights): its answers are noise, "
                 "and its tokenizer is a placeholder vocabulary")


def run_vqa_command(directory: str, image: str, questions: list[str], beams: int | None, max_length: int | None,
                    batch: int, json_output: bool) -> None:
    from turbo.data.images import Sample, pixel_batch
    from turbo.runtimes.caption import check_caption_settings
    from turbo.runtimes.vqa import VqaPipeline

    check_caption_settings(batch, beams, max_length)
    empty = [i + 1 for i, question in enumerate(questions) if not question.strip()]
    if empty:
        raise UsageError(f"question {empty[0]} is empty; give each question as one non-empty argument")
    if not Path(image).is_file():
        raise UsageError(f"no such image file: {image}")
    pipeline = VqaPipeline.open(directory)
    if pipeline.random_weights:
        stderr.print(f"[yellow]warning:[/] {NOISE_WARNING}", highlight=False)
    begin = time.perf_counter()
    pixels = pixel_batch([Sample(Path(image))], pipeline.processor)
    answers = pipeline.answer(pixels, [(0, question) for question in questions], batch, num_beams=beams,
                              max_new_tokens=max_length)
    seconds = time.perf_counter() - begin
    truncated = sum(answer.truncated for answer in answers)
    if truncated:
        stderr.print(f"note: {truncated} question(s) longer than {pipeline.question.max_length} tokens were "
                     "truncated, as the model was trained", highlight=False)
    if json_output:
        print_json({
            "directory": directory, "image": image, "random_weights": pipeline.random_weights,
            "num_beams": beams or pipeline.settings.num_beams,
            "max_new_tokens": max_length or pipeline.settings.max_new_tokens, "seconds": round(seconds, 3),
            "answers": [vars(answer) for answer in answers],
        })
    else:
        for answer in answers:
            print(f"{answer.question}\t{answer.answer}")
    stderr.print(f"{len(answers)} answers in {seconds:.2f} s (onnxruntime)", highlight=False)
