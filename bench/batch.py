"""The batch and export rows of `make bench`: a store in and out in bulk, and what an export costs.

Our server starts empty; then, on it:

  batch_rows   1. import: --batch-keys keys (1,000,000 by default; 100 B
                  values, key-0 .. key-(n-1)) POSTed to /batch in batches of
                  --batch-lines lines, one after the other on one connection:
                  keys per second (the goal compares it with the preload,
                  pipelined PUTs, of the same run);
               2. export: GET /export of those keys, read whole, beside GET
                  /snapshot of the same store; opts.repeat runs each,
                  alternating; the means;
               3. PUT c=64 while a client exports without pause (a process
                  of its own), and while nobody does: the writers'
                  throughput and p99; runs of --batch-duration seconds
                  alternate, opts.repeat each (the goal: p99 within 2x);
               4. GET c=8 while IMPORTERS clients import without pause
                  (batches of --batch-lines lines, a process of their
                  own), and while nobody does: what a batch costs others
                  (no goal; bench/README.md has its history).

The batches' bodies are built before the clock starts, so that the client's
Python does not count against the server's.
"""
import base64
import http.client
import json
import shutil
import subprocess
import tempfile
import time

from bench.load import on_client_cpu, run_load
from bench.persist import HOST, PY, _our_server

CONNECTIONS = 64

# A client that exports without pause until `seconds` have passed (the
# export it is in finishes); prints the seconds each export took.
EXPORTER = """
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
took, deadline = [], time.monotonic() + seconds
while time.monotonic() < deadline:
    start = time.perf_counter()
    conn.request("GET", "/export")
    response = conn.getresponse()
    size = len(response.read())
    if response.status != 200:
        sys.exit("export failed: %d" % response.status)
    took.append(time.perf_counter() - start)
print(json.dumps({"seconds": took, "bytes": size}))
"""


# IMPORTERS connections that POST batches (each `lines` lines of 100-byte
# values, built before the clock starts) without pause until `seconds` have
# passed; prints the keys applied.
IMPORTERS = 16
IMPORTER = """
import base64, http.client, sys, threading, time
port, connections, lines, seconds = map(float, sys.argv[1:])
value = base64.b64encode(b"v" * 100)
body = [b"".join(b'{"key": "import-%d-%d", "value": "%s"}\\n' % (c, i, value)
                 for i in range(int(lines))) for c in range(int(connections))]
deadline, applied = time.monotonic() + seconds, []
def post(c):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    while time.monotonic() < deadline:
        conn.request("POST", "/batch", body[c])
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit("POST /batch: %d" % response.status)
        applied.append(int(lines))
threads = [threading.Thread(target=post, args=(c,)) for c in range(int(connections))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sum(applied))
"""


def batch_bodies(keys, lines):
    """NDJSON bodies that put key-0 .. key-(keys-1), `lines` keys each (bench.persist's values)."""
    return [b"".join(b'{"key": "key-%d", "value": "%s"}\n'
                     % (i, base64.b64encode((b"%09d" % i) * 11 + b"v"))
                     for i in range(start, min(keys, start + lines)))
            for start in range(0, keys, lines)]


def _import(port, bodies):
    """POST every body, one after the other: (seconds, keys applied)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    applied, start = 0, time.perf_counter()
    try:
        for body in bodies:
            conn.request("POST", "/batch", body)
            response = conn.getresponse()
            reply = response.read()
            if response.status != 200:
                raise RuntimeError("POST /batch: %d %r" % (response.status, reply[:200]))
            applied += json.loads(reply)["applied"]
    finally:
        conn.close()
    return time.perf_counter() - start, applied


def _download(port, path):
    """GET `path`, read whole: (seconds, bytes)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        start = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        size = len(response.read())
        if response.status != 200:
            raise RuntimeError("GET %s: %d" % (path, response.status))
        return time.perf_counter() - start, size
    finally:
        conn.close()


def import_row(opts, server):
    bodies = batch_bodies(opts.batch_keys, opts.batch_lines)
    size = sum(map(len, bodies))
    with on_client_cpu():
        seconds, applied = _import(server.port, bodies)
    rate = applied / seconds
    return {"test": "import %d keys by POST /batch" % opts.batch_keys, "keys": applied,
            "seconds": seconds, "rate": rate, "bytes": size, "lines": opts.batch_lines,
            "summary": "%s keys/s (%s keys in %.1f s, batches of %s lines, %.0f MiB of NDJSON)"
                       % (format(round(rate), ","), format(applied, ","), seconds,
                          format(opts.batch_lines, ","), size / (1 << 20))}


