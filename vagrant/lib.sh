# shellcheck shell=bash
# Shared functions of the Fulcrum lab: used by lab.sh (network namespaces on one host) and by
# provision/*.sh (Vagrant VMs), so both build the same topology from topology.env.
#
# Every function that configures a host takes the namespace first; an empty namespace ("")
# means "this machine's own network stack" (the VM case).

LAB_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

lab_log() { printf '[lab] %s\n' "$*" >&2; }
lab_die() { printf '[lab] error: %s\n' "$*" >&2; exit 1; }

# Load topology.env (the single source of names, addresses and MACs).
topo_load() {
    local f="${1:-$LAB_HERE/topology.env}"
    [ -r "$f" ] || lab_die "cannot read $f"
    # shellcheck disable=SC1090
    . "$f"
    IFS=, read -r -a LAB_BACKENDS <<<"$BACKENDS"
}

# be_var be2 IP4 -> value of BE2_IP4
be_var() {
    local v="${1^^}_$2"
    printf '%s' "${!v:-}"
}

# Run a command in namespace $1 ("" = here).
nsx() {
    local ns="$1"
    shift
    if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi
}

ns_sysctl() {
    local ns="$1"
    shift
    local kv
    for kv in "$@"; do nsx "$ns" sysctl -qw "$kv" >/dev/null; done
}

have_cmd() { command -v "$1" >/dev/null 2>&1; }

# Debian packages the lab needs (namespace lab: all roles on this host).
lab_packages() {
    echo iproute2 ethtool nginx-light python3 curl socat iputils-ping clang llvm libc6-dev linux-libc-dev wrk nghttp2-client iptables
}

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    lab_log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

# The interface with MAC $1 (VMs: names differ between providers, MACs are fixed).
iface_by_mac() {
    local mac="${1,,}" d
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && { basename "$d"; return 0; }
    done
    return 1
}

# Offloads off (DESIGN: TCP through the DPDK path breaks on veth otherwise). Features a driver
# does not have are skipped.
offloads_off() {
    local ns="$1" dev="$2" f
    for f in tx rx tso gso gro; do
        nsx "$ns" ethtool -K "$dev" "$f" off >/dev/null 2>&1 || true
    done
}

# Addresses on a lab interface (idempotent). nodad: usable at once, the lab's MACs are unique.
# keep_addr_on_down: Linux removes static IPv6 addresses when a link is set down (IPv4 ones
# stay). A backend taken off the link and back (the e2e's health step) came back without its
# IPv6 address and never answered a neighbour solicitation for it again; a real host's network
# manager would have put the address back.
set_addrs() {
    local ns="$1" dev="$2" ip4="$3" ip6="$4"
    ns_sysctl "$ns" "net.ipv6.conf.$dev.keep_addr_on_down=1"
    nsx "$ns" ip link set "$dev" mtu "$LAB_MTU" up
    nsx "$ns" ip addr replace "$ip4/$LAB_PLEN4" dev "$dev"
    nsx "$ns" ip -6 addr replace "$ip6/$LAB_PLEN6" dev "$dev" nodad
}

# The client: its address, and the VIP pools routed via the appliance.
configure_client() {
    local ns="$1" dev="$2"
    set_addrs "$ns" "$dev" "$CLIENT_IP4" "$CLIENT_IP6"
    nsx "$ns" ip route replace "$VIP_POOL4" via "$LB_IP4" dev "$dev"
    nsx "$ns" ip -6 route replace "$VIP_POOL6" via "$LB_IP6" dev "$dev"
}

# The appliance's data interface: up, right MAC, no kernel IPv4 address, IPv6 off in the kernel
# (Fulcrum answers ARP/NDP in user space; the kernel must not answer or send RS/DAD/MLD there).
configure_appliance_port() {
    local ns="$1" dev="$2" mac="$3"
    nsx "$ns" ip link set "$dev" address "$mac" mtu "$LAB_MTU" up
    nsx "$ns" ip addr flush dev "$dev"
    ns_sysctl "$ns" "net.ipv6.conf.$dev.disable_ipv6=1" "net.ipv4.conf.$dev.arp_ignore=8" \
        "net.ipv4.ip_forward=0"
}

# DSR decapsulation mode this kernel supports: "tunnel" (ipip + ip6tnl devices) or "bpf"
# (tc ingress program, for kernels without CONFIG_NET_IPIP / CONFIG_IPV6_TUNNEL). Probed in a
# namespace ($1) so nothing is created here. FL_DSR_MODE=tunnel|bpf forces one.
dsr_mode() {
    local ns="$1"
    if [ -n "${FL_DSR_MODE:-}" ]; then echo "$FL_DSR_MODE"; return; fi
    if nsx "$ns" ip link add fl-probe type ipip local 192.0.2.1 2>/dev/null; then
        nsx "$ns" ip link del fl-probe
        if nsx "$ns" ip link add fl-probe6 type ip6tnl mode ip6ip6 local 2001:db8::1 2>/dev/null; then
            nsx "$ns" ip link del fl-probe6
            echo tunnel
            return
        fi
    fi
    echo bpf
}

