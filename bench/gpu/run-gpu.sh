#!/usr/bin/env bash
# The CUDA measurement, run on a GPU host from the repository root, in two phases:
#
#   bench/gpu/run-gpu.sh build   # CUDA backend module (+ llama-batched-bench) from the sources
#   bench/gpu/run-gpu.sh run     # random-weight models; isthmus bench at 1/8/32 streams; anchor
#   bench/gpu/run-gpu.sh steps   # a pure decode step's split, with graph reuse / CUDA graphs off
#   bench/gpu/run-gpu.sh lanes   # llama.cpp alone: N streams over K contexts (lanes-bench/)
#   bench/gpu/run-gpu.sh features  # JSON response_format, logprobs, n on the GPU (after `run`)
#
# Inputs in .device/ (made on the build machine by bench/gpu/prepare): bundle.tar.gz (the
# isthmus release binary, its libraries and CPU backends), llama-src.tar.gz (the llama.cpp tree
# it was built with), batched-bench/ (llama.cpp's tool sources), tokenizer.gguf and the gguf
# wheel; .device/ is git-ignored, so a remote GPU host gets it as an extra path carried with
# the checkout (about 21 MB). Work happens in /tmp/isthmus-gpu; a few summary files go to $OUT (or
# /tmp/isthmus-gpu/out), everything else stays in /tmp/isthmus-gpu/results.
#
# Settings (environment): ISTHMUS_GPU_SHAPES (135m 1b), ISTHMUS_GPU_LAYOUTS for `run` (split;
# also unified, split-nocache: no prefix cache, split-nooverlap: tokens sent before the next
# step is launched, split-lanesN: the sequences split over N contexts; a -q8 suffix, e.g.
# split-lanes2-q8, gives the model a q8_0 KV cache and adds the anchor with one),
# ISTHMUS_GPU_ANCHOR=0 (skip llama-batched-bench), ISTHMUS_GPU_THREADS (8),
# ISTHMUS_GPU_STEP_VARIANTS for `steps` (as-is no-graph-reuse no-cuda-graphs; also threads-N),
# ISTHMUS_GPU_STEP_DEBUG=0 (skip its debug-log wave), ISTHMUS_GPU_LANE_ROUNDS (2) and
# ISTHMUS_GPU_LANE_CASES ("STREAMS LANES GREEDY" triples; GREEDY 0 random tokens, 1 greedy on
# the host, 2 greedy in llama.cpp's graph, 3 the same with end-of-generation tokens banned) for
# `lanes`, e.g. ISTHMUS_GPU_LANE_CASES="32_1_1 32_1_2" with `_` for the spaces.
set -euo pipefail
phase=${1:?usage: run-gpu.sh build|run|steps|lanes|features}
inputs=.device
work=/tmp/isthmus-gpu
out=${OUT:-$work/out}
results=$work/results
mkdir -p "$work" "$out" "$results"

# llama-batched-bench, the anchor: RESULT_FILE then its arguments. A run that fails or prints
# no table is reported and makes the phase fail once the rest has run.
anchor_failed=0
anchor() {
  local file=$1
  shift
  if ! "$work/build/bin/llama-batched-bench" "$@" >"$file" 2>&1 || ! grep -qE "^\|" "$file"; then
    echo "anchor FAILED: llama-batched-bench $*: see $file" | tee -a "$out/anchor-failures.txt" >&2
    anchor_failed=1
  fi
}

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
  # The lanes experiment (bench/gpu/lanes-bench), built the same way.
  rm -rf "$work/llama/tools/lanes-bench"
  cp -r bench/gpu/lanes-bench "$work/llama/tools/lanes-bench"
  printf 'add_subdirectory(batched-bench)\nadd_subdirectory(lanes-bench)\n' > "$work/llama/tools/CMakeLists.txt"
  local started=$SECONDS
  ISTHMUS_CUDA_BUILD_DIR="$work/build" \
  ISTHMUS_CUDA_CMAKE_ARGS="-DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF" \
  ISTHMUS_CUDA_EXTRA_TARGETS="ggml-cpu llama-batched-bench isthmus-lanes-bench" \
    deploy/cuda/build-backend "$work/llama" "$work/bundle/backends" 90 2>&1 | tail -n 5 | tee "$out/build.txt"
  echo "build took $((SECONDS - started)) s" | tee -a "$out/build.txt"
}

