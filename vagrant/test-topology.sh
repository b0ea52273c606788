#!/usr/bin/env bash
# Proves the namespace lab works without Fulcrum: brings it up (twice: idempotent), checks every
# backend from the client (HTTP, UDP echo, ping; IPv4 and IPv6), checks that nobody's kernel
# answers ARP/NDP for a VIP or for the appliance's addresses, checks DSR decapsulation on every
# backend through a stand-in load balancer (tools/dsr-encap.py in a temporary namespace that
# takes the appliance's addresses), then brings the lab down and checks nothing is left.
# Exits non-zero on any failure. Needs root.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/lib.sh"
topo_load
LAB="$HERE/lab.sh"
export FL_LAB_DIR="${FL_LAB_DIR:-/run/fulcrum-lab}"

TST_NS=fl-tst
TST_IF=veth-tst
TST_MAC=02:f1:00:00:0f:01
VIP4="${VIP_POOL4%.*}.7"
VIP6="${VIP_POOL6%%/*}7"
ENCAP_PID=""
FAILS=0
CHECKS=0

ok() { CHECKS=$((CHECKS + 1)); printf 'ok    %s\n' "$1"; }
bad() { CHECKS=$((CHECKS + 1)); FAILS=$((FAILS + 1)); printf 'FAIL  %s\n' "$1"; [ -n "${2:-}" ] && printf '      %s\n' "$2"; return 0; }
# expect DESC WANT CMD...: CMD's stdout (trailing newline stripped) must equal WANT.
expect() {
    local desc="$1" want="$2" got
    shift 2
    got="$("$@" 2>&1)"
    if [ "$got" = "$want" ]; then ok "$desc"; else bad "$desc" "want '$want', got '$got'"; fi
}
# expect_prefix DESC PREFIX CMD...
expect_prefix() {
    local desc="$1" want="$2" got
    shift 2
    got="$("$@" 2>&1)"
    case "$got" in "$want"*) ok "$desc: $got" ;; *) bad "$desc" "want '$want...', got '$got'" ;; esac
}
succeeds() { local d="$1"; shift; if "$@" >/dev/null 2>&1; then ok "$d"; else bad "$d"; fi; }
fails() { local d="$1"; shift; if "$@" >/dev/null 2>&1; then bad "$d" "unexpectedly succeeded"; else ok "$d"; fi; }

C() { ip netns exec "$CLIENT_NS" "$@"; }
http() { C curl -sS -m 3 "$@"; }
udp() { # udp ADDR PAYLOAD -> reply
    local a="$1" p="$2" fam=UDP4
    case "$a" in *:*) fam=UDP6; a="[$a]" ;; esac
    printf '%s\n' "$p" | C socat -t 2 -T 2 - "$fam:$a:$UDP_PORT"
}

