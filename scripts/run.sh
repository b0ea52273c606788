#!/usr/bin/env bash
# Builds Fulcrum (release) and runs it on its embedded default. Installs what it needs first (see
# scripts/lib/setup.sh), so it works on a fresh Debian/Ubuntu machine as root.
#
# Today the default is: validate the example bootstrap file and manifests and print the VIP table
# (`fulcrum check`), then run the L4 benchmark, the real worker code over in-memory ports
# (`fulcrum-bench l4`), and print its JSON line. The DPDK lab (veth + AF_XDP vdev) becomes the
# default once `fulcrum run` / `fulcrum lab` exist (issue 3).
. "$(dirname "$0")/lib/setup.sh"

ensure_toolchain

log "cargo build --release -p fulcrum -p fulcrum-bench"
cargo build --release --locked -p fulcrum -p fulcrum-bench
target="${CARGO_TARGET_DIR:-$ROOT/target}"

log "fulcrum check --config config/examples/bootstrap.yaml --manifests config/examples/manifests"
"$target/release/fulcrum" check --config config/examples/bootstrap.yaml --manifests config/examples/manifests

log "fulcrum-bench l4 --flows ${BENCH_FLOWS:-100000} --seconds ${BENCH_SECONDS:-2}"
"$target/release/fulcrum-bench" l4 --flows "${BENCH_FLOWS:-100000}" --seconds "${BENCH_SECONDS:-2}"
