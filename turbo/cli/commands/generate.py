"""`turbo generate`: stream an LLM-based VLM's answer about one image."""

import sys
from pathlib import Path

from turbo.cli.output import print_json, stderr

NOISE_WARNING = ("random weights (--random-weights): the answer is noise, and the tokenizer a placeholder "
                 "vocabulary")


def run_generate_command(model: str, image: str, prompt: str, r: int | None, method: str | None,
                         alpha: float | None, threshold: int | None, llm_drop: str | None, max_new_tokens: int,
                         random_weights: bool, tiny: bool, json_output: bool) -> None:
    from turbo.tools.generate import GenerateOptions, Generation, prepare_generation, stream_generation

    options = GenerateOptions(model, Path(image), prompt, r, method, alpha, threshold=threshold, llm_drop=llm_drop,
                              max_new_tokens=max_new_tokens, random_weights=random_weights, tiny=tiny)
    prepared = prepare_generation(options)
    if prepared.random_weights:
        stderr.print(f"[yellow]warning:[/] {NOISE_WARNING}", highlight=False)
    result = Generation()
    for piece in stream_generation(prepared, max_new_tokens, result):
        if not json_output:
            sys.stdout.write(piece)
            sys.stdout.flush()
    plan = result.plan
    if json_output:
        print_json({"model": model, "image": image, "prompt": prompt, "random_weights": prepared.random_weights,
                    "text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                    "first_token_s": round(result.first_token_s, 4), "seconds": round(result.seconds, 4),
                    "decode_tokens_per_s": round(result.decode_tokens_per_s, 2), "runtime": prepared.runtime,
                    **plan.to_dict()})
    else:
        print()
    stderr.print(f"{len(result.token_ids)} tokens; first after {result.first_token_s:.2f} s, then "
                 f"{result.decode_tokens_per_s:.1f} tokens/s ({prepared.runtime}); the LLM read {plan.image_tokens} "
                 f"image tokens of {plan.unmerged_image_tokens} ({plan.drop.label}: {plan.image_per_layer[-1]} in its "
                 "last layer)", highlight=False)
