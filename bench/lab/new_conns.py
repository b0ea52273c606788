# New TCP connections (HTTP/1.0: the server closes first, and so holds TIME-WAIT) from many
# source addresses, CONC at a time, for SECS seconds, open loop at RATE a second in all (0: as
# fast as they go). One JSON line: connections, errors, rate, latency p50/p99/p99.9/max (ms).
# Python asyncio rather than ab or wrk: neither can spread its connections over source addresses,
# and one address's port space makes too few distinct tuples.
#
#   python3 new_conns.py VIP SECS CONC SRC[,SRC...] [RATE]
#   (NEW_CONNS_HOST sets the Host header: for the L7 address, a host its Ingresses route)
import asyncio, json, os, socket, sys, time

VIP, SECS, CONC, SRCS = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
RATE = float(sys.argv[5]) if len(sys.argv) > 5 else 0  # connections/s in all, 0: as fast as it goes
HOST = os.environ.get("NEW_CONNS_HOST", "x").encode()
lat, errors = [], 0
async def one(loop, src):
    s = socket.socket(); s.setblocking(False); s.bind((src, 0))
    t = time.perf_counter()
    try:
        await asyncio.wait_for(loop.sock_connect(s, (VIP, 80)), 10)
        await loop.sock_sendall(s, b"GET / HTTP/1.0\r\nHost: " + HOST + b"\r\n\r\n")
        while await asyncio.wait_for(loop.sock_recv(s, 4096), 10):
            pass
        return time.perf_counter() - t
    finally:
        s.close()
async def worker(i, end):
    global errors
    loop = asyncio.get_running_loop(); n = i
    start = time.perf_counter() + i / RATE if RATE else 0
    while time.perf_counter() < end:
        if RATE:
            # Open loop per worker: start k at start + k * CONC / RATE.
            await asyncio.sleep(max(0, start + (n // CONC) * CONC / RATE - time.perf_counter()))
        n += CONC
        try:
            lat.append(await one(loop, SRCS[n % len(SRCS)]))
        except Exception:
            errors += 1
async def main():
    end = time.perf_counter() + SECS
    await asyncio.gather(*(worker(i, end) for i in range(CONC)))
asyncio.run(main())
lat.sort()
q = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
print(json.dumps({"connections": len(lat), "errors": errors, "per_s": round(len(lat) / SECS), "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": q(1.0)}))
