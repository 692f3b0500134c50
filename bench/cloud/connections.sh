#!/usr/bin/env bash
# Backend connections and memory of the audit-on gateway under load: how many connections
# the gateway opens to its backend, and its peak RSS, when the audit log's flushes stall
# (as this kind of disk does several times a minute). Each run starts a fresh gateway (audit
# on, no local model) and a fake upstream that counts the connections it accepts, with the
# placement of compare.sh (load generator on CPU 0, gateway and upstream on CPU 1), and runs
# on the same gateway: an open loop at 2,000 req/s, the same streamed at 1,000 req/s, and a
# closed loop of 64 clients, each for SECONDS.
#
#   bench/cloud/connections.sh [ROUNDS] [SECONDS] [BINARY...]   # defaults: 3, 8, this build
#
# Several binaries (copies of `isthmus` from other builds) alternate within each round, for
# A/B runs. Prints one line per phase: requests/s, errors, latency p50/p99 in ms, and the
# connections the upstream has accepted so far; then the gateway's peak RSS.
set -euo pipefail
rounds=${1:-3}
seconds=${2:-8}
shift $(($# < 2 ? $# : 2))
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../scripts/lib/common.sh
. "$root/scripts/lib/common.sh"
choose_target_dir
command -v taskset >/dev/null || { echo "taskset is missing: apt-get install -y util-linux" >&2; exit 1; }
cargo build --release --locked --workspace --bin isthmus --bin fake-upstream
bin=$CARGO_TARGET_DIR/release
export LD_LIBRARY_PATH=$bin
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=("$bin/isthmus")
# shellcheck source=lib.sh
. "$root/bench/cloud/lib.sh"

run_one() { # binary
  local gateway=$1 upstream_port gateway_port admin_port upstream gateway_pid dir
  dir=$(mktemp -d "$work/run.XXXX")
  upstream_port=$(free_port); gateway_port=$(free_port); admin_port=$(free_port)
  taskset -c 1 "$bin/fake-upstream" --listen "127.0.0.1:$upstream_port" --name fast --tokens 8 \
    --control > "$dir/upstream.out" 2>&1 &
  upstream=$!
  pids+=("$upstream")
  gateway_config "$dir/isthmus.toml" "$dir/state" "$gateway_port" "$admin_port" \
    "$upstream_port" true
  taskset -c 1 "$gateway" serve --config "$dir/isthmus.toml" > "$dir/gateway.out" 2>&1 &
  gateway_pid=$!
  pids+=("$gateway_pid")
  wait_port "$upstream_port"
  wait_port "$gateway_port"
  phase() { # name bench-options...
    local name=$1
    shift
    taskset -c 0 "$bin/isthmus" bench --url "http://127.0.0.1:$gateway_port" --model fast \
      --ignore-eos false --max-tokens 8 --prompt-tokens 64 --warmup 16 --seed 7 --json "$@" \
      > "$dir/$name.json"
    local connections
    connections=$(curl -s "http://127.0.0.1:$upstream_port/_control/stats" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])')
    python3 - "$dir/$name.json" "$name" "$connections" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
latency = report["end_to_end_ms"]
print(f"  {sys.argv[2]:<12} {report['requests_per_s']:>7.0f} req/s  errors {report['errors']}  "
      f"p50 {latency['p50']:.3f}  p99 {latency['p99']:.3f} ms  upstream connections {sys.argv[3]}")
PY
  }
  phase open-2000 --stream false --concurrency 512 --rate 2000 --duration-s "$seconds"
  phase stream-1000 --stream true --concurrency 512 --rate 1000 --duration-s "$seconds"
  phase closed-64 --stream false --concurrency 64 --duration-s "$seconds"
  echo "  peak RSS $(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$gateway_pid/status") MiB"
  kill "$gateway_pid" "$upstream"
  wait "$gateway_pid" "$upstream" 2>/dev/null || true
}

for round in $(seq 1 "$rounds"); do
  for gateway in "${binaries[@]}"; do
    echo "round $round: $gateway"
    run_one "$gateway"
  done
done
