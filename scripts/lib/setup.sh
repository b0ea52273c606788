# Shared set-up for scripts/run.sh and scripts/test.sh (sourced, not run).
# Installs, only when missing, what building Fulcrum needs on Debian/Ubuntu: a C toolchain (the
# linker), DPDK 22.11's development files (dpdk, libdpdk-dev, libclang-dev) and a Rust toolchain
# at least as new as the workspace's `rust-version`.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root (directly, or through sudo when available).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (run this script as root, or install sudo)"
    fi
}

APT_UPDATED=0
# apt_install PKG...: installs the Debian packages that are not installed yet.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing[*]} and no apt-get: install them by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# The workspace's minimum Rust version (rust-version in Cargo.toml), e.g. 1.85.
rust_min() {
    sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$ROOT/Cargo.toml" | head -n1
}

# version_ge A B: whether dotted version A >= B.
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

rustc_version() {
    rustc --version 2>/dev/null | awk '{print $2}' | sed 's/-.*//'
}

ensure_toolchain() {
    # A C compiler/linker: rustc links through `cc`.
    command -v cc >/dev/null 2>&1 || apt_install build-essential
    # DPDK 22.11 for fulcrum-dpdk (found through pkg-config libdpdk; bindgen needs libclang;
    # libsystemd-dev completes what a static DPDK link needs).
    apt_install dpdk libdpdk-dev dpdk-dev pkg-config libclang-dev clang libsystemd-dev
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    local min
    min="$(rust_min)"
    if ! command -v cargo >/dev/null 2>&1; then
        log "cargo not found: installing Debian's cargo and rustc"
        apt_install ca-certificates cargo rustc
    fi
    local have
    have="$(rustc_version)"
    if ! version_ge "$have" "$min"; then
        # Debian 12 ships rustc 1.63, Ubuntu 24.04 1.75: too old. rustup is the usual way out; it
        # needs access to static.rust-lang.org. Set FULCRUM_NO_RUSTUP=1 to refuse it.
        [ "${FULCRUM_NO_RUSTUP:-0}" = 1 ] && die "rustc $have is older than $min (the workspace's rust-version); install a newer Rust toolchain"
        log "rustc $have is older than $min: installing a stable toolchain with rustup"
        apt_install ca-certificates curl
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
        . "$HOME/.cargo/env"
        have="$(rustc_version)"
        version_ge "$have" "$min" || die "rustc $have is still older than $min"
    fi
    log "using $(cargo --version), $(rustc --version)"
}
