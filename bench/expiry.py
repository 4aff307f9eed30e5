"""The expiry and watch rows of `make bench`: what held watches and expiring keys cost the others.

Our server on its defaults, on an empty directory, the load's keys
preloaded.  Then, opts.repeat times each, interleaved so that both sides
of a comparison see the same machine:

  watch_rows    GET and PUT at 64 connections, alone and while 1,000
                watches are held (a process of its own holds them: 500 on
                keys nobody writes, 500 on prefixes nobody writes under, so
                that every round applied is looked up against them and none
                is answered);
  expiry_rows   PUT at 64 connections, alone and while 100,000 keys with a
                ttl of EXPIRY_TTL seconds expire (loaded, pipelined, just
                before the run, so that their deadlines pass during it;
                runs_expired says how many did).

bench/goals.py compares the means: throughput with watches at least 0.9x
without; PUT p99 with expiries at most 2x without.
"""
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.load import on_client_cpu, preload, run_load
from bench.persist import HOST, PY, _our_server
from bench.wire import request

CONNECTIONS = 64
WATCHES = 1000
EXPIRING = 100000
EXPIRY_TTL = 6              # seconds: longer than their load (2-3 s), shorter than the run
EXPIRY_RUN = EXPIRY_TTL + 8     # seconds of PUT load, with expiries and without: all reclaimed
LOAD_KEYS = 100000

# Holds `count` watches open until its stdin closes; then prints how many were answered.
WATCHER = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    target = ("/kv/watched-%d?wait=300" % i) if i % 2 else ("/kv?prefix=watched-%d.&wait=300" % i)
    s.sendall(b"GET %s HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n" % target.encode())
    socks.append(s)
print("held", flush=True)
sys.stdin.read()
answered = 0
for s in socks:
    s.setblocking(False)
    try:
        answered += bool(s.recv(1))
    except BlockingIOError:
        pass
print(answered, flush=True)
"""


def _metric(port, name):
    with urllib.request.urlopen("http://%s:%d/metrics" % (HOST, port), timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def _wait_metric(port, name, value, timeout=60):
    deadline = time.monotonic() + timeout
    while _metric(port, name) != value:
        if time.monotonic() > deadline:
            raise RuntimeError("%s never reached %s" % (name, value))
        time.sleep(0.05)


def _load(port, method, duration):
    with on_client_cpu():
        return run_load(HOST, port, CONNECTIONS, duration, method, LOAD_KEYS, 100)


def _mean_row(test, runs, **fields):
    best = max(runs, key=lambda r: r["rps"])
    return dict(best, test=test, runs_rps=[r["rps"] for r in runs],
                runs_p99_ms=[r["p99_ms"] for r in runs], **fields,
                summary="%s req/s (mean of %d), p99 %.2f ms (mean)" % (
                    format(round(sum(r["rps"] for r in runs) / len(runs)), ","), len(runs),
                    sum(r["p99_ms"] or 0 for r in runs) / len(runs)))


def watch_rows(opts):
    workdir = tempfile.mkdtemp(prefix="bench-watch-")
    try:
        server = _our_server(opts, workdir).start()
        try:
            preload(HOST, server.port, LOAD_KEYS)
            runs = {(method, held): [] for method in ("GET", "PUT") for held in (0, WATCHES)}
            answered = 0
            for _ in range(opts.repeat):
                for method in ("GET", "PUT"):
                    runs[method, 0].append(_load(server.port, method, opts.duration))
                    watcher = subprocess.Popen([PY, "-c", WATCHER, str(server.port), str(WATCHES)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               text=True)
                    watcher.stdout.readline()
                    _wait_metric(server.port, "kvstore_watches", WATCHES)
                    runs[method, WATCHES].append(_load(server.port, method, opts.duration))
                    out, _ = watcher.communicate("", timeout=60)
                    answered += int(out.split()[-1])
                    _wait_metric(server.port, "kvstore_watches", 0)
        finally:
            server.stop(timeout=120)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for (method, held), results in sorted(runs.items()):
        test = "%s c=%d, %s" % (method, CONNECTIONS, "%s watches held" % format(held, ",")
                                if held else "no watch held")
        rows.append(_mean_row(test, results, method=method, watches=held,
                              watches_answered_early=answered if held else 0))
    return rows


def _load_expiring(port, count, ttl):
    """PUT exp-0 .. exp-(count-1) with ?ttl=, pipelined over 4 connections; seconds taken."""
    started = time.monotonic()
    socks = [socket.create_connection((HOST, port), timeout=60) for _ in range(4)]
    try:
        for start in range(0, count, 400):
            for i, sock in enumerate(socks):
                first = start + 100 * i
                sock.sendall(b"".join(request("PUT", b"exp-%d?ttl=%d" % (k, ttl), b"x" * 100)
                                      for k in range(first, min(first + 100, count))))
            for i, sock in enumerate(socks):
                expected = max(0, min(100, count - start - 100 * i))
                replies = b""
                while replies.count(b"HTTP/1.1 ") < expected:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the server closed a pipelined connection")
                    replies += data
                if replies.count(b"HTTP/1.1 200") != expected:
                    raise RuntimeError("a PUT with a ttl failed: %r" % replies[:200])
    finally:
        for sock in socks:
            sock.close()
    return time.monotonic() - started


def expiry_rows(opts):
    workdir = tempfile.mkdtemp(prefix="bench-expiry-")
    duration = max(opts.duration, EXPIRY_RUN)
    try:
        server = _our_server(opts, workdir).start()
        try:
            preload(HOST, server.port, LOAD_KEYS)
            alone, beside, expired_during, loads = [], [], [], []
            for _ in range(opts.repeat):
                alone.append(_load(server.port, "PUT", duration))
                loads.append(_load_expiring(server.port, EXPIRING, EXPIRY_TTL))
                before = _metric(server.port, "kvstore_keys_expired_total")
                beside.append(_load(server.port, "PUT", duration))
                expired_during.append(_metric(server.port, "kvstore_keys_expired_total") - before)
                _wait_metric(server.port, "kvstore_keys_expiring", 0)
        finally:
            server.stop(timeout=120)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [
        _mean_row("PUT c=%d, no key expiring" % CONNECTIONS, alone, expiring=0),
        _mean_row("PUT c=%d, %s keys expiring" % (CONNECTIONS, format(EXPIRING, ",")), beside,
                  expiring=EXPIRING, runs_expired=expired_during, runs_load_s=loads),
    ]


if __name__ == "__main__":
    # python3 -m bench.expiry: these rows alone.
    class Options:
        duration, repeat, server_flags = 5.0, 3, []
    for row in watch_rows(Options) + expiry_rows(Options):
        print("  %-44s %s" % (row["test"], row["summary"]), flush=True)
        for key in ("runs_rps", "runs_p99_ms", "runs_expired", "runs_load_s"):
            if key in row:
                print("      %s: %s" % (key, json.dumps([round(v, 2) for v in row[key]])))
    sys.exit(0)
