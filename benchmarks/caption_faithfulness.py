"""ONNX captions vs upstream `generate`, token for token, on export directories.

    python benchmarks/caption_faithfulness.py exports/blip-caption-r30 [more export dirs]

For each directory: rebuild the export's PyTorch model (merged with its plan; random weights
from its seed), caption seeded pixels with the ONNX pipeline and with
`BlipForConditionalGeneration.generate`, greedy and beam 3, with and without the prompt.
"""

import argparse
import time
from dataclasses import replace

from turbo.export.decoder_validate import reference_ids
from turbo.export.options import ExportOptions
from turbo.export.validate import seeded_pixels
from turbo.models.build import build_merged_model
from turbo.runtimes.caption import CaptionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    for directory in args.dirs:
        pipeline = CaptionPipeline.open(directory)
        options = ExportOptions.from_manifest(pipeline.manifest)
        built = options.plan()
        model, _ = build_merged_model(built, options.random_weights, options.kernel, options.seed)
        pixels = seeded_pixels(args.batch, built.pixel_shape, 5)
        for beams in (1, 3):
            for prompt in ("a picture of", ""):
                settings = replace(pipeline.settings, num_beams=beams, max_new_tokens=args.tokens)
                ids = pipeline.prompt_ids(prompt)
                begin = time.perf_counter()
                want = reference_ids(model, pixels, ids, settings, built.interpolate_pos_encoding)
                torch_s = time.perf_counter() - begin
                begin = time.perf_counter()
                got = pipeline.generate(pixels, ids, settings)
                ort_s = time.perf_counter() - begin
                same = want.shape == got.shape and bool((want == got).all())
                print(f"r={options.r} image tokens={pipeline.decoder.image_tokens} beams={beams} prompt={prompt!r} "
                      f"ids {want.shape} identical={same} (torch {torch_s:.1f} s, onnxruntime {ort_s:.1f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
