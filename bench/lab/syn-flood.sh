#!/usr/bin/env bash
# A SYN flood against the L7 address. Through `fulcrum run` in the namespace lab, real clients
# open new connections to http://web.lab/ on 10.20.0.100 (bench/lab/new_conns.py, HTTP/1.0, 16
# at a time, as fast as they go) for SECONDS, first alone, then beside spoofed SYNs at RATE a
# second from the same namespace (bench/lab/syn_flood.py: sources in 198.18.0.0/15 that never
# answer). Fulcrum runs with l7.limits.max_connections MAX: at the limit a new connection takes
# the place of the oldest one still in its handshake. Prints one JSON line: the clients'
# figures alone and flooded, the SYNs sent, and Fulcrum's counters (handshakes given up, SYNs
# dropped at the limit, client connections open at the end). Needs root; tears the lab down on
# exit.
#
#   bash bench/lab/syn-flood.sh [SECONDS] [RATE] [MAX]
#   (FULCRUM=path/to/fulcrum to pick a binary)
set -euo pipefail
. "$(dirname "$0")/common.sh"
SECS="${1:-10}"
RATE="${2:-20000}"
MAX="${3:-1000}"
[ -x "$FULCRUM" ] || { echo "build first: cargo build --release -p fulcrum" >&2; exit 1; }
lab_up
cp "$ROOT/config/examples/bootstrap.yaml" "$ROOT/config/examples/lab/manifests.yaml" "$TMP/"
sed -i "s/^  http_ports: \[80\]$/  http_ports: [80]\n  limits:\n    max_connections: $MAX/" "$TMP/bootstrap.yaml"
grep -q "max_connections: $MAX" "$TMP/bootstrap.yaml" || { echo "could not set l7.limits.max_connections" >&2; exit 1; }
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests.yaml" \
    --device "net_af_xdp0,iface=veth-lb" >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
APPLIANCE=$!
client() { ip netns exec fl-client "$@"; }
for _ in $(seq 1 80); do
    client curl -s -m 1 -o /dev/null -H 'Host: web.lab' http://10.20.0.100/ && break
    sleep 0.25
done
export NEW_CONNS_HOST=web.lab
client python3 "$ROOT/bench/lab/new_conns.py" 10.20.0.100 "$SECS" 16 10.10.0.10 >"$TMP/alone.json"
client python3 "$ROOT/bench/lab/syn_flood.py" 10.20.0.100 80 "$((SECS + 2))" "$RATE" "$TMP/ready" >"$TMP/flood.json" &
FLOOD=$!
# Its packets built (a few seconds for a million), then a second of flood before the clients.
for _ in $(seq 1 600); do [ -e "$TMP/ready" ] && break; sleep 0.1; done
sleep 1
client python3 "$ROOT/bench/lab/new_conns.py" 10.20.0.100 "$SECS" 16 10.10.0.10 >"$TMP/flooded.json"
wait "$FLOOD"
ip netns exec fl-lb curl -s 127.0.0.1:9100/metrics >"$TMP/metrics"
python3 - "$TMP" "$(cut -d' ' -f1 /proc/loadavg)" "$FULCRUM" "$SECS" "$RATE" "$MAX" <<'PY'
import json, sys
tmp, load, binary, secs, rate, mx = sys.argv[1:7]
def metric(name, label=""):
    return sum(float(l.split()[-1]) for l in open(f"{tmp}/metrics")
               if (l.startswith(name + "{") or l.startswith(name + " ")) and label in l)
out = {"bench": "syn_flood", "fulcrum": binary, "seconds": float(secs), "max_connections": int(mx),
       "flood_rate_target": float(rate), "flood": json.loads(open(f"{tmp}/flood.json").read()),
       "clients_alone": json.loads(open(f"{tmp}/alone.json").read()),
       "clients_flooded": json.loads(open(f"{tmp}/flooded.json").read()),
       "handshakes_evicted": metric("fulcrum_l7_handshakes_evicted_total"),
       "syns_dropped_at_limit": metric("fulcrum_drops_total", 'reason="l7_connection_limit"'),
       "client_connections_at_end": metric("fulcrum_l7_client_connections"),
       "loadavg": float(load)}
print(json.dumps(out))
PY
