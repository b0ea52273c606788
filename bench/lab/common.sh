# Sourced by the bench/lab scripts: the paths they share, a temporary directory, and a fresh
# namespace lab (vagrant/lab.sh) that is torn down on exit, with the appliance if one runs
# (its pid in APPLIANCE; set it back to "" once stopped by hand).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FULCRUM="${FULCRUM:-$ROOT/target/release/fulcrum}"
LAB="$ROOT/vagrant/lab.sh"
TMP="$(mktemp -d)"
APPLIANCE=""
lab_cleanup() {
    [ -n "$APPLIANCE" ] && kill "$APPLIANCE" 2>/dev/null && wait "$APPLIANCE" 2>/dev/null || true
    bash "$LAB" down >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap lab_cleanup EXIT
# A lab left by an interrupted run goes first.
lab_up() {
    bash "$LAB" down >/dev/null 2>&1 || true
    bash "$LAB" up >/dev/null
}
