#!/usr/bin/env python3
"""A stand-in DSR load balancer for testing the lab's backends without Fulcrum.

Runs in a namespace whose kernel owns the appliance addresses (so ARP/NDP for them work):
reads frames sent to this interface's MAC with an IPv4/IPv6 destination inside the VIP pools,
wraps them in an outer IPv4 (protocol 4) or IPv6 (next header 41) header addressed to one
backend, as Fulcrum's DSR mode does, and sends them to the backend's MAC. The backend
decapsulates and answers the client directly. Used by vagrant/test-topology.sh.

  dsr-encap.py --iface IF --backend-mac MAC --backend4 IP --backend6 IP --vip4 NET --vip6 NET
"""
import argparse
import ipaddress
import signal
import socket
import struct
import sys

ETH_P_ALL = 0x0003
PACKET_HOST = 0


def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--backend-mac", required=True)
    ap.add_argument("--backend4", required=True)
    ap.add_argument("--backend6", required=True)
    ap.add_argument("--vip4", required=True)
    ap.add_argument("--vip6", required=True)
    ap.add_argument("--outer-src4", default="172.16.0.1", help="Fulcrum's default dsr_source_v4 prefix")
    ap.add_argument("--outer-src6", default="fd00:f17c::1", help="Fulcrum's default dsr_source_v6 prefix")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    vip4 = ipaddress.ip_network(a.vip4)
    vip6 = ipaddress.ip_network(a.vip6)
    be_mac = bytes.fromhex(a.backend_mac.replace(":", ""))
    be4 = socket.inet_pton(socket.AF_INET, a.backend4)
    be6 = socket.inet_pton(socket.AF_INET6, a.backend6)
    src4 = socket.inet_pton(socket.AF_INET, a.outer_src4)
    src6 = socket.inet_pton(socket.AF_INET6, a.outer_src6)

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((a.iface, 0))
    my_mac = s.getsockname()[4][:6]
    print(f"dsr-encap on {a.iface}: {vip4} {vip6} -> {a.backend4} {a.backend6}", flush=True)
    n = 0
    while True:
        frame, addr = s.recvfrom(65535)
        if addr[2] != PACKET_HOST or len(frame) < 34:
            continue
        etype = struct.unpack("!H", frame[12:14])[0]
        if etype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            total = struct.unpack("!H", frame[16:18])[0]
            inner = frame[14:14 + total]
            if ipaddress.IPv4Address(frame[30:34]) not in vip4 or len(inner) < ihl:
                continue
            df = frame[20] & 0x40
            hdr = struct.pack("!BBHHBBBBH4s4s", 0x45, frame[15], 20 + len(inner), 0, df, 0, 64, 4, 0, src4, be4)
            hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
            out = be_mac + my_mac + b"\x08\x00" + hdr + inner
        elif etype == 0x86DD and len(frame) >= 54:
            plen = struct.unpack("!H", frame[18:20])[0]
            inner = frame[14:14 + 40 + plen]
            if ipaddress.IPv6Address(frame[38:54]) not in vip6:
                continue
            hdr = struct.pack("!IHBB16s16s", 6 << 28, len(inner), 41, 64, src6, be6)
            out = be_mac + my_mac + b"\x86\xdd" + hdr + inner
        else:
            continue
        try:
            s.send(out)
            n += 1
        except OSError as e:  # e.g. EMSGSIZE: Fulcrum answers those with ICMP; here: dropped
            print(f"dropped {len(out)} bytes: {e}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