serve() {
  local model=$1 name=$2 extra=${3:-}
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
# A wave's 32 prompts of 128 tokens fit one step, and a prompt that arrives while others
# generate is prefilled in one step too: the wave's decode is then decode alone, as the
# anchor's S_TG is (its prompts are all processed before it times generation).
batch_tokens = 4096
prefill_chunk_tokens = 4096
threads = ${ISTHMUS_GPU_THREADS:-8}
gpu_layers = 999
queue_depth_max = 256
queue_timeout_ms = 600000
$extra
[logging]
level = "${ISTHMUS_GPU_LOG_LEVEL:-info}"
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

# The worker's counters, for the time per step spent in llama_decode and around it.
snapshot() {
  curl -sf http://127.0.0.1:19901/metrics | grep -E '^isthmus_local_(decode_seconds|worker_busy_seconds|device_wait_seconds|sampling_seconds|decode_steps|batched_tokens)_total' > "$1"
}

# Random-weight models of the given shapes, written once per host.
models() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$inputs"/gguf-*.whl
  local shape
  for shape in "$@"; do
    [ -f "$work/m$shape.gguf" ] || PYTHONPATH=/tmp/site python3 bench/gpu/random_model.py model \
      --shape "$shape" --tokenizer "$inputs/tokenizer.gguf" --out "$work/m$shape.gguf" \
      | tee -a "$out/models.txt"
  done
}

run() {
  local shapes=${ISTHMUS_GPU_SHAPES:-135m 1b} layouts=${ISTHMUS_GPU_LAYOUTS:-split}
  # shellcheck disable=SC2086
  models $shapes
  export PYTHONPATH=/tmp/site
  for shape in $shapes; do
    for layout in $layouts; do
      local name=$shape-$layout extra= lanes=
      [ "$layout" = unified ] && extra="kv_unified = true"
      # split without a prefix cache: no sequence state is parked in host memory.
      [ "$layout" = split-nocache ] && extra="prefix_cache_tokens_max = 0"
      # split with each step's tokens sent before the next step is launched, not during it.
      [ "$layout" = split-nooverlap ] && extra="overlap_token_delivery = false"
      # split over N lanes (contexts), e.g. split-lanes4.
      case $layout in split-lanes*) lanes=${layout#split-lanes}; extra="lanes = ${lanes%%-*}" ;; esac
      # ...-q8: a q8_0 KV cache, e.g. split-lanes2-q8.
      case $layout in *-q8) extra="$extra
kv_cache_type = \"q8_0\"" ;; esac
      serve "$work/m$shape.gguf" "$name" "$extra"
      grep -E "backends loaded|backend modules verified|inference worker ready" "$results/serve-$name.log" | tee -a "$out/devices.txt"
      nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 > "$results/util-$name.csv" &
      local sampler=$!
      # The gateway's own GPU gauges (NVML), scraped beside nvidia-smi.
      ( while sleep 0.5; do curl -sf http://127.0.0.1:19901/metrics | grep -E '^isthmus_gpu_' || true; done ) \
        > "$results/nvml-$name.txt" &
      local scraper=$!
      for streams in 1 8 32; do
        # Decode: one wave of requests that start together, as llama-batched-bench runs them.
        "$work/bundle/isthmus" bench --url http://127.0.0.1:19900 --concurrency "$streams" \
          --requests "$streams" --max-tokens 128 --prompt-tokens 128 --warmup "$streams" --json \
          > /dev/null
        snapshot "$results/m0-$name-$streams"
        # `--prompt-tokens 115` is 128 prompt tokens with the chat template: the anchor's pp 128, tg 128.
        "$work/bundle/isthmus" bench --url http://127.0.0.1:19900 --concurrency "$streams" \
          --requests "$streams" --max-tokens 128 --prompt-tokens 115 --warmup 0 --json \
          > "$results/wave-$name-$streams.json"
        snapshot "$results/m1-$name-$streams"
        # Serving: a closed loop where new prompts join running streams.
        "$work/bundle/isthmus" bench --url http://127.0.0.1:19900 --concurrency "$streams" \
          --requests $((streams * 4 > 8 ? streams * 4 : 8)) --max-tokens 128 --prompt-tokens 128 \
          --warmup 0 --json > "$results/bench-$name-$streams.json"
        snapshot "$results/m2-$name-$streams"
      done
      kill "$sampler" "$scraper"
      # A clean stop: draining, then the worker frees its CUDA context before exit.
      kill -TERM "$server"
      wait "$server" && echo "$name: isthmus exited cleanly" | tee -a "$out/devices.txt" \
        || echo "$name: isthmus exited with status $?" | tee -a "$out/devices.txt"
      tail -n 5 "$results/serve-$name.log" >> "$out/serve-tails.txt"
    done
    if [ "${ISTHMUS_GPU_ANCHOR:-1}" = 1 ]; then
      anchor "$results/batched-bench-$shape.txt" -m "$work/m$shape.gguf" -c 16384 -b 2048 -ub 512 \
        -npp 128 -ntg 128 -npl 1,8,32 -ngl 999
      { echo "$shape"; grep -E "^\|" "$results/batched-bench-$shape.txt" || true; } | tee -a "$out/anchor.txt"
      # The anchor with the same q8_0 cache, for layouts ending in -q8.
      case " $layouts" in *-q8\ *|*-q8) 
        anchor "$results/batched-bench-$shape-q8.txt" -m "$work/m$shape.gguf" -c 16384 -b 2048 \
          -ub 512 -ctk q8_0 -ctv q8_0 -fa on -npp 128 -ntg 128 -npl 1,8,32 -ngl 999
        { echo "$shape q8_0 cache"; grep -E "^\|" "$results/batched-bench-$shape-q8.txt" || true; } | tee -a "$out/anchor.txt" ;;
      esac
    fi
  done
  python3 - "$results" $shapes -- $layouts <<'PY' | tee "$out/summary.txt"
