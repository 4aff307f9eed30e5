"""run_wrk(): the GET/PUT closed-loop load through wrk, when it is installed.

A cross-check for bench.load's own generator (C, multi-threaded, and much
cheaper per request).  Never required: run_wrk() returns None without wrk.
"""
import re
import shutil
import subprocess
import tempfile

WRK_SCRIPT = """
math.randomseed(os.time())
local body = %s
request = function()
  return wrk.format("%s", "/kv/key-" .. math.random(0, %d), nil, body)
end
"""
WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(number, unit):
    return float(number) * WRK_UNITS[unit]


def parse_wrk(text):
    """The numbers in wrk --latency output, in run_load's shape."""
    pct = {q: _wrk_ms(n, u) for q, n, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)}
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if not (done and rps):
        raise ValueError("unexpected wrk output:\n" + text)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(x) for x in sock.groups()) if sock else 0
    return {"requests": int(done.group(1)), "errors": errors,
            "seconds": _wrk_ms(done.group(2), done.group(3)) / 1000.0,
            "rps": float(rps.group(1)), "p50_ms": pct.get("50"), "p99_ms": pct.get("99")}


def run_wrk(host, port, connections=64, duration=5.0, method="GET", keys=100000,
            value_size=100, threads=2, timeout=15.0):
    """The same closed-loop load through wrk; None if wrk is not installed."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    body = '"%s"' % ("x" * value_size) if method == "PUT" else "nil"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as script:
        script.write(WRK_SCRIPT % (body, method, keys - 1))
        script.flush()
        cmd = [exe, "-t", str(max(1, min(threads, connections))), "-c", str(connections),
               "-d", "%ds" % max(1, round(duration)), "--timeout", "%ds" % max(1, round(timeout)),
               "--latency", "-s", script.name, "http://%s:%d/" % (host, port)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 30)
    if out.returncode != 0:
        raise RuntimeError("wrk failed (%d): %s" % (out.returncode, out.stderr.strip()))
    result = parse_wrk(out.stdout)
    result.update(connections=connections, method=method, tool="wrk")
    return result
