#!/usr/bin/env python3
"""UDP echo server for the Fulcrum lab backends (IPv4 and IPv6, one process).

Replies from the address the datagram was sent to (IP_PKTINFO / IPV6_PKTINFO), so a DSR
datagram addressed to a VIP is answered from the VIP, not from the backend's own address.
A datagram whose payload starts with b"who?" is answered with the backend's name instead of
an echo, to tell backends apart. Stops on SIGTERM/SIGINT.
"""
import argparse
import ipaddress
import select
import signal
import socket
import struct
import sys

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=5353)
    ap.add_argument("--name", default="backend")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s4.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
    s4.bind(("0.0.0.0", a.port))
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    # A VIP is only a local route (no address on an interface): IPv6 refuses it as an
    # IPV6_PKTINFO source unless the socket may use non-local addresses.
    s6.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    s6.bind(("::", a.port))
    for s in (s4, s6):
        s.setblocking(False)
    name = a.name.encode() + b"\n"
    print(f"udp-echo {a.name} on port {a.port}", flush=True)

    while True:
        r, _, _ = select.select([s4, s6], [], [])
        for s in r:
            for _ in range(64):
                try:
                    data, anc, _flags, peer = s.recvmsg(65535, 256)
                except BlockingIOError:
                    break
                out = name if data.startswith(b"who?") else data
                cmsg = []
                for level, typ, val in anc:
                    if s is s4 and level == socket.SOL_IP and typ == IP_PKTINFO:
                        # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                        dst = val[8:12]
                        cmsg = [(socket.SOL_IP, IP_PKTINFO, struct.pack("i4s4s", 0, dst, b"\0" * 4))]
                    elif s is s6 and level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO:
                        # struct in6_pktinfo { in6_addr addr; int ifindex; }
                        dst = val[:16]
                        if not ipaddress.IPv6Address(dst).is_link_local:
                            cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16si", dst, 0))]
                try:
                    s.sendmsg([out], cmsg, 0, peer)
                except OSError:
                    pass


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
