#!/usr/bin/env bash
# The Fulcrum lab as network namespaces on this host (CI and `fulcrum lab`). Topology from
# topology.env; see README.md.
#
#   lab.sh up               create namespaces, bridge, veths (offloads off), addresses, routes,
#                           DSR decapsulation, start nginx + UDP echo on every backend (idempotent)
#   lab.sh down             stop the servers (by PID) and remove everything, even after a partial up
#   lab.sh status           what exists and what runs; exit 1 unless the lab is fully up
#   lab.sh exec ROLE CMD..  run CMD in ROLE's namespace: client | lb | be1 | be2 | be3 | net
#   lab.sh env              print the topology (KEY=VALUE) plus LAB_DIR and DSR_MODE
#   lab.sh deps             apt-get install what the lab needs
#
# Environment: FL_LAB_DIR (state: configs, logs, PID files; default /run/fulcrum-lab),
# FL_DSR_MODE=tunnel|bpf (default: tunnel devices if the kernel has ipip/ip6tnl, else tc-bpf).
# Needs root. Nothing is created in the host's own network namespace.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
topo_load

LAB_DIR="${FL_LAB_DIR:-/run/fulcrum-lab}"
PID_DIR="$LAB_DIR/pids"

all_ns() { echo "$NET_NS $LB_NS $PEER_NS $CLIENT_NS $(for b in "${LAB_BACKENDS[@]}"; do be_var "$b" NS; echo -n " "; done)"; }
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

role_ns() {
    case "$1" in
    client) echo "$CLIENT_NS" ;;
    lb | appliance | fulcrum) echo "$LB_NS" ;;
    lb2 | peer) echo "$PEER_NS" ;;
    net | bridge | router) echo "$NET_NS" ;;
    *)
        local n
        n="$(be_var "$1" NS)"
        [ -n "$n" ] || lab_die "unknown role '$1' (client | lb | net | ${BACKENDS//,/ | })"
        echo "$n"
        ;;
    esac
}

ensure_ns() {
    ns_exists "$1" || ip netns add "$1"
    nsx "$1" ip link set lo up
}

