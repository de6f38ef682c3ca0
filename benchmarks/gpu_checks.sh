#!/usr/bin/env bash
# Every check that needs a CUDA GPU, about 4 minutes on an H200 (the steps' time limits add up to 16
# minutes; name steps to split it into shorter runs; the device step always runs):
#
#     bash benchmarks/gpu_checks.sh OUTDIR [STEP ...]
#
# Runs from the repository root without installing (PYTHONPATH=.; the GPU machine's own torch,
# Triton and transformers). Writes OUTDIR/gpu_checks.log (every step's output under a header, its
# exit code and seconds) and OUTDIR/bench-*.json (`turbo bench --json`).
# A failing step does not stop the others; the script exits 1 if any failed, 4 without a CUDA GPU.
# Steps (all, or those named): the gpu-marked kernel tests (the TurboMerge kernel, the Triton Turbo
# step); the TurboMerge kernel against the torch merge; torch CUDA fp16 speedups of ViT-B/16 r=16
# (the Triton step, then the ops at batch 64) and BLIP vision r=30 (targets ≥ 1.8× and ≥ 1.4× at
# batch 64; `turbo bench` replays each forward as a CUDA graph); the eager merge forms' times and
# op counts; the Turbo step's cost per layer on CUDA (eager),
# ops and Triton, at batch 64 and 1; the retrieval image encoders (CLIP ViT-B/16 r=16, BLIP
# retrieval r=30) in torch CUDA fp16; PiToMe's step on CUDA against the CPU step; CLIP ViT-B/16
# r=16 speedups with the Turbo, ToMe and PiToMe merges (torch CUDA fp16). Steps run in that order,
# most wanted first.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR}
python=${PYTHON:-python3}
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_checks: $python's torch sees no CUDA GPU; run this on a GPU machine" >&2
  exit 4
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log=$out/gpu_checks.log
failed=0
shift
chosen=" $* "

step() {  # step NAME SECONDS COMMAND...: run with a time limit, append to the log
  local name=$1 limit=$2
  shift 2
  if [ "$name" != device ] && [ "$chosen" != "  " ] && [[ "$chosen" != *" $name "* ]]; then
    return
  fi
  local begin=$SECONDS
  echo "=== $name: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local status=$?
  echo "=== $name: exit $status after $((SECONDS - begin)) s" | tee -a "$log"
  [ "$status" -eq 0 ] || failed=1
}

step device 60 "$python" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
step kernel-tests 200 "$python" -m pytest -q -m gpu tests/export/test_tensorrt.py tests/kernels/test_triton_turbo_step.py
step kernel-timing 90 "$python" benchmarks/merge_kernel.py --batch 1,8,64 --dtype fp16
step bench-vit 100 sh -c "$python -m turbo bench --model vit-b16 --r 16 --runtime torch --device cuda \
--precision fp16 --batch 1,8,64 --iters 50 --random-weights --json >'$out/bench-vit.json'"
step bench-vit-ops 60 sh -c "$python -m turbo bench --model vit-b16 --r 16 --runtime torch --device cuda \
--precision fp16 --batch 64 --iters 50 --torch-merge ops --random-weights --json >'$out/bench-vit-ops.json'"
step bench-blip 110 sh -c "$python -m turbo bench --model blip-caption --r 30 --runtime torch --device cuda \
--precision fp16 --batch 1,8,64 --iters 30 --no-caption --random-weights --json >'$out/bench-blip.json'"
step eager-merge 40 "$python" benchmarks/eager_merge.py --device cuda --batch 1,64 --rounds 100
step layer-cost 60 "$python" benchmarks/layer_merge_cost.py --model vit-b16 --r 16 --batch 64 --device cuda \
  --dtype fp16 --rounds 50
step layer-cost-b1 60 "$python" benchmarks/layer_merge_cost.py --model vit-b16 --r 16 --batch 1 --device cuda \
  --dtype fp16 --rounds 100
step bench-clip 80 sh -c "$python -m turbo bench --model clip-vit-b16 --r 16 --runtime torch --device cuda \
--precision fp16 --batch 1,8,64 --iters 50 --random-weights --json >'$out/bench-clip.json'"
step bench-blip-retrieval 100 sh -c "$python -m turbo bench --model blip-retrieval --runtime torch --device cuda \
--precision fp16 --batch 1,8,64 --iters 30 --random-weights --json >'$out/bench-blip-retrieval.json'"
step pitome-tests 60 "$python" -m pytest -q -m gpu tests/merging/test_pitome.py
step bench-methods 200 sh -c "for m in turbo tome pitome; do $python -m turbo bench --model clip-vit-b16 --r 16 \
--runtime torch --device cuda --precision fp16 --batch 1,64 --iters 30 --method \$m --random-weights --json \
>'$out/bench-clip-'\$m.json; done"
exit "$failed"
