#!/usr/bin/env bash
# Fulcrum beside the kernel's own iptables DNAT, in the same namespace lab (vagrant/lab.sh), with
# the same client (`fulcrum lab-client`: HTTP GETs on fresh connections to the TCP VIP, datagrams
# to the UDP VIP, sequential) for the same time. Both do FullNAT: DNAT to the three backends and
# SNAT to 10.10.0.2. Prints one JSON line. Needs root; tears the lab down on exit.
#
#   bash bench/lab/compare-iptables.sh [SECONDS]      (FULCRUM=path/to/fulcrum to pick a binary)
set -euo pipefail
. "$(dirname "$0")/common.sh"
SECS="${1:-10}"
[ -x "$FULCRUM" ] || { echo "build first: cargo build --release -p fulcrum" >&2; exit 1; }
command -v iptables >/dev/null || apt-get install -y -q iptables >/dev/null
lab_up

client() { ip netns exec fl-client "$FULCRUM" lab-client --http 10.20.0.10:80 --udp 10.20.0.11:5353 --seconds "$SECS" | tail -1; }
wait_ping() {
    for _ in $(seq 1 40); do ip netns exec fl-client ping -c1 -W1 "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "$1 never answered" >&2; exit 1
}

# 1. Fulcrum on the appliance's veth (DPDK AF_PACKET vdev).
cp "$ROOT/config/examples/bootstrap.yaml" "$ROOT/config/examples/lab/manifests.yaml" "$TMP/"
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests.yaml" \
    --device net_af_packet0,iface=veth-lb >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
APPLIANCE=$!
wait_ping 10.20.0.10
FULCRUM_JSON="$(client)"
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
KERNEL_JSON="$(client)"

python3 - "$SECS" "$FULCRUM_JSON" "$KERNEL_JSON" <<'PY'
import json, sys
secs = float(sys.argv[1]); f = json.loads(sys.argv[2]); k = json.loads(sys.argv[3])
def summary(d):
    return {"requests": d["requests"], "requests_per_s": d["requests"] / secs, "errors": d["errors"],
            "udp_sent": d["udp_sent"], "udp_received": d["udp_received"], "per_backend": d["per_backend"]}
load = open("/proc/loadavg").read().split()[0]
print(json.dumps({"bench": "lab-compare", "seconds": secs, "client": "sequential, new connection per request",
                  "fulcrum_af_packet": summary(f), "iptables_dnat": summary(k),
                  "ratio_requests": f["requests"] / max(1, k["requests"]), "loadavg": float(load)}))
PY
