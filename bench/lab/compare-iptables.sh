#!/usr/bin/env bash
# Fulcrum beside the kernel's own iptables DNAT, in the same namespace lab (vagrant/lab.sh), with
# the same clients for the same time each. Both do FullNAT: DNAT to the three backends and SNAT to
# 10.10.0.2. Three loads, one after another:
#   - sequential: `fulcrum lab-client`, HTTP GETs on fresh connections to the TCP VIP and
#     datagrams to the UDP VIP, one at a time (its rate is the round trip, not the data path);
#   - keep-alive: wrk, one thread, CONNECTIONS connections, to the TCP VIP;
#   - new connections: the same wrk with `Connection: close` (a handshake, a request and a close
#     per request: the conntrack's insert and teardown path).
# For the two wrk loads it also counts the frames through the appliance's veth (both directions,
# from the kernel's counters for veth-lb), as packets per second. Prints one JSON line.
# Needs root; tears the lab down on exit.
#
#   bash bench/lab/compare-iptables.sh [SECONDS] [CONNECTIONS]
#   (FULCRUM=path/to/fulcrum to pick a binary; IO=af_packet|af_xdp, default af_packet)
set -euo pipefail
. "$(dirname "$0")/common.sh"
SECS="${1:-10}"
CONNS="${2:-32}"
IO="${IO:-af_packet}"
case "$IO" in af_xdp | af_packet) ;; *) echo "IO must be af_packet or af_xdp, not $IO" >&2; exit 2 ;; esac
[ -x "$FULCRUM" ] || { echo "build first: cargo build --release -p fulcrum" >&2; exit 1; }
command -v iptables >/dev/null || apt-get install -y -q iptables >/dev/null
command -v wrk >/dev/null || apt-get install -y -q --no-install-recommends wrk >/dev/null
lab_up

client() { ip netns exec fl-client "$FULCRUM" lab-client --http 10.20.0.10:80 --udp 10.20.0.11:5353 --seconds "$SECS" | tail -1; }
# Frames through veth-lb so far, received + sent (the kernel counts them whoever reads the veth).
frames() {
    local d=/sys/class/net/veth-lb/statistics
    ip netns exec fl-lb sh -c "echo \$((\$(cat $d/rx_packets) + \$(cat $d/tx_packets)))"
}
# wrk to the TCP VIP (extra arguments: e.g. a header); its summary and the frames per second.
wrk_load() {
    local before after
    before="$(frames)"
    ip netns exec fl-client wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$@" http://10.20.0.10/ >"$TMP/wrk.out" 2>&1 || true
    after="$(frames)"
    python3 "$ROOT/bench/lab/wrk_summary.py" "$TMP/wrk.out" "$((after - before))" "$SECS"
}
loads() {
    echo "{\"sequential\": $(client), \"keep_alive\": $(wrk_load), \"new_connections\": $(wrk_load -H 'Connection: close')}"
}
wait_ping() {
    for _ in $(seq 1 40); do ip netns exec fl-client ping -c1 -W1 "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "$1 never answered" >&2; exit 1
}

# 1. Fulcrum on the appliance's veth (DPDK AF_PACKET or AF_XDP vdev).
cp "$ROOT/config/examples/bootstrap.yaml" "$ROOT/config/examples/lab/manifests.yaml" "$TMP/"
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests.yaml" \
    --device "net_${IO}0,iface=veth-lb" >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
APPLIANCE=$!
wait_ping 10.20.0.10
FULCRUM_JSON="$(loads)"
kill "$APPLIANCE"; wait "$APPLIANCE" 2>/dev/null || true; APPLIANCE=""

# 2. The kernel on the same veth: the address, forwarding, DNAT spread over the backends
#    (statistic: 1/3, then 1/2 of the rest, then the rest), SNAT to the appliance's address.
ns() { ip netns exec fl-lb "$@"; }
ns ip addr add 10.10.0.2/24 dev veth-lb
ns sysctl -qw net.ipv4.ip_forward=1
for proto_port in tcp:80:8080 udp:5353:5353; do
    IFS=: read -r proto vport bport <<<"$proto_port"
    vip=10.20.0.10; [ "$proto" = udp ] && vip=10.20.0.11
    ns iptables -t nat -A PREROUTING -d "$vip" -p "$proto" --dport "$vport" -m statistic --mode random --probability 0.33333 -j DNAT --to-destination "10.10.0.11:$bport"
    ns iptables -t nat -A PREROUTING -d "$vip" -p "$proto" --dport "$vport" -m statistic --mode random --probability 0.5 -j DNAT --to-destination "10.10.0.12:$bport"
    ns iptables -t nat -A PREROUTING -d "$vip" -p "$proto" --dport "$vport" -j DNAT --to-destination "10.10.0.13:$bport"
done
ns iptables -t nat -A POSTROUTING -m conntrack --ctstate DNAT -j SNAT --to-source 10.10.0.2
# The client learned the appliance's MAC from Fulcrum; the veth has the same MAC.
wait_ping 10.10.0.2
KERNEL_JSON="$(loads)"

python3 - "$SECS" "$CONNS" "$IO" "$FULCRUM_JSON" "$KERNEL_JSON" <<'PY'
import json, sys
secs, conns, io = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
f, k = json.loads(sys.argv[4]), json.loads(sys.argv[5])
def summary(d):
    s = d["sequential"]
    return {"sequential": {"requests": s["requests"], "requests_per_s": s["requests"] / secs, "errors": s["errors"],
                           "udp_sent": s["udp_sent"], "udp_received": s["udp_received"],
                           "per_backend": s["per_backend"]},
            "keep_alive": d["keep_alive"], "new_connections": d["new_connections"]}
def ratio(load, key):
    a, b = f[load][key], k[load][key]
    return a / b if a and b else None
load = open("/proc/loadavg").read().split()[0]
print(json.dumps({"bench": "lab-compare", "seconds": secs, "connections": conns,
                  "clients": "sequential lab-client; wrk -t1 keep-alive; wrk -t1 Connection: close",
                  "fulcrum": dict(summary(f), io=io), "iptables_dnat": summary(k),
                  "ratio_sequential_requests": f["sequential"]["requests"] / max(1, k["sequential"]["requests"]),
                  "ratio_keep_alive_requests": ratio("keep_alive", "requests_per_s"),
                  "ratio_new_connection_requests": ratio("new_connections", "requests_per_s"),
                  "loadavg": float(load)}))
PY
