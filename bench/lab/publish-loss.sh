#!/usr/bin/env bash
# Packets lost while snapshots are published: `fulcrum-bench pktgen` in the client namespace
# sends UDP at a constant rate to the lab's UDP VIP (10.20.0.11:5353, echoed by the three
# backends) through `fulcrum run` on the appliance's veth, twice for the same time: once with the
# manifests left alone, once while another Service's endpoints are rewritten every CHANGE_MS
# milliseconds (each rewrite is a full recompile and publish; Fulcrum checks the manifests every
# 50 ms). Counts the publishes from /metrics. Prints one JSON line. Needs root; tears the lab
# down on exit.
#
#   bash bench/lab/publish-loss.sh [SECONDS] [RATE] [CHANGE_MS]
#   (FULCRUM / FULCRUM_BENCH = paths to the binaries; default: target/release. EXTRA_SERVICES=N
#   adds N LoadBalancer Services of 10 endpoints each, so that every publish costs what a large
#   cluster's does; EAL_ARGS="..." appends EAL arguments to the lab's bootstrap, e.g. "-l 0" for
#   DPDK's own lcore layout)
set -euo pipefail
. "$(dirname "$0")/common.sh"
BENCH="${FULCRUM_BENCH:-$ROOT/target/release/fulcrum-bench}"
SECS="${1:-20}"
RATE="${2:-20000}"
CHANGE_MS="${3:-200}"
for b in "$FULCRUM" "$BENCH"; do
    [ -x "$b" ] || { echo "build first: cargo build --release -p fulcrum -p fulcrum-bench" >&2; exit 1; }
done
lab_up

# Another Service whose only endpoint moves on every change (its table, its VIP entry and the
# whole snapshot are rebuilt; the probed Service's flows must not notice).
churn() {
    cat >"$TMP/manifests/churn.yaml.new" <<EOF
apiVersion: v1
kind: Service
metadata: {name: churn, namespace: lab}
spec:
  type: LoadBalancer
  loadBalancerIP: 10.20.0.99
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: churn-v4, namespace: lab, labels: {kubernetes.io/service-name: churn}}
addressType: IPv4
endpoints: [{addresses: ["10.10.1.$1"], conditions: {ready: true}}]
ports: [{name: http, protocol: TCP, port: 8080}]
EOF
    mv "$TMP/manifests/churn.yaml.new" "$TMP/manifests/churn.yaml"
}
mkdir "$TMP/manifests"
cp "$ROOT/config/examples/bootstrap.yaml" "$TMP/"
cp "$ROOT/config/examples/lab/manifests.yaml" "$TMP/manifests/lab.yaml"
churn 1
# Services on other addresses with 10 endpoints each (never answered: nothing sends to them).
python3 - "${EXTRA_SERVICES:-0}" >"$TMP/manifests/extra.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    eps = ", ".join('{addresses: ["10.40.%d.%d"], conditions: {ready: true}}' % (i // 240, i % 240 + e) for e in range(1, 11))
    print(f"""apiVersion: v1
kind: Service
metadata: {{name: extra-{i}, namespace: lab}}
spec:
  type: LoadBalancer
  loadBalancerIP: 10.21.{i // 250}.{i % 250 + 1}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: extra-{i}, namespace: lab, labels: {{kubernetes.io/service-name: extra-{i}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: http, protocol: TCP, port: 8080}}]
---""")
PY
# The extra Services' addresses join the lab's pool; EAL_ARGS join the EAL's.
python3 - "$TMP/bootstrap.yaml" ${EAL_ARGS:-} <<'PY'
import json, re, sys
path, extra = sys.argv[1], sys.argv[2:]
s = open(path).read()
m = re.search(r"^eal_args: (\[.*\])$", s, re.M)
s = s[:m.start()] + "eal_args: " + json.dumps(json.loads(m.group(1)) + extra) + s[m.end():]
assert "      - 10.20.0.0/24\n" in s
s = s.replace("      - 10.20.0.0/24\n", "      - 10.20.0.0/24\n      - 10.21.0.0/16\n", 1)
open(path, "w").write(s)
PY
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests" \
    --device net_af_packet0,iface=veth-lb --watch-every 0.05 >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
