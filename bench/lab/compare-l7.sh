#!/usr/bin/env bash
# Fulcrum's L7 proxy beside nginx and HAProxy as reverse proxies, in the same namespace lab
# (vagrant/lab.sh), with the same backends (nginx on be1-be3:8080), the same client (wrk, keep-alive,
# from fl-client) and the same load, one after another on the appliance's veth. Each proxy gets one
# worker (Fulcrum: one worker core on DPDK, AF_XDP or AF_PACKET as IO says; nginx: worker_processes 1; HAProxy:
# nbthread 1) and keeps upstream connections alive. Prints one JSON line and a table.
# Needs root; tears the lab down on exit.
#
#   bash bench/lab/compare-l7.sh [SECONDS] [CONNECTIONS]
#   (FULCRUM=path/to/fulcrum to pick a binary; IO=af_xdp|af_packet, default af_xdp as the lab)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
FULCRUM="${FULCRUM:-$ROOT/target/release/fulcrum}"
SECS="${1:-10}"
CONNS="${2:-16}"
IO="${IO:-af_xdp}"
case "$IO" in af_xdp | af_packet) ;; *) echo "IO must be af_xdp or af_packet, not $IO" >&2; exit 2 ;; esac
LAB="$ROOT/vagrant/lab.sh"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    bash "$LAB" down >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
[ -x "$FULCRUM" ] || { echo "build first: cargo build --release -p fulcrum" >&2; exit 1; }
for c in wrk haproxy nginx; do
    command -v "$c" >/dev/null || apt-get install -y -q --no-install-recommends wrk haproxy nginx-light >/dev/null
done
bash "$LAB" down >/dev/null 2>&1 || true
bash "$LAB" up >/dev/null

L7=10.20.0.100
load() {
    # wrk's summary as JSON: requests/s, latency p50/p99 (ms), non-2xx and socket errors.
    ip netns exec fl-client wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H "Host: web.lab" "http://$L7/" >"$TMP/$1.wrk" 2>&1 || true
    python3 "$ROOT/bench/lab/wrk_summary.py" "$TMP/$1.wrk"
}
wait_http() {
    for _ in $(seq 1 60); do
        ip netns exec fl-client curl -s -m 1 -o /dev/null -H "Host: web.lab" "http://$L7/" && return 0
        sleep 0.25
    done
    echo "$1 never answered on $L7" >&2; exit 1
}

# 1. Fulcrum (the lab bootstrap's l7 section serves the lab's Ingresses on 10.20.0.100).
cp "$ROOT/config/examples/bootstrap.yaml" "$ROOT/config/examples/lab/manifests.yaml" "$TMP/"
ip netns exec fl-lb "$FULCRUM" run --config "$TMP/bootstrap.yaml" --manifests "$TMP/manifests.yaml" \
    --device "net_${IO}0,iface=veth-lb" >"$TMP/fulcrum.out" 2>"$TMP/fulcrum.err" &
PIDS+=($!)
wait_http fulcrum
FULCRUM_JSON="$(load fulcrum)"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'

# The kernel takes over the veth: the appliance's address and the L7 address on it.
ns() { ip netns exec fl-lb "$@"; }
ns ip addr add 10.10.0.2/24 dev veth-lb
ns ip addr add "$L7/32" dev veth-lb
UPSTREAMS="10.10.0.11:8080 10.10.0.12:8080 10.10.0.13:8080"

# 2. nginx as a reverse proxy, one worker, upstream keep-alive.
{
    echo "worker_processes 1; pid $TMP/nginx.pid; error_log $TMP/nginx.err;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; upstream web { keepalive 64;"
    for u in $UPSTREAMS; do echo "  server $u;"; done
    echo "} server { listen $L7:80 reuseport backlog=4096; server_name web.lab;"
    echo "  location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection \"\";"
    echo "    proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }"
} >"$TMP/nginx.conf"
ns nginx -c "$TMP/nginx.conf" -p "$TMP" -g 'daemon off;' >"$TMP/nginx.out" 2>&1 &
PIDS+=($!)
wait_http nginx
NGINX_JSON="$(load nginx)"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'

# 3. HAProxy, one thread, HTTP mode with connection reuse.
{
    echo "global"
    echo "  nbthread 1"
    echo "  maxconn 20000"
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 5s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "  http-reuse always"
    echo "  option forwardfor"
    echo "frontend fe"
    echo "  bind $L7:80"
    echo "  default_backend web"
    echo "backend web"
    echo "  balance roundrobin"
    i=0; for u in $UPSTREAMS; do i=$((i + 1)); echo "  server be$i $u"; done
} >"$TMP/haproxy.cfg"
ns haproxy -f "$TMP/haproxy.cfg" -db >"$TMP/haproxy.out" 2>&1 &
PIDS+=($!)
wait_http haproxy
HAPROXY_JSON="$(load haproxy)"

python3 - "$SECS" "$CONNS" "$FULCRUM_JSON" "$NGINX_JSON" "$HAPROXY_JSON" "$IO" <<'PY'
import json, sys
secs, conns = float(sys.argv[1]), int(sys.argv[2])
f, n, h = (json.loads(x) for x in sys.argv[3:6])
load = float(open("/proc/loadavg").read().split()[0])
out = {"bench": "lab-compare-l7", "seconds": secs, "connections": conns, "client": "wrk -t1 keep-alive",
       "fulcrum_io": sys.argv[6], "fulcrum": f, "nginx": n, "haproxy": h,
       "ratio_fulcrum_to_nginx": (f["requests_per_s"] or 0) / max(1e-9, n["requests_per_s"] or 0),
       "ratio_fulcrum_to_haproxy": (f["requests_per_s"] or 0) / max(1e-9, h["requests_per_s"] or 0),
       "loadavg": load}
print(f"{'proxy':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}", file=sys.stderr)
for name, d in (("fulcrum", f), ("nginx", n), ("haproxy", h)):
    print(f"{name:<10} {d['requests_per_s'] or 0:>10.0f} {d['p50_ms'] or 0:>8.2f} {d['p99_ms'] or 0:>8.2f} {d['non_2xx']:>8} {d['socket_errors']:>8}", file=sys.stderr)
print(json.dumps(out))
PY