stop_encap() {
    if [ -n "$ENCAP_PID" ] && kill -0 "$ENCAP_PID" 2>/dev/null; then
        kill "$ENCAP_PID" 2>/dev/null
        wait "$ENCAP_PID" 2>/dev/null
    fi
    ENCAP_PID=""
}
remove_tst() {
    stop_encap
    ip netns list | awk '{print $1}' | grep -qx "$TST_NS" && ip netns del "$TST_NS"
    ip netns exec "$CLIENT_NS" ip neigh flush all 2>/dev/null
    ip netns exec "$CLIENT_NS" ip -6 neigh flush all 2>/dev/null
    return 0
}
cleanup() {
    remove_tst
    "$LAB" down >/dev/null 2>&1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

links_before="$(ip -o link show | awk -F': ' '{print $2}' | sort)"

echo "== lab up"
"$LAB" down >/dev/null 2>&1
"$LAB" up || { echo "FAIL  lab.sh up"; exit 1; }
"$LAB" up >/dev/null 2>&1 && ok "lab.sh up again (idempotent)" || bad "lab.sh up again (idempotent)"
"$LAB" status >/dev/null && ok "lab.sh status: everything up" || bad "lab.sh status"
DSR_MODE="$(cat "$FL_LAB_DIR/${LAB_BACKENDS[0]}/dsr-mode")"
echo "   DSR decapsulation on the backends: $DSR_MODE"
[ -z "$(ip netns exec "$LB_NS" ip -o addr show dev "$LB_IF")" ] &&
    ok "appliance $LB_NS/$LB_IF has no kernel address" || bad "appliance $LB_NS/$LB_IF has a kernel address"
[ "$(ip netns exec "$LB_NS" cat "/sys/class/net/$LB_IF/address")" = "$LB_MAC" ] &&
    ok "appliance MAC $LB_MAC" || bad "appliance MAC"
off="$(ip netns exec "$CLIENT_NS" ethtool -k "$CLIENT_IF" | grep -E '^(rx-checksumming|tx-checksumming|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload):' | grep -c ': on')"
[ "$off" = 0 ] && ok "offloads off ($CLIENT_IF)" || bad "offloads still on on $CLIENT_IF"

echo "== client -> backends, directly"
for b in "${LAB_BACKENDS[@]}"; do
    ip4="$(be_var "$b" IP4)"
    ip6="$(be_var "$b" IP6)"
    expect "http://$ip4:$HTTP_PORT/ -> $b" "$b" http "http://$ip4:$HTTP_PORT/"
    expect "http://[$ip6]:$HTTP_PORT/ -> $b" "$b" http "http://[$ip6]:$HTTP_PORT/"
    expect "udp echo $ip4:$UDP_PORT" "hello-$b" udp "$ip4" "hello-$b"
    expect "udp echo [$ip6]:$UDP_PORT" "hello6-$b" udp "$ip6" "hello6-$b"
    expect "udp who? $ip4:$UDP_PORT -> $b" "$b" udp "$ip4" "who?"
    succeeds "ping $ip4" C ping -c 1 -W 2 "$ip4"
    succeeds "ping $ip6" C ping -6 -c 1 -W 2 "$ip6"
done
succeeds "ping next hop $ROUTER_IP4 (bridge)" C ping -c 1 -W 2 "$ROUTER_IP4"
succeeds "ping next hop $ROUTER_IP6 (bridge)" C ping -6 -c 1 -W 2 "$ROUTER_IP6"

echo "== ARP/NDP: only Fulcrum may answer for the appliance and the VIPs"
# Probe the VIP on-link (a temporary /32 route) so the client ARPs/solicits for it.
C ip route add "$VIP4/32" dev "$CLIENT_IF"
C ip -6 route add "$VIP6/128" dev "$CLIENT_IF"
fails "no ARP answer for VIP $VIP4 (backends hold it only as a local route)" C ping -c 1 -W 1 "$VIP4"
fails "no NDP answer for VIP $VIP6" C ping -6 -c 1 -W 1 "$VIP6"
C ip route del "$VIP4/32" dev "$CLIENT_IF"
C ip -6 route del "$VIP6/128" dev "$CLIENT_IF"
fails "no ARP answer for the appliance $LB_IP4 (no kernel address in $LB_NS)" C ping -c 1 -W 1 "$LB_IP4"
fails "no NDP answer for the appliance $LB_IP6" C ping -6 -c 1 -W 1 "$LB_IP6"
for a in "$VIP4" "$LB_IP4" "$VIP6" "$LB_IP6"; do
    if C ip neigh show "$a" | grep -q lladdr; then bad "client learnt a MAC for $a" "$(C ip neigh show "$a")"; fi
done
C ip neigh flush all
C ip -6 neigh flush all

echo "== DSR: IP-in-IP to each backend through a stand-in load balancer ($TST_NS takes $LB_IP4/$LB_IP6)"
ip netns add "$TST_NS"
ip link add "$TST_IF" netns "$TST_NS" address "$TST_MAC" type veth peer name p-tst netns "$NET_NS"
ip -n "$NET_NS" link set p-tst master "$BRIDGE" up
offloads_off "$NET_NS" p-tst
offloads_off "$TST_NS" "$TST_IF"
ip -n "$TST_NS" link set lo up
set_addrs "$TST_NS" "$TST_IF" "$LB_IP4" "$LB_IP6"
# The stand-in's kernel must drop VIP traffic silently (the script forwards it).
ip -n "$TST_NS" route add blackhole "$VIP_POOL4"
ip -n "$TST_NS" -6 route add blackhole "$VIP_POOL6"
for b in "${LAB_BACKENDS[@]}"; do
    ip netns exec "$TST_NS" python3 "$HERE/tools/dsr-encap.py" --iface "$TST_IF" \
        --backend-mac "$(be_var "$b" MAC)" --backend4 "$(be_var "$b" IP4)" --backend6 "$(be_var "$b" IP6)" \
        --vip4 "$VIP_POOL4" --vip6 "$VIP_POOL6" >"$FL_LAB_DIR/dsr-encap-$b.log" 2>&1 &
    ENCAP_PID=$!
    for _ in $(seq 1 30); do grep -qs "dsr-encap on" "$FL_LAB_DIR/dsr-encap-$b.log" && break; sleep 0.1; done
    expect_prefix "DSR http://$VIP4:$HTTP_PORT/whoami via $b (client address kept, answered from the VIP)" \
        "$b client=$CLIENT_IP4:" http "http://$VIP4:$HTTP_PORT/whoami"
    got="$(http "http://$VIP4:$HTTP_PORT/whoami" 2>&1)"
    case "$got" in *"local=$VIP4:$HTTP_PORT") ;; *) bad "DSR reply from the VIP" "$got" ;; esac
    expect_prefix "DSR http://[$VIP6]:$HTTP_PORT/whoami via $b" "$b client=$CLIENT_IP6:" \
        http "http://[$VIP6]:$HTTP_PORT/whoami"
    expect "DSR udp who? $VIP4:$UDP_PORT -> $b (reply from the VIP)" "$b" udp "$VIP4" "who?"
    expect "DSR udp echo [$VIP6]:$UDP_PORT via $b" "dsr6-$b" udp "$VIP6" "dsr6-$b"
    stop_encap
done
remove_tst

echo "== lab down"
"$LAB" down && ok "lab.sh down" || bad "lab.sh down"
"$LAB" down >/dev/null 2>&1 && ok "lab.sh down again (idempotent)" || bad "lab.sh down again"
left="$(ip netns list | awk '{print $1}' | grep -E '^fl-' || true)"
[ -z "$left" ] && ok "no fl-* namespace left" || bad "namespaces left" "$left"
links_after="$(ip -o link show | awk -F': ' '{print $2}' | sort)"
[ "$links_before" = "$links_after" ] && ok "host's own links unchanged" ||
    bad "host links changed" "$(diff <(echo "$links_before") <(echo "$links_after"))"
[ ! -e "$FL_LAB_DIR" ] && ok "$FL_LAB_DIR removed" || bad "$FL_LAB_DIR left"
left="$(pgrep -f "$FL_LAB_DIR/|$HERE/tools/" || true)"
[ -z "$left" ] && ok "no lab process left" || bad "lab processes left" "$left"

echo "== $CHECKS checks, $FAILS failed (DSR mode: $DSR_MODE)"
[ "$FAILS" = 0 ]
