#!/usr/bin/env bash
# Served vs in-process speedups on this CPU (docs/benchmarks.md, "Served on Triton"):
#
#     bash benchmarks/served_cpu.sh OUTDIR [vit|blip ...]
#
# For each model: exports r and r=0 (random weights; reused when OUTDIR already has them), times
# them in-process with `turbo bench DIR --baseline` (ONNX Runtime), deploys both into one repository
# with the python backend, serves it with the bundled server (`turbo serve`) and load-tests the
# pipeline model (image bytes in) and the encoder (pixel tensors in) at concurrency 1, 8 and 32
# with `turbo bench --url`, the two models interleaved. Writes OUTDIR/<model>-*.json and a log.
# Needs `pip install --no-deps nvidia-pytriton==0.7.0`. About 25 minutes on 2 cores for both.
set -eu
out=${1:?usage: bash benchmarks/served_cpu.sh OUTDIR [vit|blip ...]}
shift
models=${*:-vit blip}
mkdir -p "$out"
out=$(cd "$out" && pwd)
duration=${DURATION:-20}

port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

for model in $models; do
  case $model in
    vit) registry=vit-b16 r=16 bench_args="--batch 1,8 --iters 20" ;;
    blip) registry=blip-caption r=30 bench_args="--batch 1 --iters 5 --caption-tokens 20" ;;
    *) echo "served_cpu: unknown model $model (vit or blip)" >&2; exit 2 ;;
  esac
  merged=$out/$registry-r$r baseline=$out/$registry-r0
  for pair in "$r:$merged" "0:$baseline"; do
    [ -f "${pair#*:}/turbo.json" ] || turbo export --model $registry --r "${pair%%:*}" --random-weights -o "${pair#*:}"
  done
  turbo bench "$merged" --baseline "$baseline" $bench_args --json > "$out/$model-in-process.json"
  repo=$out/$model-repo
  turbo deploy triton "$merged" "$baseline" -o "$repo" --backend python --force
  http=$(port) grpc=$(port) metrics=$(port)
  turbo serve "$repo" --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics" --timeout 600 \
    2> "$out/$model-serve.log" &
  server=$!
  until grep -q "^ready:" "$out/$model-serve.log"; do
    kill -0 $server 2>/dev/null || { cat "$out/$model-serve.log" >&2; exit 1; }
    sleep 2
  done
  for suffix in "" -encoder; do
    kind=${suffix:+encoder}
    first=$(basename "$merged")$suffix second=$(basename "$baseline")$suffix
    turbo bench --url "http://127.0.0.1:$http" --model "$first,$second" --baseline "$second" \
      --concurrency 1,8,32 --duration "$duration" --json > "$out/$model-served-${kind:-pipeline}.json"
  done
  kill -TERM $server  # a background job ignores SIGINT; turbo serve stops the same way on both
  wait $server || true
done
