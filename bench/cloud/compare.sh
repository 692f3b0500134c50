#!/usr/bin/env bash
# Overhead of the cloud leg, measured open-loop: the same small OpenAI request sent direct to
# a fast upstream (tests/upstream), through nginx `proxy_pass` (the anchor), and through
# Isthmus with no local model, with its audit log on (the default) and off. The load
# generator (`isthmus bench --rate`) runs on CPU 0; the upstream and the proxy under test share
# CPU 1. Rounds alternate the contenders. Every run lasts the same time (`--duration-s`).
#
#   bench/cloud/compare.sh [ROUNDS] [SECONDS_PER_RUN]      # defaults: 5 rounds, 5 s
#   ISTHMUS_BENCH_PEERS="tensorzero litellm" bench/cloud/compare.sh ...
#
# ISTHMUS_BENCH_PEERS adds other LLM gateways as contenders, installed from PyPI at the
# versions in bench/cloud/peers-requirements.txt into a virtual environment beside the build
# cache: TensorZero (its wheel's embedded Rust gateway, observability off, served from a
# Python process) and the LiteLLM proxy (one worker, no database). Both run on CPU 1 like the
# others and reach the same upstream.
#
# Prints tables of medians and ratios; raw JSON stays in $ISTHMUS_BENCH_OUT (default a
# temporary directory). Needs nginx (Debian package nginx-light or nginx) and taskset.
set -euo pipefail
rounds=${1:-5}
seconds=${2:-5}
read -r -a peers <<< "${ISTHMUS_BENCH_PEERS:-}"
for peer in "${peers[@]}"; do
  case $peer in
    tensorzero | litellm) ;;
    *) echo "ISTHMUS_BENCH_PEERS: unknown gateway '$peer' (known: tensorzero litellm)" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../scripts/lib/common.sh
. "$root/scripts/lib/common.sh"
choose_target_dir
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install -y nginx-light" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset is missing: apt-get install -y util-linux" >&2; exit 1; }
cargo build --release --locked --workspace --bin isthmus --bin fake-upstream
bin=$CARGO_TARGET_DIR/release
out=${ISTHMUS_BENCH_OUT:-$(mktemp -d)}
mkdir -p "$out"
# shellcheck source=lib.sh
. "$root/bench/cloud/lib.sh"

upstream_port=$(free_port)
taskset -c 1 "$bin/fake-upstream" --listen "127.0.0.1:$upstream_port" --name fast --tokens 8 > "$work/upstream.out" 2>&1 &
pids+=($!)
wait_port "$upstream_port"

nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  upstream fast { server 127.0.0.1:$upstream_port; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port;
    client_max_body_size 16m;
    location / {
      proxy_pass http://fast;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
taskset -c 1 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e stderr > "$work/nginx.out" 2>&1 &
pids+=($!)
wait_port "$nginx_port"

# Two Isthmus instances: the audit log on (the default) and off, to price the audit.
start_isthmus() { # name port admin_port audit_enabled
  gateway_config "$work/$1.toml" "$work/state-$1" "$2" "$3" "$upstream_port" "$4"
  taskset -c 1 "$bin/isthmus" serve --config "$work/$1.toml" > "$work/$1.out" 2>&1 &
  pids+=($!)
  wait_port "$2"
}
isthmus_port=$(free_port)
start_isthmus isthmus "$isthmus_port" "$(free_port)" true
isthmus_pid=${pids[-1]}
noaudit_port=$(free_port)
start_isthmus noaudit "$noaudit_port" "$(free_port)" false

declare -A urls=(
  [direct]="http://127.0.0.1:$upstream_port"
  [nginx]="http://127.0.0.1:$nginx_port"
  [isthmus]="http://127.0.0.1:$isthmus_port"
  [noaudit]="http://127.0.0.1:$noaudit_port"
)
declare -A models=([direct]=fast [nginx]=fast [isthmus]=fast [noaudit]=fast)
declare -A rss_pids=([isthmus]=$isthmus_pid [noaudit]=${pids[-1]})
targets=(direct nginx isthmus noaudit)

if [ ${#peers[@]} -gt 0 ]; then
  peers_venv="$(dirname "$CARGO_TARGET_DIR")/peers-venv"
  [ "$CARGO_TARGET_DIR" = "$root/target" ] && peers_venv="$root/.peers-venv"
  wanted=$(sha256sum "$root/bench/cloud/peers-requirements.txt" | cut -d' ' -f1)
  if [ "$(cat "$peers_venv/.requirements-sha256" 2>/dev/null)" != "$wanted" ]; then
    say "preparing $peers_venv with bench/cloud/peers-requirements.txt"
    python3 -m venv "$peers_venv"
    "$peers_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -r "$root/bench/cloud/peers-requirements.txt"
    printf '%s\n' "$wanted" > "$peers_venv/.requirements-sha256"
  fi
fi
for peer in "${peers[@]}"; do
  case $peer in
    tensorzero)
      cat > "$work/tensorzero.toml" <<TOML
[gateway]
observability.enabled = false
[models.fast]
routing = ["upstream"]
[models.fast.providers.upstream]
type = "openai"
api_base = "http://127.0.0.1:$upstream_port/v1/"
model_name = "fast"
api_key_location = "none"
TOML
      # The wheel serves its gateway from inside a Python process, on a port it picks.
      taskset -c 1 "$peers_venv/bin/python" -c '
import signal, sys, tensorzero
gateway = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None,
    postgres_url=None, valkey_url=None, async_setup=False)
print("base_url=" + gateway.base_url, flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
gateway.close()
' "$work/tensorzero.toml" > "$work/tensorzero.out" 2>&1 &
      pids+=($!)
      rss_pids[tensorzero]=$!
      base=""
      for _ in $(seq 1 600); do
        base=$(sed -n 's/^base_url=//p' "$work/tensorzero.out")
        [ -n "$base" ] && break
        sleep 0.1
      done
      [ -n "$base" ] || { cat "$work/tensorzero.out" >&2; echo "TensorZero did not start" >&2; exit 1; }
      # The bench appends /v1/chat/completions; TensorZero serves it under /openai.
      urls[tensorzero]=${base%/v1}
      models[tensorzero]=tensorzero::model_name::fast
      ;;
    litellm)
      litellm_port=$(free_port)
      cat > "$work/litellm.yaml" <<YAML
model_list:
  - model_name: fast
    litellm_params:
      model: openai/fast
      api_base: http://127.0.0.1:$upstream_port/v1
      api_key: none
litellm_settings:
  telemetry: false
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
YAML
      LITELLM_LOG=ERROR taskset -c 1 "$peers_venv/bin/litellm" --config "$work/litellm.yaml" \
        --host 127.0.0.1 --port "$litellm_port" --num_workers 1 > "$work/litellm.out" 2>&1 &
      pids+=($!)
      rss_pids[litellm]=$!
      wait_port "$litellm_port" 2400 || { tail -20 "$work/litellm.out" >&2; exit 1; }
      urls[litellm]="http://127.0.0.1:$litellm_port"
      models[litellm]=fast
      ;;
  esac
  targets+=("$peer")
done

bench() { # target file bench-options... (--stream among them)
  local target=$1 file=$2
  shift 2
  taskset -c 0 "$bin/isthmus" bench --url "${urls[$target]}" --model "${models[$target]}" \
    --ignore-eos false --max-tokens 8 --prompt-tokens 64 --warmup 16 --seed 7 \
    --json "$@" > "$file"
}
for target in "${targets[@]}"; do
  bench "$target" /dev/null --stream false --concurrency 512 --rate 500 --duration-s 2
done
for round in $(seq 1 "$rounds"); do
  # Each round starts with the next contender, so that a drift within a round (or one
  # contender's leftover background work) does not always fall on the same one.
  shift_by=$(( (round - 1) % ${#targets[@]} ))
  order=("${targets[@]:shift_by}" "${targets[@]:0:shift_by}")
  for rate in 500 1000 2000; do
    for target in "${order[@]}"; do
      bench "$target" "$out/open-$target-$rate-$round.json" --stream false --concurrency 512 \
        --rate "$rate" --duration-s "$seconds"
    done
  done
  # The same answers streamed (SSE, 8 chunks, usage, [DONE]) at 1,000 req/s: time to the
  # first token is what a streaming client feels of the gateway.
  for target in "${order[@]}"; do
    bench "$target" "$out/stream-$target-$round.json" --stream true --concurrency 512 \
      --rate 1000 --duration-s "$seconds"
  done
  # Highest sustained rate: a closed loop of 64 clients for the same time.
  for target in "${order[@]}"; do
    bench "$target" "$out/closed-$target-$round.json" --stream false --concurrency 64 \
      --duration-s "$seconds"
  done
  echo "round $round done" >&2
done
# Peak resident memory of each process under test (a process and its children, in KiB).
peak_rss() { # pid
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
rss=()
for target in "${!rss_pids[@]}"; do rss+=("$target=$(peak_rss "${rss_pids[$target]}")"); done
rss+=("nginx=$(ps -o rss= --ppid "$(cat "$work/nginx/nginx.pid")" | awk '{s+=$1} END {print s}')")
python3 - "$out" "$rounds" "${targets[*]}" "${rss[@]}" <<'PY'
import json, statistics, sys, pathlib
out, rounds, targets = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split()
rss = {name: int(kib or 0) / 1024 for name, kib in (item.split("=") for item in sys.argv[4:])}
names = {"direct": "direct", "nginx": "nginx", "isthmus": "Isthmus", "noaudit": "Isthmus, audit off",
         "tensorzero": "TensorZero", "litellm": "LiteLLM"}
def med(values): return statistics.median(values)
def load(name): return json.loads((out / name).read_text())
def closed_runs(target): return [load(f"closed-{target}-{r}.json") for r in range(1, rounds + 1)]
print(f"{rounds} rounds, medians; client on CPU 0, upstream and proxy on CPU 1\n")
print("| rate (req/s) | metric | " + " | ".join(names[t] for t in targets) + " |")
print("|---|---|" + "---|" * len(targets))
added_rows = []
for rate in (500, 1000, 2000):
    reports = {t: [load(f"open-{t}-{rate}-{r}.json") for r in range(1, rounds + 1)] for t in targets}
    for metric in ("p50", "p99"):
        values = {t: med([report["end_to_end_ms"][metric] for report in reports[t]]) for t in targets}
        print(f"| {rate:,} | latency {metric} ms | " + " | ".join(f"{values[t]:.3f}" for t in targets) + " |")
        added_rows.append((f"{rate:,}", f"latency {metric}", {t: values[t] - values["direct"] for t in targets if t != "direct"}))
    # A contender that answered fewer requests per second than were due fell behind.
    achieved = {t: med([report["requests_per_s"] for report in reports[t]]) for t in targets}
    errors = {t: sum(report["errors"] for report in reports[t]) for t in targets}
    if any(errors.values()) or any(achieved[t] < 0.95 * rate for t in targets):
        print(f"| {rate:,} | answered req/s | " + " | ".join(f"{achieved[t]:.0f}" for t in targets) + " |")
        print(f"| {rate:,} | errors | " + " | ".join(str(errors[t]) for t in targets) + " |")
streamed = {t: [load(f"stream-{t}-{r}.json") for r in range(1, rounds + 1)] for t in targets}
for label, key, metric in (("TTFT p50", "ttft_ms", "p50"), ("TTFT p99", "ttft_ms", "p99"),
                           ("latency p99", "end_to_end_ms", "p99")):
    values = {t: med([report[key][metric] for report in streamed[t]]) for t in targets}
    print(f"| 1,000 streamed | {label} ms | " + " | ".join(f"{values[t]:.3f}" for t in targets) + " |")
    added_rows.append(("1,000 streamed", label, {t: values[t] - values["direct"] for t in targets if t != "direct"}))
achieved = {t: med([report["requests_per_s"] for report in streamed[t]]) for t in targets}
errors = {t: sum(report["errors"] for report in streamed[t]) for t in targets}
if any(errors.values()) or any(achieved[t] < 950 for t in targets):
    print("| 1,000 streamed | answered req/s | " + " | ".join(f"{achieved[t]:.0f}" for t in targets) + " |")
    print("| 1,000 streamed | errors | " + " | ".join(str(errors[t]) for t in targets) + " |")
others = [t for t in targets if t != "direct"]
print("\nAdded over direct, ms:\n")
print("| rate (req/s) | metric | " + " | ".join(names[t] for t in others) + " |")
print("|---|---|" + "---|" * len(others))
for rate, metric, added in added_rows:
    print(f"| {rate} | {metric} | " + " | ".join(f"{added[t]:.3f}" for t in others) + " |")
closed = {t: med([report["requests_per_s"] for report in closed_runs(t)]) for t in targets}
print("\nClosed loop, 64 clients:\n")
print("| | " + " | ".join(names[t] for t in targets) + " |")
print("|---|" + "---|" * len(targets))
print("| req/s | " + " | ".join(f"{closed[t]:.0f}" for t in targets) + " |")
print("| × nginx | " + " | ".join(f"{closed[t] / closed['nginx']:.2f}" for t in targets) + " |")
# Requests per second count answers only, but a contender whose requests failed must not
# pass for one that kept up: its errors (and resends after closed connections) are shown.
closed_errors = {t: sum(report["errors"] for report in closed_runs(t)) for t in targets}
closed_resent = {t: sum(report.get("resent", 0) for report in closed_runs(t)) for t in targets}
if any(closed_errors.values()) or any(closed_resent.values()):
    print("| errors | " + " | ".join(str(closed_errors[t]) for t in targets) + " |")
    print("| resent | " + " | ".join(str(closed_resent[t]) for t in targets) + " |")
print("\npeak RSS, MiB (no local model): " + ", ".join(f"{names.get(t, t)} {mib:.1f}" for t, mib in sorted(rss.items())))
PY
echo "raw results: $out" >&2