def export_row(opts, server):
    runs = {"/export": [], "/snapshot": []}
    with on_client_cpu():
        for _ in range(opts.repeat):
            for path, took in runs.items():
                took.append(_download(server.port, path))
    export_s = sum(s for s, _ in runs["/export"]) / opts.repeat
    snapshot_s = sum(s for s, _ in runs["/snapshot"]) / opts.repeat
    return {"test": "export %d keys" % opts.batch_keys, "keys": opts.batch_keys,
            "export_s": export_s, "snapshot_s": snapshot_s,
            "runs_export_s": [s for s, _ in runs["/export"]],
            "runs_snapshot_s": [s for s, _ in runs["/snapshot"]],
            "export_bytes": runs["/export"][0][1], "snapshot_bytes": runs["/snapshot"][0][1],
            "summary": "%.2f s (GET /snapshot %.2f s: %.2fx; %.0f against %.0f MiB)%s"
                       % (export_s, snapshot_s, export_s / snapshot_s,
                          runs["/export"][0][1] / (1 << 20), runs["/snapshot"][0][1] / (1 << 20),
                          " (means of %d runs)" % opts.repeat if opts.repeat > 1 else "")}


def _load_beside(opts, server, connections, method, client=None, settle=0.0):
    """run_load for opts.batch_duration, beside `client` ([script, its arguments], run by a
    process of its own, given `settle` seconds first) or not: (the load's result, the
    client's output)."""
    beside = subprocess.Popen([PY, "-c"] + [str(arg) for arg in client],
                              stdout=subprocess.PIPE, text=True) if client else None
    out = None
    try:
        if beside is not None:
            time.sleep(settle)
        with on_client_cpu():
            r = run_load(HOST, server.port, connections, opts.batch_duration, method,
                         opts.batch_keys, opts.value_size)
    finally:
        if beside is not None:
            out, _ = beside.communicate(timeout=600)
            if beside.returncode != 0:
                raise RuntimeError("the client beside the load failed")
    return r, out


def _writers(opts, server, exporting):
    """One run of PUT c=64, beside an exporter process or not."""
    client = [EXPORTER, server.port, opts.batch_duration] if exporting else None
    r, out = _load_beside(opts, server, CONNECTIONS, "PUT", client)
    if exporting:
        r["exports_s"] = json.loads(out)["seconds"]
    return r


def writers_rows(opts, server):
    cases = (("running", "an export of %d keys running" % opts.batch_keys, True),
             ("none", "no export", False))
    runs = {state: [] for state, _, _ in cases}
    for _ in range(opts.repeat):
        for state, _, exporting in cases:
            runs[state].append(_writers(opts, server, exporting))
    rows = []
    for state, label, _ in cases:
        best = max(runs[state], key=lambda run: run["rps"])
        summary = "%s/s, p50 %.2f, p99 %.1f, max %.0f ms" % (
            format(round(best["rps"]), ","), best["p50_ms"] or 0, best["p99_ms"] or 0,
            best["max_ms"] or 0)
        exports = [s for run in runs[state] for s in run.get("exports_s", ())]
        if exports:
            summary += "; %d exports, %.1f-%.1f s each" % (len(exports), min(exports),
                                                          max(exports))
        rows.append(dict(best, test="PUT c=%d, %s" % (CONNECTIONS, label), summary=summary,
                         export=state, keys=opts.batch_keys, exports_s=exports,
                         runs_rps=[round(run["rps"]) for run in runs[state]],
                         runs_p99_ms=[run["p99_ms"] for run in runs[state]]))
    return rows


def readers_rows(opts, server):
    """GET c=8 beside IMPORTERS importers and beside none, alternating, opts.repeat runs each."""
    runs = {True: [], False: []}
    for _ in range(opts.repeat):
        for importing in (True, False):
            client = [IMPORTER, server.port, IMPORTERS, opts.batch_lines,
                      opts.batch_duration + 2] if importing else None
            # 2 s for the importers to build their bodies and get their batches flowing
            r, out = _load_beside(opts, server, 8, "GET", client, settle=2)
            if importing:
                r["imported"] = int(out)
            runs[importing].append(r)
    rows = []
    for importing, label in ((True, "%d clients importing" % IMPORTERS), (False, "none")):
        p99 = sum(run["p99_ms"] for run in runs[importing]) / opts.repeat
        worst = max(run["max_ms"] for run in runs[importing])
        summary = "p99 %.1f ms, max %.0f ms (means of %d runs)" % (p99, worst, opts.repeat)
        if importing:
            summary += "; %s keys/s imported" % format(round(sum(
                run["imported"] for run in runs[True]) / opts.repeat / (opts.batch_duration + 2)),
                ",")
        rows.append({"test": "GET c=8, %s" % label, "importing": importing, "p99_ms": p99,
                     "max_ms": worst, "runs_p99_ms": [run["p99_ms"] for run in runs[importing]],
                     "summary": summary})
    return rows


def batch_rows(opts):
    """Import, export, and writers beside an export, on one server (see the docstring)."""
    workdir = tempfile.mkdtemp(prefix="bench-batch-")
    server = None
    try:
        server = _our_server(opts, workdir).start(timeout=600)
        rows = [import_row(opts, server)]
        rows.append(export_row(opts, server))
        rows += writers_rows(opts, server)
        rows += readers_rows(opts, server)
        return rows
    finally:
        if server is not None:
            server.stop(timeout=600)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-keys", type=int, default=1000000)
    parser.add_argument("--batch-lines", type=int, default=10000)
    parser.add_argument("--batch-duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--server-flags", type=str.split, default=[])
    for row in batch_rows(parser.parse_args()):
        print("%-44s %s" % (row["test"], row["summary"]), flush=True)
