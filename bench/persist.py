"""The persistence half of `make bench`: fsync policies, a million keys, journal replay.

Each function returns rows like bench.run's measurements ({"test", "summary",
raw numbers}), printed as a second table:

  fsync_policy_rows   PUT throughput with 64 connections under --fsync always,
                      everysec and no, each on a fresh server; the fsync count
                      comes from the server's "Journal: N records, M fsyncs"
                      line at shutdown, so writes per fsync shows group commit.
  million_key_rows    1,000,000 keys of 100-byte values: the server's
                      start-to-serving time, RSS, SIGTERM-to-exit time and
                      snapshot size, next to a bare script that unpickles,
                      holds, and pickles-and-fsyncs the same dict.  The
                      snapshot is written by that script (the same format as
                      the server's), which saves a minute of PUTs.
  replay_rows         PUT N keys (--fsync no), SIGKILL, restart: the replay
                      rate the server logs.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench.load import on_client_cpu, preload, run_load

HOST = "127.0.0.1"
PY = sys.executable

# The bare baselines, run in a subprocess of their own so that their memory
# and timings are not mixed with the bench's.
BARE_SAVE = """
import json, os, pickle, sys, time
path = sys.argv[1]
data = {"key-%d" % i: (b"%09d" % i) * 11 + b"v" for i in range(int(sys.argv[2]))}
start = time.perf_counter()
with open(path, "wb") as f:
    pickle.dump(data, f, protocol=5)
    f.flush()
    os.fsync(f.fileno())
print(json.dumps({"save_s": time.perf_counter() - start, "size": os.path.getsize(path)}))
"""
BARE_LOAD = """
import json, pickle, sys, time
start = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    data = pickle.load(f)
seconds = time.perf_counter() - start
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
print(json.dumps({"load_s": seconds, "rss_kib": rss, "keys": len(data)}))
"""


def _bare(script, *args):
    out = subprocess.run([PY, "-c", script] + [str(a) for a in args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _our_server(workdir, *flags):
    from bench.run import Server          # here: bench.run imports this module
    return Server("server", [PY, "server.py", "--host", HOST, "--port", "0",
                             "--working-dir", workdir] + list(flags))


def _find(lines, pattern):
    for line in lines:
        match = re.search(pattern, line)
        if match:
            return match
    return None


def fsync_policy_rows(opts):
    rows = []
    for policy in ("always", "everysec", "no"):
        workdir = tempfile.mkdtemp(prefix="bench-fsync-")
        try:
            server = _our_server(workdir, "--fsync", policy).start()
            with on_client_cpu():
                r = run_load(HOST, server.port, 64, opts.duration, "PUT", opts.keys,
                             opts.value_size)
            code, _ = server.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        stats = _find(server.lines, r"Journal: (\d+) records, (\d+) fsyncs")
        records, fsyncs = (int(stats.group(1)), int(stats.group(2))) if stats else (0, 0)
        summary = "%s PUT/s, p99 %.1f ms" % (format(round(r["rps"]), ","), r["p99_ms"] or 0)
        if fsyncs:
            summary += "; %.0f fsyncs/s, %.1f writes per fsync" % (
                fsyncs / r["seconds"], records / fsyncs)
        rows.append(dict(r, test="PUT c=64 --fsync %s" % policy, summary=summary,
                         records=records, fsyncs=fsyncs, exit_code=code))
    return rows


def million_key_rows(opts):
    n = opts.million
    workdir = tempfile.mkdtemp(prefix="bench-1m-")
    path = os.path.join(workdir, "store.pickle")
    try:
        bare_save = _bare(BARE_SAVE, path, n)
        bare_load = _bare(BARE_LOAD, path)
        start = time.monotonic()
        server = _our_server(workdir).start(timeout=300)
        start_s = time.monotonic() - start
        rss = server.rss_kib()
        code, stop_s = server.stop(timeout=300)
        size = os.path.getsize(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mib = 1024 * 1024
    return [
        {"test": "%d keys: start to serving" % n, "seconds": start_s, "bare_s": bare_load["load_s"],
         "summary": "%.2f s (bare unpickle %.2f s: %.1fx)"
                    % (start_s, bare_load["load_s"], start_s / bare_load["load_s"])},
        {"test": "%d keys: SIGTERM to exit" % n, "seconds": stop_s, "exit_code": code,
         "bare_s": bare_save["save_s"],
         "summary": "%.2f s, exit %s (bare pickle+fsync %.2f s: %.1fx)"
                    % (stop_s, code, bare_save["save_s"], stop_s / bare_save["save_s"])},
        {"test": "%d keys: snapshot size" % n, "bytes": size,
         "summary": "%.1f MiB (bare %.1f MiB)" % (size / mib, bare_save["size"] / mib)},
        {"test": "%d keys: server RSS" % n, "rss_kib": rss, "bare_rss_kib": bare_load["rss_kib"],
         "summary": "%d MiB (bare process holding the dict %d MiB: %.2fx)"
                    % (rss / 1024, bare_load["rss_kib"] / 1024, rss / bare_load["rss_kib"])},
    ]


def replay_rows(opts):
    workdir = tempfile.mkdtemp(prefix="bench-replay-")
    try:
        server = _our_server(workdir, "--fsync", "no").start()
        with on_client_cpu():
            loaded = preload(HOST, server.port, opts.replay, opts.value_size)
        server._signal(signal.SIGKILL)
        server.proc.wait(30)
        again = _our_server(workdir).start(timeout=300)
        again.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    match = _find(again.lines, r"Replayed (\d+) journal records .* in ([\d.]+) s \((\d+) records/s\)")
    if not match:
        return [{"test": "journal replay", "summary": "no replay line in the log!"}]
    records, seconds, rate = int(match.group(1)), float(match.group(2)), int(match.group(3))
    return [{"test": "journal replay after SIGKILL", "records": records, "seconds": seconds,
             "rate": rate, "acknowledged": loaded["ok"],
             "summary": "%s records in %.2f s: %s records/s (%s PUTs acknowledged)"
                        % (format(records, ","), seconds, format(rate, ","),
                           format(loaded["ok"], ","))}]


PERSISTENCE_MEASUREMENTS = [fsync_policy_rows, million_key_rows, replay_rows]
