"""The weighted merge in eager PyTorch: its eager form against its exported form run eagerly.

    python benchmarks/eager_merge.py --model vit-b16 --r 16 --batch 1,8

For every merging layer of the plan, the weighted merge on random inputs of that layer's shape
and a real selection: `merge_tokens_eager` (what eager PyTorch runs) and `merge_tokens_graph`
(what exports trace; run eagerly its gathers are row index_selects, which was also the eager
path before the two forms were split), in turn, medians over --rounds. Also how many non-view
ATen ops each dispatches: each is a CPU dispatch, and a kernel launch on CUDA. --device cuda
synchronises around every call. Prints Markdown rows.
"""

import argparse

import torch
from merge_cost import overhead
from torch.utils._python_dispatch import TorchDispatchMode

from turbo.merging.matching import information_degree, select_merges
from turbo.merging.merge import merge_tokens_eager, merge_tokens_graph, pack_indices
from turbo.models.build import build_plan

VIEW_OPS = {"view", "slice", "select", "unsqueeze", "squeeze", "transpose", "t", "permute", "expand", "narrow",
            "as_strided", "alias", "detach", "reshape", "_reshape_alias", "_unsafe_view"}


class OpCount(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in VIEW_OPS
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default="matmul", choices=["matmul", "scatter"])
    args = parser.parse_args()
    device = torch.device(args.device)
    built = build_plan(args.model, r=args.r)
    config = built.source.config
    vision = getattr(config, "vision_config", config)
    width = vision.hidden_size
    print(f"{args.model} r={args.r}, {args.kernel} kernel, {device}, {torch.get_num_threads()} threads\n\n"
          "| batch | layer | tokens | eager form | exported form | eager / exported | ops eager / exported |\n"
          "|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batch.split(",")):
        for layer in built.plan.layers:
            if layer.r == 0:
                continue
            n = layer.tokens_in
            x = torch.randn(batch, n, width, generator=generator).to(device)
            size = torch.randint(1, 5, (batch, n, 1), generator=generator).float().to(device)
            metric = torch.randn(batch, n, 64, generator=generator).to(device)
            cls_attn = torch.rand(batch, n, generator=generator).softmax(-1).to(device)
            index = pack_indices(*select_merges(*information_degree(metric, cls_attn, built.merge_config), layer.r))

            def run(form=merge_tokens_eager) -> None:
                form(x, size, index, args.kernel)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            forms = (run, lambda: run(merge_tokens_graph))
            with torch.inference_mode():
                eager_ms, exported_ms, _ = overhead(*forms, args.rounds)
                counts = []
                for run_form in forms:
                    with OpCount() as ops:
                        run_form()
                    counts.append(ops.count)
            print(f"| {batch} | {layer.index} | {n} → {layer.tokens_out} | {eager_ms * 1e3:.0f} µs | "
                  f"{exported_ms * 1e3:.0f} µs | {eager_ms / exported_ms:.2f} | {counts[0]} / {counts[1]} |",
                  flush=True)


if __name__ == "__main__":
    main()
