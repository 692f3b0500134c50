# Shared by the cloud-leg benchmarks: a scratch directory, the processes they start (stopped
# on exit), free ports and waiting for a listener. Sourced, not run.

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port [tries of 50 ms]
  for _ in $(seq 1 "${2:-200}"); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; return 1
}

# The configuration of a benchmarked gateway: plain HTTP on PORT, one thread, no local model,
# one pool `fast` whose model `fast` goes to the upstream on UPSTREAM_PORT.
gateway_config() { # file state_dir port admin_port upstream_port audit_enabled
  cat > "$1" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:$4"
plain_listen = "127.0.0.1:$3"
state_dir = "$2"
worker_threads = 1
[auth]
allow_anonymous = true
[upstreams.fast]
models = { "fast" = "fast" }
protocol = "http1"
[[upstreams.fast.backends]]
url = "http://127.0.0.1:$5"
[audit]
enabled = $6
[logging]
level = "warn"
TOML
}
