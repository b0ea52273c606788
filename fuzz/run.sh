#!/usr/bin/env bash
# Seeds the corpora and runs fuzz targets for SECONDS each (default 60), one after another, one
# process each. Exits non-zero as soon as a target crashes (the input is left in
# fuzz/artifacts/<target>/; logs in fuzz/logs/<target>.log).
#
#   fuzz/run.sh [SECONDS] [TARGET...]      # default: every target
#
# Needs cargo-fuzz (cargo install cargo-fuzz --locked). Stable Rust works: the sanitizer flags
# need RUSTC_BOOTSTRAP=1, set here. SANITIZER=none to run without AddressSanitizer.
# Regressions (fuzz/regressions/<target>/*) are replayed first; each must pass.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(packet_path packet_frame manifests bootstrap http_request proxy_session)
fi
export RUSTC_BOOTSTRAP=1
san=(--sanitizer "${SANITIZER:-address}")
./seed.sh
mkdir -p logs
# One build for every target: release with debug assertions and overflow checks.
cargo fuzz build "${san[@]}" --debug-assertions
for t in "${targets[@]}"; do
    dict=()
    [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
    if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
        echo "== $t: replaying regressions/$t"
        cargo fuzz run "${san[@]}" --debug-assertions "$t" "regressions/$t"/* -- -runs=1 >"logs/$t.regressions.log" 2>&1 || {
            echo "FAIL: $t: a regression input crashes (logs/$t.regressions.log)"; tail -40 "logs/$t.regressions.log"; exit 1; }
    fi
    echo "== $t: ${secs}s"
    if ! cargo fuzz run "${san[@]}" --debug-assertions "$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 "${dict[@]}" \
        >"logs/$t.log" 2>&1; then
        echo "FAIL: $t crashed; input in fuzz/artifacts/$t/ (logs/$t.log):"
        grep -E "panicked|ERROR|SUMMARY|Test unit written" "logs/$t.log" | head -20
        exit 1
    fi
    grep -E "^Done|DONE|stat::number_of_executed_units|stat::peak_rss" "logs/$t.log" | sed "s/^/   /"
done
echo "ok: ${targets[*]}: no crash in ${secs}s each"
