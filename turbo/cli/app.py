"""The `turbo` command line. Commands parse, call and present; heavy imports stay inside them."""

import typer

from turbo import __version__
from turbo.cli.output import OneLineUsageErrors, user_errors

METHOD_HELP = "turbo | tome | semantic | pitome | none (default: the model's; tome for models without a CLS token)."
LLM_DROP_HELP = ("Image-token reduction inside the language model: none | fastv[:layer=K,ratio=R] (defaults 2, 0.5) "
                 "| pyramid[:stages=S,keep=λ] (defaults 4, 0.5) | dyrate[:layer=K,coverage=c,min_keep=m,"
                 "predictor=FILE] (defaults 2, 0.95, 0.1; PyTorch only) | mustdrop[:layer=K,every=E,stages=S,"
                 "global_thr=g,individual_thr=i,key=k,window=w,spatial_thr=t] (defaults 2, 4, 4, 0.011, 0.01, 0.08, "
                 "3, 0.8; PyTorch only).")
IMAGE_SIZE_HELP = "Input size, H or HxW like 224x320 (default: the model's image processor's, else its config's)."

app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Turbo token merging for ViT-family and BLIP models: plan, export and profile merged models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"turbo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Exit codes: 0 ok, 1 error, 2 usage, 3 validation failed, 4 missing GPU or TensorRT."""


