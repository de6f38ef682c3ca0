"""Time to first token and decode speed of an LLM-based VLM in PyTorch on CPU, for vision-side
merges and LLM-side drops, against the unreduced model: one model (random weights), the settings
interleaved round by round (A B C A B C ...), medians.

    python benchmarks/llava_generate.py --model llava-interleave-qwen-0.5b --rounds 3 \\
        --settings 0:none 12:none 0:fastv 0:pyramid 12:pyramid
    python benchmarks/llava_generate.py --model blip2-opt-2.7b --rounds 2 --new-tokens 8 \\
        --settings 0:none 16:none 16:pyramid

    python benchmarks/llava_generate.py --model llava-1.5-7b --dtype bfloat16 --rounds 2 \
        --settings 0:none 0:mustdrop 0:pyramid:keep=0.2

Each setting is R:LLM_DROP (LLM_DROP as `turbo generate --llm-drop` takes it). Decoding runs a
fixed number of tokens (no end-of-text stop), so every setting decodes as many. `--dtype bfloat16`
builds the model in bf16 (LLaVA-1.5-7B: 14 GB instead of 28). Image tokens are those the LLM read
(MustDrop decides them per image and prompt), the FLOPs bounds are counted from them.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from turbo.merging.llm_drop import parse_llm_drop
from turbo.models.build import build_plan
from turbo.models.llm_plan import llm_plan
from turbo.models.loading import load_model
from turbo.models.patch import apply_turbo
from turbo.runtimes.llm_generation import VlmGenerator

TEXT_TOKENS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-interleave-qwen-0.5b")
    parser.add_argument("--settings", nargs="+", default=["0:none", "12:none", "0:fastv", "0:pyramid", "12:pyramid"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_plan(args.model, r=0)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # the random weights are built in it
    model = load_model(base.source, random_weights=True)
    torch.set_default_dtype(torch.float32)
    language = base.source.adapter.language_model
    config = base.source.config
    pixels = torch.randn(1, *base.pixel_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    vocab = language.text_config(config).vocab_size
    runs = []
    for setting in args.settings:
        r, _, drop_text = setting.partition(":")
        built = build_plan(args.model, r=int(r))
        drop = parse_llm_drop(drop_text or "none")
        plan = llm_plan(built, drop, TEXT_TOKENS)
        text = torch.randint(0, 1000, (1, TEXT_TOKENS), generator=torch.Generator().manual_seed(1)) % vocab
        image = torch.full((1, plan.image_tokens), language.image_token_id(config))
        before = 0 if language.image_first else 8  # a template before the image (BLIP-2: none), the question
        ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
        runs.append({"setting": setting, "built": built, "drop": drop, "plan": plan, "ids": ids,
                     "first_token_s": [], "decode_tokens_per_s": []})
    for _ in range(args.rounds):
        for run in runs:
            apply_turbo(model, base.source.adapter, run["built"].plan, run["built"].merge_config)
            generator = VlmGenerator(model, language, run["drop"])
            begin = time.perf_counter()
            stream = generator.stream(pixels, run["ids"], args.new_tokens)
            next(stream)
            first = time.perf_counter() - begin
            decoded = sum(1 for _ in stream)
            run["first_token_s"].append(first)
            run["decode_tokens_per_s"].append(decoded / (time.perf_counter() - begin - first))
            run["plan"] = replace(run["plan"], image_per_layer=tuple(generator.image_per_layer))  # what it read
    baseline = statistics.median(runs[0]["first_token_s"])
    base_flops = base.plan.flops + runs[0]["plan"].baseline_prefill_flops  # the unmerged tower and prefill
    for run in runs:
        plan = run["plan"]
        first = statistics.median(run["first_token_s"])
        print(json.dumps({
            "setting": run["setting"], "image_tokens": plan.image_tokens, "last_layer_image_tokens":
                plan.image_per_layer[-1], "first_token_s": round(first, 3),
            "first_token_speedup": round(baseline / first, 2),
            "decode_tokens_per_s": round(statistics.median(run["decode_tokens_per_s"]), 2),
            "first_token_flops_bound": round(base_flops / (run["built"].plan.flops + plan.prefill_flops), 2),
            "prefill_flops_bound": round(plan.baseline_prefill_flops / plan.prefill_flops, 2),
            "vision_flops_bound": round(run["built"].plan.speedup_bound, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