# veth pair: $dev (with $mac) in $ns, peer p-$role on the bridge in $NET_NS.
ensure_link() {
    local role="$1" ns="$2" dev="$3" mac="$4" peer="p-$1"
    if ! nsx "$ns" ip link show "$dev" >/dev/null 2>&1; then
        nsx "$NET_NS" ip link del "$peer" 2>/dev/null || true
        # Created directly in the two namespaces: the host's namespace never sees it.
        ip link add "$dev" netns "$ns" address "$mac" mtu "$LAB_MTU" type veth \
            peer name "$peer" netns "$NET_NS" mtu "$LAB_MTU"
    fi
    nsx "$NET_NS" ip link set "$peer" master "$BRIDGE" up
    ns_sysctl "$NET_NS" "net.ipv6.conf.$peer.disable_ipv6=1"
    nsx "$ns" ip link set "$dev" address "$mac" up
    offloads_off "$NET_NS" "$peer"
    offloads_off "$ns" "$dev"
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# start NAME NS CMD...: in the background in its own session (a Ctrl-C in the caller's terminal
# does not reach it); the process writes its own PID to $PID_DIR/NAME.pid before exec'ing the
# command (ip netns exec execs too, so it is the server's PID). No-op if already running.
start_bg() {
    local name="$1" ns="$2" pidf="$PID_DIR/$1.pid" i
    shift 2
    if [ -s "$pidf" ] && pid_alive "$(cat "$pidf")"; then return 0; fi
    rm -f "$pidf"
    # shellcheck disable=SC2016
    setsid -f sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidf" \
        ip netns exec "$ns" "$@" </dev/null >"$LAB_DIR/$name.log" 2>&1
    for i in $(seq 1 50); do
        [ -s "$pidf" ] && return 0
        sleep 0.1
    done
    lab_die "$name did not start (see $LAB_DIR/$name.log)"
}

# Wait until TCP/UDP port is bound in ns.
wait_listen() {
    local ns="$1" proto="$2" port="$3" i
    for i in $(seq 1 50); do
        nsx "$ns" ss -Hln"${proto}" "sport = :$port" | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

cmd_up() {
    [ "$(id -u)" = 0 ] || lab_die "needs root"
    local c
    for c in ip ethtool nginx python3 tc ss; do
        have_cmd "$c" || lab_die "missing '$c': run '$0 deps' (apt-get install $(lab_packages))"
    done
    mkdir -p "$LAB_DIR" "$PID_DIR"

    # The segment: a bridge in its own namespace; its address is the configured next hop.
    ensure_ns "$NET_NS"
    if ! nsx "$NET_NS" ip link show "$BRIDGE" >/dev/null 2>&1; then
        nsx "$NET_NS" ip link add "$BRIDGE" address "$ROUTER_MAC" type bridge stp_state 0 \
            forward_delay 0 mcast_snooping 0
    fi
    ns_sysctl "$NET_NS" net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
    set_addrs "$NET_NS" "$BRIDGE" "$ROUTER_IP4" "$ROUTER_IP6"

    # The appliance: veth-lb with the configured MAC and no kernel address.
    ensure_ns "$LB_NS"
    ensure_link lb "$LB_NS" "$LB_IF" "$LB_MAC"
    configure_appliance_port "$LB_NS" "$LB_IF" "$LB_MAC"
    # The second appliance of a pair (idle unless a Fulcrum is started there).
    ensure_ns "$PEER_NS"
    ensure_link lb2 "$PEER_NS" "$PEER_IF" "$PEER_MAC"
    configure_appliance_port "$PEER_NS" "$PEER_IF" "$PEER_MAC"

    # The client.
    ensure_ns "$CLIENT_NS"
    ensure_link client "$CLIENT_NS" "$CLIENT_IF" "$CLIENT_MAC"
    configure_client "$CLIENT_NS" "$CLIENT_IF"

    # Backends.
    local b ns dev
    for b in "${LAB_BACKENDS[@]}"; do
        ns="$(be_var "$b" NS)"
        dev="$(be_var "$b" IF)"
        ensure_ns "$ns"
        ensure_link "$b" "$ns" "$dev" "$(be_var "$b" MAC)"
        configure_backend "$ns" "$dev" "$b" "$LAB_DIR/$b"
    done
    for b in "${LAB_BACKENDS[@]}"; do
        ns="$(be_var "$b" NS)"
        # nginx in the foreground, stopped by PID (DESIGN). Its own config, pid and logs.
        start_bg "$b-nginx" "$ns" nginx -p "$LAB_DIR/$b" -c "$LAB_DIR/$b/nginx.conf" \
            -e "$LAB_DIR/$b/error.log" -g 'daemon off;'
        start_bg "$b-udp" "$ns" python3 "$LAB_HERE/tools/udp-echo.py" --port "$UDP_PORT" --name "$b"
        start_bg "$b-edge" "$ns" python3 "$LAB_HERE/tools/edge-servers.py" --ws-port "$WS_PORT" \
            --reset-port "$RESET_PORT" --name "$b"
    done
    for b in "${LAB_BACKENDS[@]}"; do
        ns="$(be_var "$b" NS)"
        wait_listen "$ns" t "$HTTP_PORT" || lab_die "$b: nginx not listening (see $LAB_DIR/$b-nginx.log, $LAB_DIR/$b/error.log)"
        wait_listen "$ns" u "$UDP_PORT" || lab_die "$b: UDP echo not listening (see $LAB_DIR/$b-udp.log)"
        wait_listen "$ns" t "$WS_PORT" || lab_die "$b: edge servers not listening (see $LAB_DIR/$b-edge.log)"
    done
    lab_log "up: client $CLIENT_NS ($CLIENT_IP4), appliance $LB_NS/$LB_IF ($LB_MAC, Fulcrum owns $LB_IP4 $LB_IP6), backends ${BACKENDS} (DSR: $(cat "$LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode"))"
}

# Stop PID (TERM, then KILL after 3 s).
stop_pid() {
    local pid="$1" what="$2" i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    lab_log "$what (pid $pid) ignored SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
    [ "$(id -u)" = 0 ] || lab_die "needs root"
    local f ns pid
    if [ -d "$PID_DIR" ]; then
        for f in "$PID_DIR"/*.pid; do
            [ -e "$f" ] || continue
            stop_pid "$(cat "$f")" "$(basename "$f" .pid)"
            rm -f "$f"
        done
    fi
    # Anything still running inside a lab namespace (e.g. a Fulcrum started in fl-lb) would keep
    # the namespace and its interfaces alive after `ip netns del`: stop it by PID.
    for ns in $(all_ns); do
        ns_exists "$ns" || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            lab_log "stopping pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-60)) in $ns"
            stop_pid "$pid" "pid $pid in $ns"
        done
    done
    for ns in $(all_ns); do
        ns_exists "$ns" && ip netns del "$ns"
    done
    rm -rf "$LAB_DIR"
    lab_log "down"
}

cmd_status() {
    local ok=0 ns f pid
    for ns in $(all_ns); do
        if ns_exists "$ns"; then
            echo "netns $ns:"
            nsx "$ns" ip -br addr show | grep -v '^lo ' | sed 's/^/    /'
        else
            echo "netns $ns: missing"
            ok=1
        fi
    done
    if [ -d "$PID_DIR" ]; then
        for f in "$PID_DIR"/*.pid; do
            [ -e "$f" ] || continue
            pid="$(cat "$f")"
            if pid_alive "$pid"; then echo "$(basename "$f" .pid): running (pid $pid)"
            else echo "$(basename "$f" .pid): NOT running (pid $pid)"; ok=1; fi
        done
        [ -e "$LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode" ] && echo "DSR decapsulation: $(cat "$LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode")"
    else
        echo "no servers (no $PID_DIR)"
        ok=1
    fi
    return "$ok"
}

cmd_env() {
    grep -E '^[A-Z0-9_]+=' "$LAB_HERE/topology.env"
    echo "LAB_DIR=$LAB_DIR"
    [ -e "$LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode" ] && echo "DSR_MODE=$(cat "$LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode")"
    return 0
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
exec)
    [ $# -ge 3 ] || lab_die "usage: $0 exec ROLE CMD..."
    ns="$(role_ns "$2")"
    shift 2
    exec ip netns exec "$ns" "$@"
    ;;
env) cmd_env ;;
deps) apt_install $(lab_packages) ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
