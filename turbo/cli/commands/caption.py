"""`turbo caption`: one caption per image from an export directory, on ONNX Runtime."""

import time

from turbo.cli.output import print_json, stderr

NOISE_WARNING = ("this export has random weights (--random-weights): its captions are noise, "
                 "and its tokenizer is a placeholder vocabulary")


def run_caption_command(directory: str, images: list[str], beams: int | None, max_length: int | None,
                        min_length: int | None, prompt: str, batch: int, json_output: bool) -> None:
    from turbo.runtimes.caption import CaptionPipeline, check_caption_settings

    check_caption_settings(batch, beams, max_length, min_length)
    pipeline = CaptionPipeline.open(directory)
    if pipeline.random_weights:
        stderr.print(f"[yellow]warning:[/] {NOISE_WARNING}", highlight=False)
    begin = time.perf_counter()
    results = pipeline.caption_files(images, prompt, batch, num_beams=beams, max_new_tokens=max_length,
                                     min_new_tokens=min_length)
    seconds = time.perf_counter() - begin
    settings = pipeline.settings
    if json_output:
        print_json({
            "directory": directory, "random_weights": pipeline.random_weights, "prompt": prompt,
            "num_beams": beams or settings.num_beams, "max_new_tokens": max_length or settings.max_new_tokens,
            "min_new_tokens": settings.min_new_tokens if min_length is None else min_length,
            "seconds": round(seconds, 3),
            "captions": [{"image": image, **result} for image, result in zip(images, results)],
        })
    else:
        for image, result in zip(images, results):
            print(f"{image}\t{result['caption']}")
    stderr.print(f"{len(images)} captions in {seconds:.2f} s ({len(images) / seconds:.2f} images/s, onnxruntime)",
                 highlight=False)