import json, statistics, sys, pathlib
sys.path.insert(0, "bench/gpu")
from counters import counters
out = pathlib.Path(sys.argv[1])
split = sys.argv.index("--")
shapes, layouts = sys.argv[2:split], sys.argv[split + 1:]
failed = []

def per_step(before, after):
    a, b = counters(before), counters(after)
    steps = b["decode_steps"] - a["decode_steps"]
    if steps <= 0:
        return "no steps"
    decode = (b["decode_seconds"] - a["decode_seconds"]) / steps * 1e3
    busy = (b["worker_busy_seconds"] - a["worker_busy_seconds"]) / steps * 1e3
    wait = (b["device_wait_seconds"] - a["device_wait_seconds"]) / steps * 1e3
    sampling = (b.get("sampling_seconds", 0) - a.get("sampling_seconds", 0)) / steps * 1e3
    tokens = (b["batched_tokens"] - a["batched_tokens"]) / steps
    return (f"{steps:.0f} steps, {tokens:.1f} tokens/step, per step: llama_decode {decode:.2f} ms, "
            f"device wait {wait:.2f} ms, sampling {sampling:.2f} ms, "
            f"other host work {busy - decode - wait - sampling:.2f} ms")

for shape in shapes:
    for layout in layouts:
        name = f"{shape}-{layout}"
        util = [float(line.split(",")[0]) for line in (out / f"util-{name}.csv").read_text().splitlines() if line.strip()]
        busy = [value for value in util if value > 0]
        print(f"{name}: GPU utilisation while benchmarking: mean {statistics.mean(busy) if busy else 0:.0f}% over {len(busy)} busy samples")
        scraped = [line.split() for line in (out / f"nvml-{name}.txt").read_text().splitlines() if line.strip()]
        ratios = [float(value) * 100 for key, value in scraped if key.startswith("isthmus_gpu_utilization_ratio") and float(value) > 0]
        memory = [float(value) for key, value in scraped if key.startswith("isthmus_gpu_memory_used_bytes")]
        print(f"{name}: isthmus /metrics (NVML): {len(scraped)} GPU series lines, utilisation mean {statistics.mean(ratios) if ratios else 0:.0f}% "
              f"over {len(ratios)} busy scrapes, memory used max {max(memory) / 2**20 if memory else 0:.0f} MiB")
        for streams in (1, 8, 32):
            wave = json.loads((out / f"wave-{name}-{streams}.json").read_text())
            if wave["errors"] or wave["succeeded"] != streams:
                failed.append(f"{name} streams={streams} wave: {wave['succeeded']} of {streams} answered, "
                              f"first error: {wave['first_error']}")
            tpot = wave["tpot_ms"]["p50"]
            print(f"{name} streams={streams} wave: TPOT p50 {tpot:.2f} ms -> decode {streams * 1000 / tpot:.0f} tok/s; "
                  + per_step(out / f"m0-{name}-{streams}", out / f"m1-{name}-{streams}"))
            report = json.loads((out / f"bench-{name}-{streams}.json").read_text())
            if report["errors"]:
                failed.append(f"{name} streams={streams} loop: {report['errors']} errors, first: {report['first_error']}")
            tpot = report["tpot_ms"]["p50"]
            print(f"{name} streams={streams} loop: output {report['output_tokens_per_s']:.0f} tok/s, "
                  f"TPOT p50 {tpot:.2f} ms, TTFT p50 {report['ttft_ms']['p50']:.1f} ms, errors {report['errors']}; "
                  + per_step(out / f"m1-{name}-{streams}", out / f"m2-{name}-{streams}"))
