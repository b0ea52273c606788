#!/usr/bin/env bash
# Backend VM (argument: be1 | be2 | be3): lab address, DSR decapsulation (ipip + ip6tnl tunnel
# devices; tc-bpf where the kernel lacks them), nginx on HTTP_PORT and the UDP echo on UDP_PORT
# as systemd units running the same foreground commands as the namespace lab.
. "$(dirname "$0")/common.sh"
name="${1:?usage: backend.sh be1|be2|be3}"
[ -n "$(be_var "$name" IP4)" ] || lab_die "unknown backend $name (topology.env BACKENDS=$BACKENDS)"
apt_install iproute2 nginx-light python3 iputils-ping ethtool
[ "$(dsr_mode "")" = tunnel ] || apt_install clang llvm libc6-dev linux-libc-dev
# The distribution's own nginx (port 80) is not part of the lab.
systemctl disable --now nginx >/dev/null 2>&1 || true

dev="$(lab_iface "$(be_var "$name" MAC)")"
work=/var/lib/fulcrum-lab/$name
configure_backend "" "$dev" "$name" "$work"

cat >/etc/systemd/system/fulcrum-lab-nginx.service <<UNIT
[Unit]
Description=Fulcrum lab backend $name: nginx on port $HTTP_PORT
After=network.target
[Service]
ExecStart=/usr/sbin/nginx -p $work -c $work/nginx.conf -e $work/error.log -g 'daemon off;'
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
cat >/etc/systemd/system/fulcrum-lab-udp-echo.service <<UNIT
[Unit]
Description=Fulcrum lab backend $name: UDP echo on port $UDP_PORT
After=network.target
[Service]
ExecStart=/usr/bin/python3 /opt/fulcrum-lab/tools/udp-echo.py --port $UDP_PORT --name $name
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
cat >/etc/systemd/system/fulcrum-lab-edge.service <<UNIT
[Unit]
Description=Fulcrum lab backend $name: WebSocket echo on $WS_PORT, resetting server on $RESET_PORT
After=network.target
[Service]
ExecStart=/usr/bin/python3 /opt/fulcrum-lab/tools/edge-servers.py --ws-port $WS_PORT --reset-port $RESET_PORT --name $name
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable fulcrum-lab-nginx fulcrum-lab-udp-echo fulcrum-lab-edge >/dev/null 2>&1
systemctl restart fulcrum-lab-nginx fulcrum-lab-udp-echo fulcrum-lab-edge
lab_log "backend $name: $dev $(be_var "$name" IP4) $(be_var "$name" IP6), DSR $(cat "$work/dsr-mode"), nginx :$HTTP_PORT, udp echo :$UDP_PORT, ws :$WS_PORT, reset :$RESET_PORT"