# Compile the tc decapsulator into $1 (a directory), once.
build_decap_bpf() {
    local out="$1/ipip_decap.o" triple
    [ -s "$out" ] && { echo "$out"; return 0; }
    have_cmd clang || lab_die "DSR on this kernel needs clang (no ipip/ip6tnl): apt-get install clang"
    triple="$(gcc -dumpmachine 2>/dev/null || echo "$(uname -m)-linux-gnu")"
    clang -O2 -g0 -target bpf -I"/usr/include/$triple" -c "$LAB_HERE/bpf/ipip_decap.c" -o "$out" ||
        lab_die "building $LAB_HERE/bpf/ipip_decap.c failed"
    echo "$out"
}

# DSR on a backend: accept packets addressed to any VIP (local routes for the pools, no address
# on an interface, so the backend never answers ARP/NDP for a VIP), decapsulate IP-in-IP sent to
# the backend's own address, and answer the client directly from the VIP.
#   dsr_setup NS DEV IP4 IP6 WORKDIR
dsr_setup() {
    local ns="$1" dev="$2" ip4="$3" ip6="$4" work="$5" mode obj
    nsx "$ns" ip link set lo up
    nsx "$ns" ip route replace local "$VIP_POOL4" dev lo table local
    nsx "$ns" ip -6 route replace local "$VIP_POOL6" dev lo table local
    # Answer ARP only for addresses on the asking interface; announce with the interface's own
    # address; no reverse-path filtering (decapsulated packets come in on the tunnel device).
    ns_sysctl "$ns" net.ipv4.conf.all.arp_ignore=1 "net.ipv4.conf.$dev.arp_ignore=1" \
        net.ipv4.conf.all.arp_announce=2 "net.ipv4.conf.$dev.arp_announce=2" \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        "net.ipv4.conf.$dev.rp_filter=0" net.ipv4.conf.lo.rp_filter=0
    mode="$(dsr_mode "$ns")"
    case "$mode" in
    tunnel)
        nsx "$ns" ip link show fl-ipip >/dev/null 2>&1 ||
            nsx "$ns" ip link add fl-ipip type ipip local "$ip4" ||
            lab_die "this kernel cannot create an ipip device: use FL_DSR_MODE=bpf"
        nsx "$ns" ip link show fl-ip6tnl >/dev/null 2>&1 ||
            nsx "$ns" ip link add fl-ip6tnl type ip6tnl mode ip6ip6 local "$ip6" ||
            lab_die "this kernel cannot create an ip6tnl device: use FL_DSR_MODE=bpf"
        ns_sysctl "$ns" net.ipv4.conf.fl-ipip.rp_filter=0
        nsx "$ns" ip link set fl-ipip up
        nsx "$ns" ip link set fl-ip6tnl up
        ;;
    bpf)
        obj="$(build_decap_bpf "$work")"
        nsx "$ns" tc qdisc replace dev "$dev" clsact
        nsx "$ns" tc filter replace dev "$dev" ingress pref 10 handle 1 bpf direct-action \
            obj "$obj" sec tc
        ;;
    *) lab_die "unknown DSR mode '$mode' (FL_DSR_MODE=tunnel|bpf)" ;;
    esac
    echo "$mode" >"$work/dsr-mode"
}

# nginx configuration of backend $1 in directory $2 (run in the foreground:
#   nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;').
#   GET /         -> "be1\n"
#   GET /whoami   -> "be1 client=ADDR:PORT local=ADDR:PORT\n" (DSR keeps the client address)
#   GET /big.bin  -> 1 MiB at 64 KiB/s (a long-lived connection, ~16 s)
write_nginx_conf() {
    local name="$1" dir="$2"
    mkdir -p "$dir/www" "$dir/tmp"
    [ -s "$dir/www/big.bin" ] || head -c 1048576 /dev/zero >"$dir/www/big.bin"
    cat >"$dir/nginx.conf" <<EOF
# Fulcrum lab backend $name (written by vagrant/lib.sh)
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 1000000;
    default_type text/plain;
    server {
        listen $HTTP_PORT reuseport backlog=4096;
        listen [::]:$HTTP_PORT reuseport backlog=4096 ipv6only=on;
        location = / { return 200 "$name\n"; }
        location = /whoami { return 200 "$name client=\$remote_addr:\$remote_port local=\$server_addr:\$server_port\n"; }
        location = /big.bin { root $dir/www; limit_rate 64k; }
        location / { return 404 "$name: not found\n"; }
    }
}
EOF
}

nginx_cmd() { echo "nginx -p $1 -c $1/nginx.conf -e $1/error.log -g 'daemon off;'"; }
udp_echo_cmd() { echo "python3 $LAB_HERE/tools/udp-echo.py --port $UDP_PORT --name $1"; }

# A backend host: address, DSR, server configuration (servers are started by the caller:
# lab.sh in the background with PID files, the VMs with systemd units).
#   configure_backend NS DEV NAME WORKDIR
configure_backend() {
    local ns="$1" dev="$2" name="$3" work="$4"
    mkdir -p "$work"
    set_addrs "$ns" "$dev" "$(be_var "$name" IP4)" "$(be_var "$name" IP6)"
    dsr_setup "$ns" "$dev" "$(be_var "$name" IP4)" "$(be_var "$name" IP6)" "$work"
    write_nginx_conf "$name" "$work"
}
