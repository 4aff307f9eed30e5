"""The listing rows of `make bench`: pages of keys out of a large store, and what listing costs GETs.

Our server starts on a snapshot of --listing-keys keys (1,000,000 by
default; 100 B values), written directly as bench.persist does, the keys
inserted in random order so that the dict's order is no help.  Then:

  listing_rows   1. the first listing: the index of the keys is built in the
                    background (GET /kv answers 503 until it is ready); the
                    time until a 200, and GETs at 16 connections meanwhile;
                 2. a page of 1,000 keys at a random place (one client, one
                    page after the other): its latency;
                 3. GETs at 16 connections, alone and beside a client listing
                    pages of 1,000 keys without pause (a process of its own,
                    so that it does not slow the load generator); opts.repeat
                    runs each, interleaved; the best run's figures.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from bench.load import on_client_cpu, run_load
from bench.persist import HOST, PY, _bare, _our_server

PAGE = 1000
CONNECTIONS = 16

# The snapshot: key-0 .. key-(n-1), in random order, as the GET load asks for them.
SNAPSHOT = """
import json, os, pickle, random, sys
path, n = sys.argv[1], int(sys.argv[2])
order = list(range(n))
random.Random(18).shuffle(order)
data = {"key-%d" % i: (b"%09d" % i) * 11 + b"v" for i in order}
with open(path, "wb") as f:
    pickle.dump(data, f, protocol=5)
print(json.dumps({"keys": len(data)}))
"""

# A client that lists pages at random places for `seconds`; prints their latencies (ms).
LISTER = """
import http.client, json, random, sys, time
port, keys, page, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
rng, latencies, deadline = random.Random(), [], time.monotonic() + seconds
while time.monotonic() < deadline:
    start = time.perf_counter()
    conn.request("GET", "/kv?limit=%d&after=key-%d" % (page, rng.randrange(keys)))
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or body.count(b"\\n") != page and resp.getheader("Link"):
        sys.exit("listing failed: %d %r" % (resp.status, body[:100]))
    latencies.append((time.perf_counter() - start) * 1000)
print(json.dumps(latencies))
"""


def _percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else None


def _first_listing(server, keys, seconds):
    """Ask for a page until it is a 200, while GETs run; (seconds to the 200, GET result)."""
    import http.client
    ready = {}

    def poll():
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        start = time.monotonic()
        while time.monotonic() - start < 600:
            conn.request("GET", "/kv?limit=%d" % PAGE)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                ready["seconds"] = time.monotonic() - start
                return
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with on_client_cpu():
        gets = run_load(HOST, server.port, CONNECTIONS, seconds, "GET", keys, 100)
    poller.join(600)
    return ready.get("seconds"), gets


def _pages(server, keys, count=200):
    """Latencies (ms) of `count` pages of PAGE keys at random places, one after the other."""
    import http.client
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    rng, latencies = random.Random(18), []
    for _ in range(count):
        start = time.perf_counter()
        conn.request("GET", "/kv?limit=%d&after=key-%d" % (PAGE, rng.randrange(keys)))
        resp = conn.getresponse()
        resp.read()
        latencies.append((time.perf_counter() - start) * 1000)
    conn.close()
    return latencies


def _gets_beside_lister(server, keys, seconds):
    lister = subprocess.Popen([PY, "-c", LISTER, str(server.port), str(keys), str(PAGE),
                               str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        with on_client_cpu():
            gets = run_load(HOST, server.port, CONNECTIONS, seconds, "GET", keys, 100)
        out, _ = lister.communicate(timeout=seconds + 120)
    finally:
        if lister.poll() is None:
            lister.kill()
    pages = json.loads(out) if lister.returncode == 0 else []
    return gets, pages


def listing_rows(opts):
    keys = opts.listing_keys
    workdir = tempfile.mkdtemp(prefix="bench-listing-")
    try:
        _bare(SNAPSHOT, os.path.join(workdir, "store.pickle"), keys)
        server = _our_server(opts, workdir).start(timeout=600)
        try:
            build_s, during = _first_listing(server, keys, max(opts.duration, 3.0))
            pages = _pages(server, keys)
            alone, beside, lister_pages = [], [], []
            for _ in range(opts.repeat):
                with on_client_cpu():
                    alone.append(run_load(HOST, server.port, CONNECTIONS, opts.duration, "GET",
                                          keys, 100))
                gets, listed = _gets_beside_lister(server, keys, opts.duration)
                beside.append(gets)
                lister_pages += listed
        finally:
            server.stop(timeout=600)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    label = "%s keys" % format(keys, ",")
    best_alone = max(alone, key=lambda r: r["rps"])
    best_beside = max(beside, key=lambda r: r["rps"])

    def gets(r):
        return "GET %s/s, p99 %.2f, max %.0f ms" % (format(round(r["rps"]), ","),
                                                     r["p99_ms"] or 0, r["max_ms"] or 0)
    return [
        dict(during, test="listing, %s: first listing" % label, build_s=build_s,
             summary=("index ready in %.2f s (503 until then); meanwhile %s"
                      % (build_s, gets(during))) if build_s is not None
             else "no 200 within 600 s!"),
        {"test": "listing, %s: a page of %d keys" % (label, PAGE), "latencies_ms": pages,
         "summary": "p50 %.2f, p99 %.2f, max %.2f ms (one client, %d pages)"
                    % (_percentile(pages, 50), _percentile(pages, 99), max(pages), len(pages))},
        dict(best_alone, test="listing, %s: GET c=%d, nobody listing" % (label, CONNECTIONS),
             runs_p99_ms=[r["p99_ms"] for r in alone], summary=gets(best_alone)),
        dict(best_beside, test="listing, %s: GET c=%d, a client listing pages"
             % (label, CONNECTIONS), runs_p99_ms=[r["p99_ms"] for r in beside],
             lister_pages=len(lister_pages),
             summary="%s; the lister: %d pages, p50 %.1f, p99 %.1f ms" % (
                 gets(best_beside), len(lister_pages), _percentile(lister_pages, 50) or 0,
                 _percentile(lister_pages, 99) or 0)),
    ]


if __name__ == "__main__":
    # python3 -m bench.listing [KEYS]: the listing rows alone.
    class Options:
        listing_keys = int(sys.argv[1]) if len(sys.argv) > 1 else 1000000
        duration, repeat, server_flags = 3.0, 2, []
    for row in listing_rows(Options):
        print("  %-52s %s" % (row["test"], row["summary"]), flush=True)
