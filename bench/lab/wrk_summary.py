"""wrk's summary (as `wrk --latency` prints it) as one JSON line: requests/s, latency p50/p99
(ms), non-2xx responses and socket errors; with FRAMES and SECONDS also frames per second.
Shared by the bench/lab scripts.

    python3 wrk_summary.py WRK_OUTPUT [FRAMES SECONDS]
"""
import json
import re
import sys

t = open(sys.argv[1]).read()


def ms(pat):
    m = re.search(pat, t)
    if not m:
        return None
    unit = m.group(2) if m.lastindex and m.lastindex > 1 else ""
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000, "": 1}[unit]


non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
out = {"requests_per_s": ms(r"Requests/sec:\s+([\d.]+)")}
if len(sys.argv) > 3:
    out["packets_per_s"] = int(sys.argv[2]) / float(sys.argv[3])
out.update({"p50_ms": ms(r"50%\s+([\d.]+)(us|ms|s)"), "p99_ms": ms(r"99%\s+([\d.]+)(us|ms|s)"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))})
print(json.dumps(out))
