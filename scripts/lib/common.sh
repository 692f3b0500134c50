# Shared by scripts/demo and scripts/test: system packages, the build cache, the model.
# Sourced, not run.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs (as root) or names the Debian packages the build needs, plus the commands named
# as arguments (`command=package`) that only some scripts use.
ensure_system_packages() {
  local missing=()
  local wanted
  for wanted in "$@"; do
    command -v "${wanted%%=*}" >/dev/null 2>&1 || missing+=("${wanted#*=}")
  done
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  command -v clang >/dev/null 2>&1 || missing+=(clang)
  # bindgen (llama.cpp's Rust bindings) loads libclang at build time.
  if ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
    missing+=(libclang-dev)
  fi
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  # The admin console (TypeScript, Vite) is built into the binary.
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing system packages: ${missing[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "missing system packages: ${missing[*]}" >&2
      echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  # Vite, which builds the console, needs Node.js 20.19 or later (Debian 12's own is 18).
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' 2>/dev/null; then
    echo "Node.js $(node --version 2>/dev/null || echo '(none)') is too old to build the admin console: install Node.js 20.19 or later" >&2
    echo "(for example from https://deb.nodesource.com, or Debian 13's nodejs), then run this again" >&2
    exit 1
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
    exit 1
  fi
}

# Reuse a build cache outside the checkout when the machine has one (or root can make one);
# otherwise build in ./target.
choose_target_dir() {
  if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    if [ -d /var/cache/isthmus ] && [ -w /var/cache/isthmus ]; then
      export CARGO_TARGET_DIR=/var/cache/isthmus/target
    elif [ "$(id -u)" = 0 ] && mkdir -p /var/cache/isthmus 2>/dev/null; then
      export CARGO_TARGET_DIR=/var/cache/isthmus/target
    else
      export CARGO_TARGET_DIR="$root/target"
    fi
  fi
  say "build directory: $CARGO_TARGET_DIR"
  # Cargo names the artifacts of workspace members the same in every checkout and decides
  # freshness by file times, so a build directory shared with another checkout can hold
  # builds of that checkout's sources. Rebuild our own crates when the checkout changed;
  # dependencies stay cached.
  local marker="$CARGO_TARGET_DIR/.isthmus-checkout"
  if [ -f "$marker" ] && [ "$(cat "$marker")" != "$root" ]; then
    say "build directory last used by $(cat "$marker"); rebuilding this checkout's crates"
    cargo clean --quiet -p gateway -p edge-runtime -p router-policies -p firmware -p tests
    cargo clean --quiet --release -p gateway -p edge-runtime -p router-policies -p firmware -p tests
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s\n' "$root" > "$marker"
}