for failure in failed:
    print(f"FAILED: {failure}")
sys.exit(1 if failed else 0)
PY
  [ "$anchor_failed" = 0 ] || { echo "run: the anchor failed (see $out/anchor-failures.txt)" >&2; return 1; }
}

# Where a pure decode step's time goes, and whether graph reuse and CUDA graphs carry it:
# for each variant (as is, llama.cpp graph reuse off, CUDA graphs off) two waves of N
# requests with the same prompts, generating 8 and 128 tokens; the difference of their
# counters is 120 steps with no prompt in them, the quantity llama-batched-bench's S_TG
# times. Then one wave with llama.cpp's debug log, counting graph reuse and CUDA graph
# messages, and the anchor under the same switches.
steps() {
  local shape=${ISTHMUS_GPU_SHAPES:-135m}
  shape=${shape%% *}
  models "$shape"
  export PYTHONPATH=/tmp/site
  wave() { # streams max_tokens prompt_tokens
    "$work/bundle/isthmus" bench --url http://127.0.0.1:19900 --concurrency "$1" --requests "$1" \
      --max-tokens "$2" --prompt-tokens "$3" --warmup 0 --json > /dev/null
  }
  local variants=${ISTHMUS_GPU_STEP_VARIANTS:-as-is no-graph-reuse no-cuda-graphs}
  for variant in $variants; do
    local name=$shape-steps-$variant
    case $variant in
      as-is) serve "$work/m$shape.gguf" "$name" ;;
      no-graph-reuse) LLAMA_GRAPH_REUSE_DISABLE=1 serve "$work/m$shape.gguf" "$name" ;;
      no-cuda-graphs) GGML_CUDA_DISABLE_GRAPHS=1 serve "$work/m$shape.gguf" "$name" ;;
      # The worker's CPU threads (llama.cpp's CPU pool and the greedy scans), e.g. threads-2.
      threads-*) ISTHMUS_GPU_THREADS=${variant#threads-} serve "$work/m$shape.gguf" "$name" ;;
      *) echo "unknown step variant $variant" >&2; return 1 ;;
    esac
    for streams in 8 32; do
      wave "$streams" 128 128
      snapshot "$results/s0-$name-$streams"
      wave "$streams" 8 115
      snapshot "$results/s1-$name-$streams"
      wave "$streams" 128 115
      snapshot "$results/s2-$name-$streams"
    done
    kill -TERM "$server"; wait "$server" || true
  done
  python3 - "$results" "$shape" $variants <<'PY' | tee "$out/steps.txt"
import sys, pathlib
sys.path.insert(0, "bench/gpu")
from counters import counters
out, shape = pathlib.Path(sys.argv[1]), sys.argv[2]
for variant in sys.argv[3:]:
    name = f"{shape}-steps-{variant}"
    for streams in (8, 32):
        c = [counters(out / f"s{i}-{name}-{streams}") for i in range(3)]
        d = {k: (c[2][k] - c[1][k]) - (c[1][k] - c[0][k]) for k in c[0]}
        steps = d["decode_steps"]
        # Busy time is left out: the two waves end with different work (releasing and
        # parking sequences of different lengths), which does not cancel in the difference.
        decode, wait = (d[k] / steps * 1e3 for k in ("decode_seconds", "device_wait_seconds"))
        print(f"{name} streams={streams}: {steps:.0f} decode-only steps, {d['batched_tokens'] / steps:.1f} tokens/step, "
              f"per step: llama_decode {decode:.3f} ms + device wait {wait:.3f} ms = {decode + wait:.3f} ms")
