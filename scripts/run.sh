#!/usr/bin/env bash
# Builds Fulcrum (release) and runs it on its embedded default: the namespace lab (vagrant/lab.sh)
# with the appliance on DPDK on the appliance's veth, HTTP and UDP traffic from the client
# namespace to every backend, a live table each second, one final JSON line, teardown (Ctrl-C
# too). Installs what it needs first (scripts/lib/setup.sh), so it works on a fresh
# Debian/Ubuntu machine as root. LAB_SECONDS sets the traffic time (default 20).
. "$(dirname "$0")/lib/setup.sh"

ensure_toolchain
log "lab packages (vagrant/lab.sh deps)"
bash "$ROOT/vagrant/lab.sh" deps

log "cargo build --release -p fulcrum"
cargo build --release --locked -p fulcrum
target="${CARGO_TARGET_DIR:-$ROOT/target}"

log "fulcrum lab --duration ${LAB_SECONDS:-20}"
exec "$target/release/fulcrum" lab --duration "${LAB_SECONDS:-20}" --lab-dir "$ROOT/vagrant"
