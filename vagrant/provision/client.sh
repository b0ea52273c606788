#!/usr/bin/env bash
# Client VM: its lab address, and the VIP pools routed via the appliance (Fulcrum).
. "$(dirname "$0")/common.sh"
apt_install iproute2 curl socat iputils-ping python3 ethtool
dev="$(lab_iface "$CLIENT_MAC")"
configure_client "" "$dev"
lab_log "client: $dev $CLIENT_IP4 $CLIENT_IP6, $VIP_POOL4 via $LB_IP4, $VIP_POOL6 via $LB_IP6"
