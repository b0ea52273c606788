#!/usr/bin/env bash
# SNAT tuples and the backends' TIME-WAIT. Through `fulcrum run` in the namespace lab, new
# connections to the FullNAT VIP (10.20.0.10:80, three nginx backends) at RATE a second for
# SECONDS, from 16 client addresses (bench/lab/new_conns.py, HTTP/1.0: each backend closes first
# and holds the tuple SNAT address:port -> backend in TIME-WAIT for 60 s). A SYN that reaches
# a backend on a tuple it holds in TIME-WAIT is answered with the old connection's ACK unless its
# sequence number happens to be higher; the client then resets and sends its SYN again (Linux at
# once, other stacks a second or more later). The client's TCP timestamps are off, so the
# backend judges on sequence numbers alone, as it does for SYNs from different clients.
# Prints one JSON line: the client's figures, its SYN retransmissions and resets (one each per
# collision), Fulcrum's SNAT TIME-WAIT reuses and conntrack counters. Needs root; tears the lab
# down on exit.
#
#   bash bench/lab/time-wait.sh [SECONDS] [RATE]
#   (FULCRUM=path/to/fulcrum to pick a binary; RATE 0: as fast as the client goes;
#   SNAT_ADDRESSES="10.10.0.20 10.10.0.21 ..." gives the port FullNAT source addresses)
set -euo pipefail
. "$(dirname "$0")/common.sh"
SECS="${1:-50}"
RATE="${2:-3000}"
[ -x "$FULCRUM" ] || { echo "build first: cargo build --release -p fulcrum" >&2; exit 1; }
lab_up

# The lab's bootstrap with the default conntrack capacity (1M flows): flows in TIME-WAIT stay
# for tcp_time_wait (60 s), RATE x 60 of them.
cp "$ROOT/config/examples/bootstrap.yaml" "$ROOT/config/examples/lab/manifests.yaml" "$TMP/"
sed -i "s/^  capacity: 65536$/  capacity: 1048576/" "$TMP/bootstrap.yaml"
if [ -n "${SNAT_ADDRESSES:-}" ]; then
    sed -i "s/^    mtu: 1500$/    mtu: 1500\n    snat_addresses: [$(echo $SNAT_ADDRESSES | tr ' ' ',')]/" "$TMP/bootstrap.yaml"
fi
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests.yaml" \
    --device "net_af_xdp0,iface=veth-lb" >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
APPLIANCE=$!
for _ in $(seq 1 80); do
    ip netns exec fl-client curl -s -m 1 -o /dev/null http://10.20.0.10/ && break
    sleep 0.25
done
client() { ip netns exec fl-client "$@"; }
SRCS=""
for i in $(seq 100 115); do
    client ip addr add "10.10.0.$i/24" dev veth-client
    SRCS="$SRCS,10.10.0.$i"
done
client sysctl -qw net.ipv4.tcp_timestamps=0
# All ports, so that the 16 addresses make about 500,000 distinct client tuples (Linux connects
# from every other port), as many clients would, rather than reuse their own soon.
client sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
client nstat -n >/dev/null
client python3 "$ROOT/bench/lab/new_conns.py" 10.20.0.10 "$SECS" 64 "${SRCS#,}" "$RATE" >"$TMP/client.json"
client nstat -az TcpExtTCPSynRetrans TcpOutRsts >"$TMP/nstat"
ip netns exec fl-lb curl -s 127.0.0.1:9100/metrics >"$TMP/metrics"
python3 - "$TMP" "$(cut -d' ' -f1 /proc/loadavg)" "$FULCRUM" "${SNAT_ADDRESSES:-}" <<'PY'
import json, sys
tmp, load, binary = sys.argv[1:4]
out = {"bench": "time_wait", "fulcrum": binary, "snat_addresses": sys.argv[4].split(),
       **json.loads(open(f"{tmp}/client.json").read())}
nstat = {l.split()[0]: int(l.split()[1]) for l in open(f"{tmp}/nstat") if l[:1].isalpha() and not l.startswith("#")}
out["client_syn_retransmits"] = nstat.get("TcpExtTCPSynRetrans", 0)
out["client_resets"] = nstat.get("TcpOutRsts", 0)
def metric(name):
    return sum(float(l.split()[-1]) for l in open(f"{tmp}/metrics") if l.startswith(name + "{") or l.startswith(name + " "))
out["snat_time_wait_reuses"] = metric("fulcrum_snat_time_wait_reuses_total")
out["conntrack_flows"] = metric("fulcrum_conntrack_flows")
out["conntrack_evictions"] = metric("fulcrum_conntrack_evictions_total")
out["loadavg"] = float(load)
print(json.dumps(out))
PY
