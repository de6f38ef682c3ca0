"""`turbo caption`: one caption per image from an export directory, on ONNX Runtime."""

import time

from turbo.cli.output import print_json, stderr

NOISE_WARNING = ("this export has random weights (--random-weights): its captions are noise, "
                 "and its tokenizer is a placeholder vocabulary")


def run_caption_command(directory: str, images: list[str], beams: int | None, max_length: int | None,
                        min_length: int | None, prompt: str, batch: int, json_output: bool) -> None:
    from pathlib import Path

    from turbo.core.errors import UsageError
    from turbo.data.images import Sample, pixel_batch
    from turbo.runtimes.caption import CaptionPipeline

    for name, value, least in (("--beams", beams, 1), ("--max-length", max_length, 1), ("--min-length", min_length, 0),
                               ("--batch", batch, 1)):
        if value is not None and value < least:
            raise UsageError(f"{name} must be at least {least}, not {value}")
    if max_length is not None and min_length is not None and min_length > max_length:
        raise UsageError(f"--min-length {min_length} is above --max-length {max_length}")
    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise UsageError(f"no such image file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                 else ""))
    pipeline = CaptionPipeline.open(directory)
    pixels = pixel_batch([Sample(Path(image)) for image in images], pipeline.processor)
    if pipeline.random_weights:
        stderr.print(f"[yellow]warning:[/] {NOISE_WARNING}", highlight=False)
    begin = time.perf_counter()
    results = pipeline.caption(pixels, prompt, batch, num_beams=beams, max_new_tokens=max_length,
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