PY
  if [ "${ISTHMUS_GPU_STEP_DEBUG:-1}" = 1 ]; then
  ISTHMUS_GPU_LOG_LEVEL=debug LLAMA_GRAPH_RESULT_DEBUG=2 serve "$work/m$shape.gguf" "$shape-steps-debug"
  wave 32 128 128
  kill -TERM "$server"; wait "$server" || true
  local log=$results/serve-$shape-steps-debug.log
  {
    echo "debug wave, 32 streams: $(wc -l < "$log") log lines"
    for pattern in "cannot reuse graph" "reusing previous graph" "CUDA Graph id" "warmup complete" \
      "warmup reset" "disabling CUDA graphs" "can_reuse = 0"; do
      echo "  '$pattern': $(grep -c "$pattern" "$log" || true)"
    done
    grep -i "graph" "$log" | sed 's/^.*\(llama\|ggml\)/\1/' | sort | uniq -c | sort -rn | head -n 20 || true
  } | tee "$out/steps-debug.txt"
  fi
  for variant in $variants; do
    case $variant in threads-*) continue ;; esac
    local env=()
    [ "$variant" = no-graph-reuse ] && env=(LLAMA_GRAPH_REUSE_DISABLE=1)
    [ "$variant" = no-cuda-graphs ] && env=(GGML_CUDA_DISABLE_GRAPHS=1)
    (
      if [ ${#env[@]} -gt 0 ]; then export "${env[@]}"; fi
      anchor "$results/batched-bench-$shape-$variant.txt" -m "$work/m$shape.gguf" \
        -c 16384 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 8,32 -ngl 999
      exit "$anchor_failed"
    ) || anchor_failed=1
    { echo "anchor $variant"; grep -E "^main: n_kv_max|^\|" "$results/batched-bench-$shape-$variant.txt" || true; } | tee -a "$out/steps.txt"
  done
  [ "$anchor_failed" = 0 ] || { echo "steps: the anchor failed (see $out/anchor-failures.txt)" >&2; return 1; }
}

# N streams over K contexts, each on its own thread (bench/gpu/lanes-bench/lanes-bench.cpp):
# greedy tokens chosen on the host as the engine does, in llama.cpp's graph (backend samplers),
# and random tokens as the anchor does.
lanes() {
  local shapes=${ISTHMUS_GPU_SHAPES:-135m 1b} rounds=${ISTHMUS_GPU_LANE_ROUNDS:-2}
  # shellcheck disable=SC2086
  models $shapes
  export PYTHONPATH=/tmp/site
  for round in $(seq 1 "$rounds"); do
    for shape in $shapes; do
      for spec in ${ISTHMUS_GPU_LANE_CASES:-1_1_1 8_1_0 8_1_1 8_2_1 8_4_1 32_1_0 32_1_1 32_2_1 32_4_1}; do
        # shellcheck disable=SC2086
        set -- ${spec//_/ }
        echo "$shape round $round: $("$work/build/bin/isthmus-lanes-bench" "$work/m$shape.gguf" "$1" "$2" 128 128 "$3" 2>&1 | tail -n 1)" \
          | tee -a "$out/lanes.txt"
      done
    done
  done
  if [ "${ISTHMUS_GPU_ANCHOR:-1}" = 1 ]; then
    for shape in $shapes; do
      anchor "$results/batched-bench-$shape.txt" -m "$work/m$shape.gguf" -c 16384 -b 2048 -ub 512 \
        -npp 128 -ntg 128 -npl 1,8,32 -ngl 999
      { echo "anchor $shape"; grep -E "^\|" "$results/batched-bench-$shape.txt" || true; } | tee -a "$out/lanes.txt"
    done
  fi
  [ "$anchor_failed" = 0 ] || { echo "lanes: the anchor failed (see $out/anchor-failures.txt)" >&2; return 1; }
}

# The request features whose tokens are chosen on the host from a logits row (a JSON
# grammar, log-probabilities, several choices) with every layer on the GPU and the tokens of
# each step chosen before the next is launched: answers checked by bench/gpu/check_features.py.
features() {
  models 135m
  serve "$work/m135m.gguf" features "lanes = 2"
  python3 bench/gpu/check_features.py http://127.0.0.1:19900 | tee "$out/features.txt"
  local status=${PIPESTATUS[0]}
  kill "$server" && wait "$server" || true
  return "$status"
}

"$phase"
