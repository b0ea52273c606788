#!/usr/bin/env python3
"""Edge-case servers for the Fulcrum lab backends, one process (threads), stdlib only:

  --ws-port P     a WebSocket echo server (RFC 6455: handshake, text/binary frames echoed,
                  ping answered, close answered); the echo is prefixed with the backend's name
  --reset-port P  accepts every connection, reads a little, and resets it (SO_LINGER 0):
                  an upstream that resets, for the proxy's 502

Also a client for the WebSocket echo (`--client HOST:PORT --host NAME --message TEXT`), used by
the end-to-end tests: prints the echoed text. Stops on SIGTERM/SIGINT.
"""
import argparse
import base64
import hashlib
import os
import signal
import socket
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def recv_exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b


def read_head(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(4096)
        if not d:
            raise EOFError
        data += d
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_frame(c):
    b0, b1 = recv_exact(c, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", recv_exact(c, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", recv_exact(c, 8))[0]
    mask = recv_exact(c, 4) if b1 & 0x80 else b"\0\0\0\0"
    payload = bytes(x ^ mask[i % 4] for i, x in enumerate(recv_exact(c, n)))
    return b0 & 0x0F, payload


def frame(opcode, payload, masked=False):
    n = len(payload)
    hdr = bytes([0x80 | opcode])
    mbit = 0x80 if masked else 0
    if n < 126:
        hdr += bytes([mbit | n])
    elif n < 65536:
        hdr += bytes([mbit | 126]) + struct.pack(">H", n)
    else:
        hdr += bytes([mbit | 127]) + struct.pack(">Q", n)
    if masked:
        mask = os.urandom(4)
        return hdr + mask + bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
    return hdr + payload


def ws_conn(c, name):
    try:
        head, _ = read_head(c)
        key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            op, payload = read_frame(c)
            if op == 8:
                c.sendall(frame(8, payload[:2]))
                break
            if op == 9:
                c.sendall(frame(10, payload))
            elif op in (1, 2):
                c.sendall(frame(op, name.encode() + b": " + payload))
    except (EOFError, StopIteration, OSError):
        pass
    finally:
        c.close()


def reset_conn(c):
    try:
        c.settimeout(2)
        c.recv(1024)
    except OSError:
        pass
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def serve(port, handler):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()


def client(addr, host, message):
    h, p = addr.rsplit(":", 1)
    c = socket.create_connection((h, int(p)), timeout=5)
    key = base64.b64encode(os.urandom(16))
    c.sendall(b"GET /chat HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head, rest = read_head(c)
    status = head.split(b"\r\n")[0].decode()
    want = base64.b64encode(hashlib.sha1(key + GUID).digest())
    if " 101 " not in status or want not in head:
        print(f"handshake failed: {status}")
        return 1
    replies = []
    for m in (message, message + "!"):
        c.sendall(frame(1, m.encode(), masked=True))
        op, payload = read_frame(c)
        replies.append(payload.decode())
    c.sendall(frame(8, struct.pack(">H", 1000), masked=True))
    print(" | ".join(replies))
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws-port", type=int)
    ap.add_argument("--reset-port", type=int)
    ap.add_argument("--name", default="backend")
    ap.add_argument("--client")
    ap.add_argument("--host", default="ws.lab")
    ap.add_argument("--message", default="hello")
    a = ap.parse_args()
    if a.client:
        sys.exit(client(a.client, a.host, a.message))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threads = []
    if a.ws_port:
        threads.append(threading.Thread(target=serve, args=(a.ws_port, lambda c: ws_conn(c, a.name)), daemon=True))
    if a.reset_port:
        threads.append(threading.Thread(target=serve, args=(a.reset_port, reset_conn), daemon=True))
    for t in threads:
        t.start()
    print(f"edge-servers {a.name}: ws {a.ws_port} reset {a.reset_port}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