APPLIANCE=$!
for _ in $(seq 1 40); do
    ip netns exec fl-client ping -c1 -W1 10.20.0.11 >/dev/null 2>&1 && break
    sleep 0.25
done
metric() {
    ip netns exec fl-lb curl -s http://127.0.0.1:9100/metrics | awk -v m="$1" '$1 == m {print $2}'
}
published() { metric fulcrum_snapshots_published_total; }
trial() {
    ip netns exec fl-client "$BENCH" pktgen --port net_af_packet0,iface=veth-client --rate "$RATE" \
        --seconds "$SECS" --flows 256 --dst-ip 10.20.0.11 --dst-port 5353 --drain-ms 500 2>"$TMP/pktgen.err" |
        grep '"bench":"pktgen"' | tail -1
}

# The worker's loop iterations over 1 ms and 10 ms so far (`fulcrum_worker_loop_seconds`).
loops_over() {
    ip netns exec fl-lb curl -s http://127.0.0.1:9100/metrics |
        awk '/^fulcrum_worker_loop_seconds_bucket/ { if ($1 ~ /le="0.001"/) a += $2; if ($1 ~ /le="0.01"/) b += $2; if ($1 ~ /le="\+Inf"/) n += $2 }
             END { printf "%d %d\n", n - a, n - b }'
}
QUIET_BEFORE="$(published)"
QUIET_LOOPS_BEFORE="$(loops_over)"
QUIET="$(trial)"
QUIET_AFTER="$(published)"
QUIET_LOOPS_AFTER="$(loops_over)"

( i=2; while :; do churn $((i % 200 + 1)); i=$((i + 1)); sleep "$(awk "BEGIN {print $CHANGE_MS / 1000}")"; done ) &
CHURNER=$!
CHURN_BEFORE="$(published)"
CHURN_LOOPS_BEFORE="$(loops_over)"
CHURN="$(trial)"
CHURN_AFTER="$(published)"
CHURN_LOOPS_AFTER="$(loops_over)"
kill "$CHURNER"; wait "$CHURNER" 2>/dev/null || true
kill -0 "$APPLIANCE" || { echo "fulcrum exited:"; cat "$TMP/fulcrum.err"; exit 1; } >&2

BUILD_S="$(metric fulcrum_snapshot_last_build_seconds)"
python3 - "$SECS" "$RATE" "$CHANGE_MS" "$QUIET" "$CHURN" $((QUIET_AFTER - QUIET_BEFORE)) $((CHURN_AFTER - CHURN_BEFORE)) \
    "${EXTRA_SERVICES:-0}" "${BUILD_S:-0}" "${EAL_ARGS:-}" \
    "$QUIET_LOOPS_BEFORE" "$QUIET_LOOPS_AFTER" "$CHURN_LOOPS_BEFORE" "$CHURN_LOOPS_AFTER" <<'PY'
import json, sys
loops = [[int(x) for x in a.split()] for a in sys.argv[11:15]]
secs, rate, change_ms = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
quiet, churn = json.loads(sys.argv[4]), json.loads(sys.argv[5])
def summary(d, publishes, before, after):
    lat = d["latency_ns"]
    us = lambda v: None if v is None else v / 1e3
    return {"sent": d["sent"], "received": d["received"], "lost": d["lost"], "tx_rejected": d["tx_rejected"],
            "generator_limited": d["generator_limited"], "publishes": publishes,
            "rtt_p50_us": us(lat["p50"]), "rtt_p99_us": us(lat["p99"]), "rtt_max_us": us(lat["max"]),
            "worker_loops_over_1ms": after[0] - before[0], "worker_loops_over_10ms": after[1] - before[1]}
load = open("/proc/loadavg").read().split()[0]
print(json.dumps({"bench": "publish-loss", "seconds": secs, "rate_pps": rate, "change_every_ms": change_ms,
                  "io": "af_packet", "without_changes": summary(quiet, int(sys.argv[6]), loops[0], loops[1]),
                  "with_changes": summary(churn, int(sys.argv[7]), loops[2], loops[3]), "extra_services": int(sys.argv[8]),
                  "last_build_ms": float(sys.argv[9]) * 1e3, "extra_eal_args": sys.argv[10], "loadavg": float(load)}))
PY
