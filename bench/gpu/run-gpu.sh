#!/usr/bin/env bash
# The CUDA measurement, run on a GPU host from the repository root, in two phases:
#
#   bench/gpu/run-gpu.sh build   # CUDA backend module (+ llama-batched-bench) from the sources
#   bench/gpu/run-gpu.sh run     # random-weight models; isthmus bench at 1/8/32 streams; anchor
#
# Inputs in .device/ (made on the build machine, see bench/gpu/README.md): bundle.tar.gz (the
# isthmus release binary, its libraries and CPU backends), llama-src.tar.gz (the llama.cpp tree
# it was built with), batched-bench/ (llama.cpp's tool sources), tokenizer.gguf and the gguf
# wheel. Work happens in /tmp/isthmus-gpu; a few summary files go to $OUT (or
# /tmp/isthmus-gpu/out), everything else stays in /tmp/isthmus-gpu/results.
set -euo pipefail
phase=${1:?usage: run-gpu.sh build|run}
inputs=.device
work=/tmp/isthmus-gpu
out=${OUT:-$work/out}
results=$work/results
mkdir -p "$work" "$out" "$results"

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  nvcc --version | tail -n 2 | tee -a "$out/gpu.txt"
  rm -rf "$work/bundle" "$work/llama"
  tar -xzf "$inputs/bundle.tar.gz" -C "$work"
  mkdir -p "$work/llama"
  tar -xzf "$inputs/llama-src.tar.gz" -C "$work/llama"
  # llama.cpp's batched-bench, the anchor, beside the module; tools/ is not fingerprinted.
  mkdir -p "$work/llama/tools/batched-bench"
  cp "$inputs"/batched-bench/* "$work/llama/tools/batched-bench/"
  echo 'add_subdirectory(batched-bench)' > "$work/llama/tools/CMakeLists.txt"
  local started=$SECONDS
  ISTHMUS_CUDA_BUILD_DIR="$work/build" \
  ISTHMUS_CUDA_CMAKE_ARGS="-DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF" \
  ISTHMUS_CUDA_EXTRA_TARGETS="ggml-cpu llama-batched-bench" \
    deploy/cuda/build-backend "$work/llama" "$work/bundle/backends" 90 2>&1 | tail -n 5 | tee "$out/build.txt"
  echo "build took $((SECONDS - started)) s" | tee -a "$out/build.txt"
}

serve() {
  local model=$1 name=$2
  cat > "$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:19901"
plain_listen = "127.0.0.1:19900"
state_dir = "$work/state"
[server.limits]
first_token_timeout_ms = 600000
[auth]
allow_anonymous = true
[models.smollm2]
path = "$model"
context_tokens = 512
parallel_sequences = 32
batch_tokens = 2048
threads = 8
gpu_layers = 999
queue_depth_max = 256
queue_timeout_ms = 600000
[logging]
level = "info"
TOML
  "$work/bundle/isthmus" serve --config "$work/$name.toml" > "$results/serve-$name.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do
    curl -sf http://127.0.0.1:19901/readyz >/dev/null && return 0
    sleep 0.25
  done
  echo "isthmus did not become ready" >&2
  tail -n 30 "$results/serve-$name.log" >&2
  return 1
}

run() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$inputs"/gguf-*.whl
  export PYTHONPATH=/tmp/site
  for shape in 135m 1b; do
    [ -f "$work/m$shape.gguf" ] || python3 bench/gpu/random_model.py model --shape "$shape" \
      --tokenizer "$inputs/tokenizer.gguf" --out "$work/m$shape.gguf" | tee -a "$out/models.txt"
  done
  for shape in 135m 1b; do
    serve "$work/m$shape.gguf" "$shape"
    grep -E "backends loaded|backend modules verified|inference worker ready" "$results/serve-$shape.log" | tee -a "$out/devices.txt"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 > "$results/util-$shape.csv" &
    local sampler=$!
    for streams in 1 8 32; do
      "$work/bundle/isthmus" bench --url http://127.0.0.1:19900 --concurrency "$streams" \
        --requests $((streams * 4 > 8 ? streams * 4 : 8)) --max-tokens 128 --prompt-tokens 128 \
        --warmup "$streams" --json > "$results/bench-$shape-$streams.json"
    done
    kill "$sampler"
    # A clean stop: draining, then the worker frees its CUDA context before exit.
    kill -TERM "$server"
    wait "$server" && echo "$shape: isthmus exited cleanly" | tee -a "$out/devices.txt" \
      || echo "$shape: isthmus exited with status $?" | tee -a "$out/devices.txt"
    tail -n 5 "$results/serve-$shape.log" >> "$out/serve-tails.txt"
    "$work/build/bin/llama-batched-bench" -m "$work/m$shape.gguf" -c 16384 -b 2048 -ub 512 \
      -npp 128 -ntg 128 -npl 1,8,32 -ngl 999 > "$results/batched-bench-$shape.txt" 2>&1 || true
    { echo "$shape"; grep -E "^\|" "$results/batched-bench-$shape.txt"; } | tee -a "$out/anchor.txt"
  done
  python3 - "$results" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
for shape in ("135m", "1b"):
    util = [float(line.split(",")[0]) for line in (out / f"util-{shape}.csv").read_text().splitlines() if line.strip()]
    busy = [value for value in util if value > 0]
    print(f"{shape}: GPU utilisation while benchmarking: mean {statistics.mean(busy) if busy else 0:.0f}% over {len(busy)} busy samples")
    for streams in (1, 8, 32):
        report = json.loads((out / f"bench-{shape}-{streams}.json").read_text())
        tpot = report["tpot_ms"]["p50"]
        print(f"{shape} streams={streams}: output {report['output_tokens_per_s']:.0f} tok/s, "
              f"TPOT p50 {tpot:.2f} ms -> decode {streams * 1000 / tpot:.0f} tok/s, TTFT p50 {report['ttft_ms']['p50']:.1f} ms, errors {report['errors']}")
PY
}

"$phase"