@app.command("models")
@user_errors
def models_command(
    json_output: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the model registry: name, HF id, image size, tokens, layers, default r and alpha."""
    from turbo.cli.commands.models import run_models

    run_models(json_output)


@app.command("plan")
@user_errors
def plan_command(
    model: str = typer.Option("blip-caption", "--model", "-m", help="Registry name, HF id or local model directory."),
    r: int | None = typer.Option(None, "--r", help="Tokens merged per layer (default: the model's)."),
    method: str | None = typer.Option(None, "--method", help=METHOD_HELP),
    alpha: float | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing | per-layer list like 8,8,4,4."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    image_size: str | None = typer.Option(None, "--image-size", help=IMAGE_SIZE_HELP),
    tiny: bool = typer.Option(False, "--tiny", help="The registry model's 4-layer tiny variant (CI smoke checks)."),
    llm_drop: str = typer.Option("none", "--llm-drop", help="LLM-based VLMs: " + LLM_DROP_HELP),
    prompt_tokens: int = typer.Option(40, "--prompt-tokens", help="LLM-based VLMs: the prompt's text tokens."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Per-layer tokens and FLOPs, final tokens and the FLOPs speedup bound; for LLM-based VLMs also
    the image tokens per LLM layer and the prefill and decode FLOPs bounds. Needs no weights."""
    from turbo.cli.commands.export import parse_image_size
    from turbo.cli.commands.plan import run_plan

    run_plan(model, r, method, alpha, schedule, threshold, parse_image_size(image_size), tiny, llm_drop,
             prompt_tokens, json_output)


@app.command("export")
@user_errors
def export_command(
    output: str = typer.Option(..., "--output", "-o", help="Output directory (refused if not empty, unless --force)."),
    model: str = typer.Option("blip-caption", "--model", "-m", help="Registry name, HF id or local model directory."),
    r: str | None = typer.Option(None, "--r", help="Tokens merged per layer (default: the model's), or 'auto'."),
    data: str | None = typer.Option(None, "--data", help="--r auto, --method auto, --alpha auto: calibration "
                                    "images to choose on (see turbo eval)."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="--r auto: the largest drop allowed."),
    metric: str | None = typer.Option(None, "--metric", help="auto choices: accuracy | fidelity (default: fidelity "
                                      "for --r auto alone, else accuracy when the data has labels)."),
    method: str | None = typer.Option(None, "--method", help=METHOD_HELP + " 'auto': the best on --data."),
    alpha: str | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's), or "
                                     "'auto': the best of 0.1, 0.5, 1, 5 on --data."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant | decreasing | per-layer list like 8,8,4,4."),
    merge_kernel: str = typer.Option("matmul", "--merge-kernel", help="matmul (no scatter ops) | scatter."),
    merge_op: str = typer.Option(
        "function", "--merge-op", help="function: one turbo::TurboMerge node per layer (a local function) | inline."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset, 18..23 (default 20; 21 with --quant)."),
    batch: str = typer.Option("dynamic", "--batch", help="Static batch size, or 'dynamic' for a dynamic batch axis."),
    image_size: str | None = typer.Option(None, "--image-size", help=IMAGE_SIZE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 (half-precision graph for GPU runtimes); "
                                  "with --trt the engine's: fp32 | fp16 | bf16 | int8 (int8 needs --quant int8)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights from the config (speed work)."),
    tiny: bool = typer.Option(False, "--tiny", help="The registry model's 4-layer tiny variant (CI smoke checks)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime with PyTorch."),
    decoder: bool = typer.Option(True, "--decoder/--no-decoder", help="BLIP: also export the text decoder; LLaVA: "
                                 "the language model (--no-decoder: the vision encoder only)."),
    llm_drop: str = typer.Option("none", "--llm-drop", help="LLaVA: " + LLM_DROP_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest (turbo.json) on stdout."),
    quant: str | None = typer.Option(None, "--quant", help="Weight-only quantization of the encoder Linears: "
                                     "gptq-int4 | gptq-int8 | rtn-int4 (needs --calib)."),
    group_size: int | None = typer.Option(None, "--group-size", help="--quant: input columns per weight scale "
                                          "(default 128)."),
    act_order: bool = typer.Option(False, "--act-order", help="--quant gptq-*: columns by decreasing Hessian "
                                   "diagonal (static groups)."),
    calib: str | None = typer.Option(None, "--calib", help="--quant: calibration images (folder, searched "
                                     "recursively, or HF datasets directory), or a COCO-format captions .json "
                                     "(BLIP's decoder calibrates on its captions); 'synthetic' for smoke tests only."),
    calib_images: str | None = typer.Option(None, "--calib-images", help="--calib FILE.json: its image root "
                                            "(default: the file's folder)."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="--quant: calibration images used (default "
                                          "128)."),
    quant_heads: bool = typer.Option(False, "--quant-heads", help="--quant gptq-*/rtn-*: also the ViT classifier "
                                     "and BLIP's LM head (left fp32 by default, as the patch embedding always is)."),
    calib_seed: int | None = typer.Option(None, "--calib-seed", help="--quant: seed of the calibration sample "
                                          "(default 0)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (model.plan) from the validated "
                             "ONNX and validate it against ONNX Runtime (needs TensorRT and an NVIDIA GPU)."),
    trt_merge: str | None = typer.Option(None, "--trt-merge", help="--trt: plugin (turbo::TurboMerge, Triton "
                                         "kernel; the default) | native (the merge as TensorRT layers)."),
    workspace: float | None = typer.Option(None, "--workspace", help="--trt: builder workspace limit in GB "
                                           "(default 4)."),
    min_batch: int | None = typer.Option(None, "--min-batch", help="--trt: profile minimum batch (default 1)."),
    opt_batch: int | None = typer.Option(None, "--opt-batch", help="--trt: batch the engine is tuned for (default 8)."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="--trt: profile maximum batch (default 64)."),
) -> None:
    """Export the merged model to validated, static-shape ONNX with a turbo.json manifest.

    Exit code 3 when validation fails (the directory is still written, its manifest says failed);
    4 when --trt is asked for where TensorRT or a GPU is missing (the validated ONNX is still written).
    """
    from pathlib import Path

    from turbo.cli.commands.eval import merge_settings
    from turbo.cli.commands.export import given, parse_batch, parse_image_size, parse_r, run_export_command
    from turbo.core.errors import UsageError
    from turbo.export.options import ExportOptions
    from turbo.export.tensorrt.stage import TrtOptions
    from turbo.tools.eval import AutoChoice

    engine = given(workspace_gb=workspace, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                   merge=trt_merge)
    calibration = given(group_size=group_size, calib=calib, calib_images=calib_images, calib_size=calib_size,
                        calib_seed=calib_seed)
    if not trt and engine:
        raise UsageError("--workspace, --min-batch, --opt-batch, --max-batch and --trt-merge belong to --trt")
    if quant is None and calibration:
        raise UsageError("--group-size, --calib, --calib-images, --calib-size and --calib-seed belong to --quant")
    trt_options = TrtOptions(precision, validate=validate, **engine) if trt else None
    settings = merge_settings(model, method, alpha, [], tiny)
    chosen = parse_r(r, data, max_drop, metric, choosing=settings.choose)
    options = ExportOptions(model=model, r=None if chosen == "auto" else chosen, method=settings.method,
                            alpha=settings.alpha,
                            threshold=threshold, schedule=schedule, kernel=merge_kernel, opset=opset,
                            batch=parse_batch(batch), image_size=parse_image_size(image_size),
                            random_weights=random_weights,
                            trt=trt_options, precision=None if trt else precision, validate=validate, tiny=tiny,
                            merge_op=merge_op, quant=quant, act_order=act_order, quant_heads=quant_heads,
                            decoder=decoder, llm_drop=llm_drop, **calibration)
    auto = AutoChoice(Path(data), max_drop, metric, settings.candidates) if data is not None else None
    run_export_command(options, auto, output, force, json_output)


@app.command("bench")
@user_errors
def bench_command(
    dirs: list[str] | None = typer.Argument(None, help="Exported directories to bench (ONNX Runtime)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Registry name, HF id or local model directory "
                                     "(default blip-caption)."),
    r: str | None = typer.Option(None, "--r", help="Comma-separated r values; 0 is always added (default: 0,model's)."),
    method: str | None = typer.Option(None, "--method", help=METHOD_HELP),
    alpha: float | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's)."),
    runtime: str = typer.Option("all", "--runtime", help="torch | ort | trt | all (comma-separated works too)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes, e.g. 1,8,64."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 (bf16: torch only)."),
    warmup: float = typer.Option(1.0, "--warmup", help="Warm-up seconds per model before timing."),
    iters: int | None = typer.Option(None, "--iters", help="Timed rounds (default 20 unless --duration)."),
    duration: float | None = typer.Option(None, "--duration", help="Time for this many seconds instead of --iters."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights from the config."),
    include_transfers: bool = typer.Option(False, "--include-transfers", help="Time host-to-device input copies."),
    caption: bool = typer.Option(True, "--caption/--no-caption", help="BLIP: also time greedy caption generation."),
    caption_tokens: int = typer.Option(20, "--caption-tokens", help="Fixed caption length for the caption workload."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch and ORT (default: all)."),
    ort_merge: str = typer.Option("auto", "--ort-merge",
                                  help="ORT CPU: fused (one C kernel per merge) | graph (its ONNX function) | auto."),
    torch_merge: str = typer.Option("auto", "--torch-merge",
                                    help="PyTorch: fused (C kernel on CPU fp32, Triton on CUDA) | ops | auto."),
    cuda_graph: bool | None = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                           help="PyTorch on CUDA: replay the image forward as one CUDA graph "
                                                "(default) or run it eagerly."),
    baseline: str | None = typer.Option(None, "--baseline", help="r=0 export to compare DIRs against (with --url: "
                                        "the served model to compare with)."),
    url: str | None = typer.Option(None, "--url", help="Load-test a running Triton server (http://HOST:PORT or "
                                   "grpc://HOST:PORT): --model names its models, comma-separated."),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="--url: concurrent clients, e.g. 1,8,32."),
    json_output: bool = typer.Option(False, "--json", help="Print the report on stdout (docs/bench.schema.json)."),
    plot: str | None = typer.Option(None, "--plot", help="Write speedup and efficiency vs r to this PNG."),
) -> None:
    """Latency, throughput, speedup vs r=0, FLOPs bound and efficiency, merged and baseline interleaved.

    With --url: throughput, p50/p95/p99 latency and errors of served models per concurrency level.
    Exit code 4 when none of the requested runtimes can run here.
    """
    from pathlib import Path

    from turbo.cli.commands.bench import parse_ints, parse_runtimes, run_bench_command, run_load_test_command
    from turbo.cli.commands.export import given
    from turbo.core.errors import UsageError
    from turbo.tools.bench import BenchOptions

    levels = tuple(parse_ints(concurrency, "--concurrency", least=1, example="1,8,32"))
    if url:
        from turbo.runtimes.triton_client import split_url
        from turbo.tools.load_test import LoadOptions

        split_url(url)
        if dirs or given(r=r, method=method, alpha=alpha):
            raise UsageError("--url benches the server's models: drop export directories, --r, --method and --alpha")
        batches = parse_ints(batch, "--batch", least=1, example="1")
        if len(batches) != 1:
            raise UsageError("--url takes one --batch (images per request)")
        models = [name for name in (model or "").split(",") if name]
        load = LoadOptions(url=url, models=models, concurrency=levels, duration_s=duration or 10.0, batch=batches[0],
                           baseline=baseline)
        run_load_test_command(load, json_output, plot)
        return
    if dirs and given(model=model, r=r, method=method, alpha=alpha):
        raise UsageError("export directories carry their model, r and merge; drop --model, --r, --method and --alpha "
                         "(or bench --model without directories)")
    options = BenchOptions(
        model=model or "blip-caption", rs=parse_ints(r, "--r") if r else None, method=method, alpha=alpha,
        runtimes=None if runtime == "all" else parse_runtimes(runtime), device=device,
        batches=tuple(parse_ints(batch, "--batch", least=1, example="1,8,64")), precision=precision, warmup_s=warmup,
        iters=iters, duration_s=duration,
        random_weights=random_weights, include_transfers=include_transfers, caption=caption,
        caption_tokens=caption_tokens, threads=threads, ort_merge=ort_merge, torch_merge=torch_merge,
        cuda_graph=cuda_graph, export_dirs=[Path(d) for d in dirs or []],
        baseline_dir=Path(baseline) if baseline else None,
    )
    run_bench_command(options, json_output, plot)


@app.command("eval")
@user_errors
def eval_command(
    arguments: list[str] | None = typer.Argument(None, help="An export directory (run on ONNX Runtime), not --model; "
                                                  "or more --sweep KEY=VALUES.", show_default=False),
    data: str = typer.Option(..., "--data", help="Image folder: class folders (labels) or loose images."),
    model: str | None = typer.Option(None, "--model", "-m", help="Registry name, HF id or local model directory "
                                     "(default vit-b16)."),
    r: str | None = typer.Option(None, "--r", help="Comma-separated r values, or 'auto' with --max-drop."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="--r auto: the largest drop allowed."),
    metric: str | None = typer.Option(None, "--metric", help="What --r auto bounds and --method/--alpha auto "
                                      "maximise: accuracy | fidelity (default: fidelity for --r auto alone, else "
                                      "accuracy when the data has labels)."),
    method: str | None = typer.Option(None, "--method", help=METHOD_HELP + " 'auto': compare them all at one r."),
    alpha: str | None = typer.Option(None, "--alpha", help="turbo's semantic weight (authors' scale), or 'auto': "
                                     "compare 0.1, 0.5, 1 and 5."),
    sweep: str | None = typer.Option(None, "--sweep", help="A grid to tabulate: method=tome,turbo,pitome "
                                     "alpha=0.1,1,5 fusion=s1,s2 r=8,12,16 (α and fusion apply to turbo)."),
    plot: str | None = typer.Option(None, "--plot", help="With --sweep: write a PNG of the metric vs the FLOPs "
                                    "bound, one line per setting."),
    labels: str | None = typer.Option(None, "--labels", help="Class folder names in label order, one per line."),
    captions: str | None = typer.Option(None, "--captions", help="BLIP: COCO-format caption annotations JSON."),
    questions: str | None = typer.Option(None, "--questions", help="VQA: a VQAv2 or BLIP questions (and answers) "
                                         "JSON about the images under --data."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N images only."),
    batch: int = typer.Option(16, "--batch", help="Images per forward."),
    beams: int = typer.Option(1, "--beams", help="BLIP: beam search width (1 = greedy)."),
    max_tokens: int = typer.Option(20, "--max-tokens", help="BLIP: caption length limit; LLaVA: answer length limit."),
    llm_drop: str | None = typer.Option(None, "--llm-drop", help="LLaVA: " + LLM_DROP_HELP + " Default none."),
    prompt: str | None = typer.Option(None, "--prompt", help="LLaVA: the prompt, with <image> and {question} "
                                      "(default: LLaVA-1.5's short-answer prompt)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights (pipeline checks only)."),
    tiny: bool = typer.Option(False, "--tiny", help="The registry model's tiny variant (tests)."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report on stdout."),
) -> None:
    """Task metrics and fidelity of merged models vs r=0 on the same images; --r auto picks r,
    --method auto / --alpha auto the merge, --sweep tabulates a grid of settings."""
    from pathlib import Path

    from turbo.cli.commands.bench import parse_ints
    from turbo.cli.commands.eval import merge_settings, run_eval_command, split_eval_arguments
    from turbo.cli.commands.export import given
    from turbo.core.errors import UsageError
    from turbo.tools.eval import EvalOptions

    if (r == "auto") != (max_drop is not None):
        raise UsageError("--r auto and --max-drop go together")
    directory, sweep_items = split_eval_arguments(arguments or [], sweep)
    if directory and given(model=model, r=r, threshold=threshold, method=method, alpha=alpha, sweep=sweep):
        raise UsageError(f"{directory} is an export: its model, r, merge and threshold are in its manifest; drop "
                         "--model, --r, --method, --alpha, --sweep and --threshold")
    settings = merge_settings(model or "vit-b16", method, alpha, sweep_items, tiny)
    rs = None if r in (None, "auto") else parse_ints(r, "--r")
    if settings.rs is not None and rs is not None:
        raise UsageError("give r either in --sweep or with --r, not both")
    options = EvalOptions(
        model=model or "vit-b16", data=Path(data), rs=settings.rs if settings.rs is not None else rs,
        max_drop=max_drop, method=settings.method, alpha=settings.alpha, candidates=settings.candidates,
        choose=settings.choose,
        metric=metric, labels_file=Path(labels) if labels else None, captions=Path(captions) if captions else None,
        questions=Path(questions) if questions else None, limit=limit, batch=batch, beams=beams,
        max_tokens=max_tokens, random_weights=random_weights, tiny=tiny,
        threshold=threshold, export_dir=Path(directory) if directory else None, llm_drop=llm_drop, prompt=prompt,
    )
    run_eval_command(options, json_output, plot)


@app.command("caption")
@user_errors
def caption_command(
    directory: str = typer.Argument(..., help="A BLIP `turbo export` output directory."),
    images: list[str] = typer.Argument(..., help="Image files to caption."),
    beams: int | None = typer.Option(None, "--beams", help="Beam search width (1: greedy; BLIP's COCO setting is 3). "
                                     "Default: the export's generation_config.json (greedy)."),
    max_length: int | None = typer.Option(None, "--max-length", help="At most this many tokens after the prompt "
                                          "(default 20)."),
    min_length: int | None = typer.Option(None, "--min-length", help="At least this many tokens after the prompt."),
    prompt: str = typer.Option("a picture of", "--prompt", help="Text the caption continues ('' for none)."),
    batch: int = typer.Option(8, "--batch", help="Images per encoder/decoder run."),
    json_output: bool = typer.Option(False, "--json", help="Print captions, token ids and settings as JSON."),
) -> None:
    """Caption images with an export's vision encoder and text decoder on ONNX Runtime (one line each)."""
    from turbo.cli.commands.caption import run_caption_command

    run_caption_command(directory, images, beams, max_length, min_length, prompt, batch, json_output)


@app.command("vqa")
@user_errors
def vqa_command(
    directory: str = typer.Argument(..., help="A BLIP VQA `turbo export` directory (e.g. blip-vqa)."),
    image: str = typer.Argument(..., help="The image the questions are about."),
    questions: list[str] = typer.Argument(..., help="One or more questions, each one argument (quote them)."),
    beams: int | None = typer.Option(None, "--beams", help="Beam search width (default: greedy, as transformers)."),
    max_length: int | None = typer.Option(None, "--max-length", help="At most this many answer tokens (default 10)."),
    batch: int = typer.Option(8, "--batch", help="Questions per question-encoder/decoder run."),
    json_output: bool = typer.Option(False, "--json", help="Print answers, token ids and settings as JSON."),
) -> None:
    """Answer questions about an image with an export's vision encoder, question encoder and answer
    decoder on ONNX Runtime (one line each)."""
    from turbo.cli.commands.vqa import run_vqa_command

    run_vqa_command(directory, image, questions, beams, max_length, batch, json_output)


@app.command("generate")
@user_errors
def generate_command(
    model: str = typer.Argument(..., help="An LLM-based VLM export directory (ONNX Runtime), or a model: registry "
                                          "name (llava-1.5-7b, llava-interleave-qwen-0.5b, blip2-opt-2.7b), HF id "
                                          "or local directory (PyTorch)."),
    image: str = typer.Argument(..., help="The image the prompt is about."),
    prompt: str = typer.Argument(..., help="The prompt: LLaVA's with <image> once where the image goes; BLIP-2's "
                                           "without (the image goes first)."),
    r: int | None = typer.Option(None, "--r", help="Tokens merged per vision-tower layer (default: the model's)."),
    method: str | None = typer.Option(None, "--method", help=METHOD_HELP),
    alpha: float | None = typer.Option(None, "--alpha", help="Semantic weight, authors' scale (default: model's)."),
    threshold: int | None = typer.Option(None, "--threshold", help="No merging below N tokens (default: model's)."),
    llm_drop: str | None = typer.Option(None, "--llm-drop", help=LLM_DROP_HELP + " A model's default: none."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Stop after this many tokens (or at its end)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="The architecture with random weights."),
    tiny: bool = typer.Option(False, "--tiny", help="The registry model's tiny variant (CI smoke checks)."),
    json_output: bool = typer.Option(False, "--json", help="Print the answer, token ids, timings, plan as JSON."),
) -> None:
    """Answer a prompt about an image, greedily, streaming tokens: the vision tower merged, the image
    tokens reduced inside the language model (an export on ONNX Runtime, or a model in PyTorch)."""
    from turbo.cli.commands.generate import run_generate_command

    run_generate_command(model, image, prompt, r, method, alpha, threshold, llm_drop, max_new_tokens, random_weights,
                         tiny, json_output)


@app.command("retrieve")
@user_errors
def retrieve_command(
    directory: str = typer.Argument(..., help="An image-text retrieval `turbo export` directory (e.g. clip-vit-b16)."),
    images: list[str] = typer.Option(..., "--images", help="Image files or folders (searched recursively); "
                                     "repeat for more."),
    texts: str = typer.Option(..., "--texts", help="Texts to rank, one per line (UTF-8; empty lines skipped)."),
    top_k: int = typer.Option(5, "--top-k", help="Matches listed per image and per text."),
    batch: int = typer.Option(16, "--batch", help="Images per encoder run (the export's batch when static)."),
    strict: bool = typer.Option(False, "--strict", help="An unreadable image is an error (default: skipped, "
                                "with a note listing them)."),
    itm_rerank: int = typer.Option(0, "--itm-rerank", help="BLIP: re-score each image's top N texts and each text's "
                                   "top N images with the image-text matching head, as BLIP's k_test (0: off)."),
    json_output: bool = typer.Option(False, "--json", help="Print both rankings and their logits as JSON."),
) -> None:
    """Rank texts for each image and images for each text by embedding similarity, on ONNX Runtime."""
    from pathlib import Path

    from turbo.cli.commands.retrieve import run_retrieve_command
    from turbo.tools.retrieve import RetrieveOptions

    run_retrieve_command(RetrieveOptions(Path(directory), images, Path(texts), top_k, batch, strict,
                                         itm_rerank=itm_rerank), json_output)


@app.command("check")
@user_errors
def check_command(
    directory: str = typer.Argument(..., help="A `turbo export` output directory."),
    max_diff: float | None = typer.Option(None, "--max-diff", help="Gate: ORT vs PyTorch max abs diff at most D."),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", help="Gate: fidelity to the unmerged model (ViT top-1, VQA answer agreement, "
        "retrieval top-1 agreement, otherwise the deployed embedding's cosine)."),
    min_speedup: float | None = typer.Option(None, "--min-speedup", help="Gate: ORT CPU speedup vs r=0 at least S."),
    iters: int = typer.Option(10, "--iters", help="Timed rounds for --min-speedup."),
    json_output: bool = typer.Option(False, "--json", help="Print the report on stdout."),
) -> None:
    """CI gate for an export: manifest vs graph vs plan, onnx.checker, TensorRT lint, re-validation.

    Exit code 3 when any check fails.
    """
    from turbo.cli.commands.check import run_check_command

    run_check_command(directory, max_diff, min_agreement, min_speedup, iters, json_output)


deploy_app = typer.Typer(cls=OneLineUsageErrors, help="Write a serving repository from export directories.",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("triton")
@user_errors
def deploy_triton_command(
    exports: list[str] = typer.Argument(..., help="`turbo export` output directories; each is served under its "
                                        "folder's name."),
    output: str = typer.Option(..., "--output", "-o", help="The repository directory to write."),
    backend: str = typer.Option("auto", "--backend", help="auto (the export's TensorRT engine if it has one, else "
                                "onnxruntime) | onnxruntime | tensorrt | python (ONNX Runtime in Triton's python "
                                "backend, for servers without an onnxruntime backend)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Largest batch Triton forms (dynamic-batch exports)."),
    instances: int = typer.Option(1, "--instances", help="Instances of each model (instance_group count)."),
    dynamic_batching: bool = typer.Option(True, "--dynamic-batching/--no-dynamic-batching",
                                          help="Let Triton batch concurrent requests."),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", help="Longest wait to fill a batch."),
    preferred_batch: str | None = typer.Option(None, "--preferred-batch", help="Batch sizes to prefer, e.g. 4,8."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="A zero request per encoder instance at load."),
    threads: int | None = typer.Option(None, "--threads", help="--backend python: ONNX Runtime threads per "
                                       "instance (default: ONNX Runtime's)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    json_output: bool = typer.Option(False, "--json", help="Print what was deployed as JSON on stdout."),
) -> None:
    """A Triton Inference Server model repository: encoders, decoders and a model per export that
    takes image bytes. Every export is verified first; the repository is written whole or not at all."""
    from turbo.cli.commands.bench import parse_ints
    from turbo.cli.commands.deploy import run_deploy_triton_command
    from turbo.serving.repository import DeployOptions

    options = DeployOptions(backend, max_batch, instances, dynamic_batching, max_queue_delay_us,
                            tuple(parse_ints(preferred_batch, "--preferred-batch", least=1, example="4,8"))
                            if preferred_batch else (), warmup, threads or 0)
    run_deploy_triton_command(exports, output, options, force, json_output)


@app.command("serve")
@user_errors
def serve_command(
    repository: str = typer.Argument(..., help="A model repository (turbo deploy triton)."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for every model to load."),
) -> None:
    """Run tritonserver (from PATH, else the nvidia-pytriton wheel's) on a repository until Ctrl-C.

    Exit code 4 when no server binary is available.
    """
    from turbo.cli.commands.serve import run_serve_command

    run_serve_command(repository, http_port, grpc_port, metrics_port, timeout)


def main() -> None:
    app(prog_name="turbo")
