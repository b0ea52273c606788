#!/usr/bin/env bash
# Creates the seed corpora under fuzz/corpus/ (gitignored) from the repository's fixtures:
#   packet_path   one input per dataplane/tests/fixtures/*.in.pcap (all its frames, framed as
#                 packet_path expects), raw and with the "fix checksums" flag, 1 and 2 cores,
#                 the golden appliance and its on-link variant
#   packet_frame  every single frame of every *.in.pcap and *.out.pcap
#   manifests     config/examples/manifests/*.yaml, config/examples/broken/*.yaml (not bootstrap-*),
#                 dataplane/tests/fixtures/manifests.yaml
#   bootstrap     config/examples/bootstrap.yaml, config/examples/broken/bootstrap-*.yaml,
#                 dataplane/tests/fixtures/bootstrap.yaml
#   http_request  a few requests (plain, sized and chunked bodies, pipelined, upgrade, smuggling)
#   proxy_session a few scripts (fulcrum_dataplane::l7::script's op codes): exchanges of each
#                 canned request and response, a pipelined pair, an upgrade, a slow client,
#                 a TLS exchange and TLS garbage
# Idempotent: files are named by content hash; libFuzzer adds its own finds beside them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
corpus="$here/corpus"
mkdir -p "$corpus"/{packet_path,packet_frame,manifests,bootstrap,http_request,proxy_session}

python3 - "$root" "$corpus" <<'PY'
import glob, hashlib, os, struct, sys
root, corpus = sys.argv[1], sys.argv[2]

def put(target, data):
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)

def frames(path):
    b = open(path, "rb").read()
    magic = struct.unpack("<I", b[:4])[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off, out = 24, []
    while off + 16 <= len(b):
        _, _, incl, _ = struct.unpack(end + "IIII", b[off:off + 16])
        off += 16
        out.append(b[off:off + incl])
        off += incl
    return out

fx = os.path.join(root, "dataplane/tests/fixtures")
for p in sorted(glob.glob(os.path.join(fx, "*.in.pcap"))):
    fs = frames(p)
    body = b"".join(struct.pack(">H", len(f)) + f for f in fs)
    # flags, burst size - 1, time step
    for flags in (0, 1, 3, 7, 17, 19):
        put("packet_path", bytes([flags, 31, 1]) + body)
    put("packet_path", bytes([1, 0, 40]) + body)   # one frame per burst, ~25 s apart
    put("packet_path", bytes([17, 0, 15]) + body)  # on-link, one frame per burst, 3.6 s apart
for p in sorted(glob.glob(os.path.join(fx, "*.pcap"))):
    for f in frames(p):
        put("packet_frame", f)

cfg = os.path.join(root, "config/examples")
for p in sorted(glob.glob(os.path.join(cfg, "manifests/*.yaml")) + glob.glob(os.path.join(cfg, "broken/*.yaml"))
                + [os.path.join(fx, "manifests.yaml")]):
    if not os.path.basename(p).startswith("bootstrap"):
        put("manifests", open(p, "rb").read())
for p in sorted([os.path.join(cfg, "bootstrap.yaml"), os.path.join(fx, "bootstrap.yaml")]
                + glob.glob(os.path.join(cfg, "broken/bootstrap-*.yaml"))):
    put("bootstrap", open(p, "rb").read())

# http_request: first byte = body piece size, then what a client sends.
for size in (1, 7, 255):
    for req in [
        b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nUser-Agent: curl/7.88\r\nAccept: */*\r\n\r\n",
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    ]:
        put("http_request", bytes([size]) + req)

# proxy_session: (op, arg) pairs; op 0 connect client arg%4, 2 canned request (arg//4)%9 on
# client arg%4, 7 canned response (arg//4)%8 on backend connection arg, 9 tick arg%16+1 ms
# (arg >= 240: jump), 1/6 raw bytes (arg of them follow) from a client / the backend,
# 10 publish routing table arg%3, 11 cut / restore the backend's link.
tick = [9, 15]
for req in range(9):
    for resp in range(8):
        put("proxy_session", bytes([0, 0] + tick + [2, req * 4] + tick * 2 + [7, resp * 4] + tick * 3))
raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
put("proxy_session", bytes([0, 1] + tick + [1, len(raw)]) + raw + bytes(tick * 2 + [7, 0] + tick + [7, 0] + tick * 2))
put("proxy_session", bytes([0, 2] + tick + [2, 14] + tick * 2 + [7, 8] + tick * 2 + [1, 6]) + b"\x81\x00ab" + bytes(tick + [6, 3]) + b"xyz" + bytes(tick * 2))
put("proxy_session", bytes([0, 3] + tick + [1, 5]) + b"GET /" + bytes([9, 250, 9, 250] + tick))
# A new routing table mid-session (op 10: 0 the backend, 1 no endpoint, 2 no route for /),
# and the backend's link cut during a response (op 11 toggles it).
put("proxy_session", bytes([0, 0] + tick + [2, 0] + tick * 2 + [10, 1] + [2, 0] + tick * 2 + [7, 0] + tick + [10, 2, 2, 0] + tick * 2 + [10, 0, 2, 0] + tick * 2))
put("proxy_session", bytes([0, 0] + tick + [2, 0] + tick * 2 + [11, 0] + [7, 24] + tick + [9, 243, 11, 0] + tick * 2))
# TLS on 443 (op 0 with bit 2 of the argument): an exchange, and garbage after the handshake.
put("proxy_session", bytes([0, 4] + tick * 2 + [2, 0] + tick * 2 + [7, 0] + tick * 2))
put("proxy_session", bytes([0, 5] + tick * 2 + [1, 9]) + b"\x17\x03\x03\x00\x04abcd" + bytes(tick * 2))
PY
for t in packet_path packet_frame manifests bootstrap http_request proxy_session; do
    echo "seed: $t: $(ls "$corpus/$t" | wc -l) files in fuzz/corpus/$t"
done
