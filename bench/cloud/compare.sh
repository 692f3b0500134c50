#!/usr/bin/env bash
# Overhead of the cloud leg, measured open-loop: the same small OpenAI request sent direct to
# a fast upstream (tests/upstream), through nginx `proxy_pass` (the anchor), and through
# Isthmus with no local model, with its audit log on (the default) and off. The load generator (`isthmus bench --rate`) runs on CPU 0;
# the upstream and the proxy under test share CPU 1. Rounds alternate the contenders.
#
#   bench/cloud/compare.sh [ROUNDS] [SECONDS_PER_RUN]      # defaults: 5 rounds, 5 s
#
# Prints a table of medians and ratios; raw JSON stays in $ISTHMUS_BENCH_OUT (default a
# temporary directory). Needs nginx (Debian package nginx-light or nginx) and taskset.
set -euo pipefail
rounds=${1:-5}
seconds=${2:-5}
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
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; return 1
}

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
  cat > "$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:$3"
plain_listen = "127.0.0.1:$2"
state_dir = "$work/state-$1"
worker_threads = 1
[auth]
allow_anonymous = true
[upstreams.fast]
models = { "fast" = "fast" }
protocol = "http1"
[[upstreams.fast.backends]]
url = "http://127.0.0.1:$upstream_port"
[audit]
enabled = $4
[logging]
level = "warn"
TOML
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
load() { # target rate requests file
  taskset -c 0 "$bin/isthmus" bench --url "${urls[$1]}" --model fast --stream false \
    --max-tokens 8 --prompt-tokens 64 --concurrency 512 --rate "$2" --requests "$3" \
    --warmup 16 --seed 7 --json > "$4"
}
for target in direct nginx isthmus noaudit; do load "$target" 500 1000 /dev/null; done
for round in $(seq 1 "$rounds"); do
  for rate in 500 1000 2000; do
    for target in direct nginx isthmus noaudit; do
      load "$target" "$rate" $((rate * seconds)) "$out/open-$target-$rate-$round.json"
    done
  done
  # Highest sustained rate: a closed loop of 64 clients for the same time.
  for target in direct nginx isthmus noaudit; do
    taskset -c 0 "$bin/isthmus" bench --url "${urls[$target]}" --model fast --stream false \
      --max-tokens 8 --prompt-tokens 64 --concurrency 64 --requests $((20000 * seconds)) \
      --warmup 16 --seed 7 --json > "$out/closed-$target-$round.json"
  done
  echo "round $round done" >&2
done
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$isthmus_pid/status")
nginx_rss_kib=$(ps -o rss= --ppid "$(cat "$work/nginx/nginx.pid")" | awk '{s+=$1} END {print s}')
python3 - "$out" "$rounds" "$rss_kib" "$nginx_rss_kib" <<'PY'
import json, statistics, sys, pathlib
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rss_mib, nginx_rss_mib = int(sys.argv[3]) / 1024, int(sys.argv[4] or 0) / 1024
def med(values): return statistics.median(values)
def load(name): return json.loads((out / name).read_text())
print(f"{rounds} rounds, medians; client on CPU 0, upstream and proxy on CPU 1\n")
print("| rate (req/s) | metric | direct | nginx | Isthmus | Isthmus, audit off | nginx added | Isthmus added | audit off added |")
print("|---|---|---|---|---|---|---|---|---|")
for rate in (500, 1000, 2000):
    for metric in ("p50", "p99"):
        targets = ("direct", "nginx", "isthmus", "noaudit")
        values = {t: med([load(f"open-{t}-{rate}-{r}.json")["end_to_end_ms"][metric] for r in range(1, rounds + 1)]) for t in targets}
        errors = {t: sum(load(f"open-{t}-{rate}-{r}.json")["errors"] for r in range(1, rounds + 1)) for t in targets}
        added = {t: values[t] - values["direct"] for t in targets}
        print(f"| {rate} | latency {metric} ms | {values['direct']:.3f} | {values['nginx']:.3f} | {values['isthmus']:.3f} | {values['noaudit']:.3f} | {added['nginx']:.3f} | {added['isthmus']:.3f} | {added['noaudit']:.3f} |")
    if any(errors.values()):
        print(f"| {rate} | errors | {errors['direct']} | {errors['nginx']} | {errors['isthmus']} | {errors['noaudit']} | | | |")
closed = {t: med([load(f"closed-{t}-{r}.json")["requests_per_s"] for r in range(1, rounds + 1)]) for t in ("direct", "nginx", "isthmus", "noaudit")}
print(f"\nclosed loop, 64 clients: direct {closed['direct']:.0f} req/s, nginx {closed['nginx']:.0f}, Isthmus {closed['isthmus']:.0f} (Isthmus/nginx {closed['isthmus'] / closed['nginx']:.2f}), Isthmus with the audit log off {closed['noaudit']:.0f}")
print(f"peak RSS: Isthmus {rss_mib:.1f} MiB (no local model), nginx worker {nginx_rss_mib:.1f} MiB")
PY
echo "raw results: $out" >&2
