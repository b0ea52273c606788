#!/usr/bin/env bash
# Runs every test of the workspace. Installs what it needs first (see scripts/lib/setup.sh), so it
# works on a fresh Debian/Ubuntu machine as root. Uses cargo-nextest when it is installed (and
# FULCRUM_NO_NEXTEST is not 1), else `cargo test`; either way the last line printed is the
# runner's summary. Exits non-zero if a test fails.
. "$(dirname "$0")/lib/setup.sh"

ensure_toolchain
# The end-to-end tests bring up the namespace lab (nginx, socat, ethtool, clang for the DSR
# decapsulator...), and the Vagrantfile is validated as CI must.
log "lab packages (vagrant/lab.sh deps)"
bash "$ROOT/vagrant/lab.sh" deps
apt_install vagrant
# The Kubernetes end-to-end test: a real kube-apiserver from ../shared/k8s (its start script
# installs etcd-server) and kubectl (Debian's kubernetes-client when none is installed).
log "Kubernetes test client (kubectl) and etcd"
command -v kubectl >/dev/null || apt_install kubernetes-client
command -v etcd >/dev/null || apt_install etcd-server
log "vagrant validate -p (vagrant/Vagrantfile)"
(cd "$ROOT/vagrant" && vagrant validate -p)

if [ "${FULCRUM_NO_NEXTEST:-0}" != 1 ] && cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run --workspace --no-fail-fast"
    # The workspace has no doctests; nextest would not run them (cargo test --doc would).
    exec cargo nextest run --workspace --no-fail-fast
fi

log "cargo test --workspace --no-fail-fast (cargo-nextest not installed)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$out" || status=$?
# One summary line over every test binary, like nextest's.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { v = $i + 0; k = $(i + 1); sub(/[;,]/, "", k);
        if (k == "passed" || k == "failed" || k == "ignored") s[k] += v } bins++ }
     END { printf "Summary: %d test binaries: %d passed, %d failed, %d ignored\n", bins, s["passed"], s["failed"], s["ignored"] }' "$out"
exit "$status"
