"""The persistence half of `make bench`: fsync policies, checkpoints under load, scaling.

Each function takes bench.run's options and returns rows like bench.run's
measurements ({"test", "summary", raw numbers}); our server runs with
--server-flags (none by default: its defaults) plus the measurement's own:

  fsync_policy_rows   PUT throughput with 64 connections under --fsync always,
                      everysec and no, each on a fresh server; the fsync count
                      comes from the server's "Journal: N records, M fsyncs"
                      line at shutdown, so writes per fsync shows group commit.
  checkpoint_rows     PUT at 64 connections on --checkpoint-keys keys, while
                      checkpoints keep running (a small --checkpoint-bytes)
                      and without any (a limit no run reaches); runs
                      alternate between the two servers.
  scale_rows          for each size of --sizes (100,000, 1,000,000 and
                      5,000,000 keys of 100 bytes by default): the server's
                      start-to-serving time, RSS, SIGTERM-to-exit time and
                      snapshot size, next to a bare script that unpickles,
                      holds, and pickles-and-fsyncs the same dict; and the
                      replay rate of a journal of that many PUTs.  Rows
                      carry "figure" and "keys", for the scaling table and
                      the goals.

The snapshots and journals are written directly, by scripts of their own,
in the server's formats (a snapshot is a pickled dict; a journal's records
come from persistence.encode_record): that saves minutes of PUTs at 5,000,000
keys, and keeps the bench process's own memory small.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.load import on_client_cpu, run_load

HOST = "127.0.0.1"
PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
# A journal of N PUTs (the same keys and values as BARE_SAVE), in the
# server's own record format: persistence.py's encoder, run from the repo.
BARE_JOURNAL = """
import sys
import persistence
directory, n = sys.argv[1], int(sys.argv[2])
with open(persistence.journal_path(directory, 1), "wb", buffering=1 << 20) as f:
    for i in range(n):
        f.writelines(persistence.encode_record(persistence.PUT, "key-%d" % i,
                                               (b"%09d" % i) * 11 + b"v"))
"""


def _bare(script, *args):
    out = subprocess.run([PY, "-c", script] + [str(a) for a in args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _our_server(opts, workdir, *flags):
    """Our server on `workdir`, with --server-flags, then the measurement's own `flags`."""
    from bench.run import Server          # here: bench.run imports this module
    return Server("server", [PY, "server.py", "--host", HOST, "--port", "0",
                             "--working-dir", workdir] + opts.server_flags + list(flags))


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
            server = _our_server(opts, workdir, "--fsync", policy).start()
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


SCALE_REPEAT_UP_TO = 1000000       # sizes measured opts.repeat times; larger ones once


def _write_snapshot(workdir, keys):
    """The bare save: a snapshot of `keys` keys written into `workdir` by a script of its own."""
    return _bare(BARE_SAVE, os.path.join(workdir, "store.pickle"), keys)


def _size_run(opts, keys):
    """One run at one size: the bare save and load, then our server's start, RSS and stop."""
    workdir = tempfile.mkdtemp(prefix="bench-scale-")
    path = os.path.join(workdir, "store.pickle")
    try:
        bare_save = _write_snapshot(workdir, keys)
        bare_load = _bare(BARE_LOAD, path)
        start = time.monotonic()
        server = _our_server(opts, workdir).start(timeout=600)
        start_s = time.monotonic() - start
        rss = server.rss_kib()
        code, stop_s = server.stop(timeout=600)
        return {"start_s": start_s, "stop_s": stop_s, "exit_code": code, "rss_kib": rss,
                "bytes": os.path.getsize(path), "bare_load_s": bare_load["load_s"],
                "bare_save_s": bare_save["save_s"], "bare_rss_kib": bare_load["rss_kib"],
                "bare_bytes": bare_save["size"]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _size_rows(opts, keys):
    """The figures for one size, each beside a bare script's: means of the runs.

    opts.repeat runs up to SCALE_REPEAT_UP_TO keys, where a run takes
    seconds and the goals are checked; one run above, where a run takes a
    minute.
    """
    runs = [_size_run(opts, keys) for _ in range(opts.repeat if keys <= SCALE_REPEAT_UP_TO else 1)]
    m = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
    codes = sorted({run["exit_code"] for run in runs})
    of_runs = " (means of %d runs)" % len(runs) if len(runs) > 1 else ""
    mib = 1024 * 1024
    figures = [
        {"figure": "start to serving", "seconds": m["start_s"], "bare_s": m["bare_load_s"],
         "summary": "%.2f s (bare unpickle %.2f s: %.2fx)%s"
                    % (m["start_s"], m["bare_load_s"], m["start_s"] / m["bare_load_s"], of_runs)},
        {"figure": "SIGTERM to exit", "seconds": m["stop_s"], "exit_codes": codes,
         "bare_s": m["bare_save_s"],
         "summary": "%.2f s, exit %s (bare pickle+fsync %.2f s: %.2fx)%s"
                    % (m["stop_s"], ",".join(map(str, codes)), m["bare_save_s"],
                       m["stop_s"] / m["bare_save_s"], of_runs)},
        {"figure": "snapshot size", "bytes": m["bytes"], "bare_bytes": m["bare_bytes"],
         "summary": "%.1f MiB (bare %.1f MiB)" % (m["bytes"] / mib, m["bare_bytes"] / mib)},
        {"figure": "server RSS", "rss_kib": m["rss_kib"], "bare_rss_kib": m["bare_rss_kib"],
         "summary": "%d MiB (bare process holding the dict %d MiB: %.2fx)"
                    % (m["rss_kib"] / 1024, m["bare_rss_kib"] / 1024,
                       m["rss_kib"] / m["bare_rss_kib"])},
    ]
    return [dict(row, keys=keys, runs=runs, test="%d keys: %s" % (keys, row["figure"]))
            for row in figures]


def _replay_row(opts, keys):
    """Start on a journal of `keys` PUTs and no snapshot: the replay rate the server logs."""
    workdir = tempfile.mkdtemp(prefix="bench-replay-")
    try:
        subprocess.run([PY, "-c", BARE_JOURNAL, workdir, str(keys)], cwd=ROOT, check=True)
        server = _our_server(opts, workdir).start(timeout=600)
        server.stop(timeout=600)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row = {"figure": "journal replay", "keys": keys,
           "test": "%d keys: journal replay" % keys}
    match = _find(server.lines, r"Replayed (\d+) journal records .* in ([\d.]+) s \((\d+) records/s\)")
    if not match:
        return dict(row, summary="no replay line in the log!")
    records, seconds, rate = int(match.group(1)), float(match.group(2)), int(match.group(3))
    return dict(row, records=records, seconds=seconds, rate=rate,
                summary="%s records/s (%s records in %.2f s)"
                        % (format(rate, ","), format(records, ","), seconds))


def scale_rows(opts):
    """Every figure at every size of --sizes, smallest first; row "keys" says the size."""
    rows = []
    for keys in sorted(opts.sizes):
        rows += _size_rows(opts, keys) + [_replay_row(opts, keys)]
    return rows


# -- checkpoints under load -------------------------------------------------------

CHECKPOINT_DONE = re.compile(r"checkpoint\b.*\b\d+ keys", re.I)     # not "Checkpoint failed"
NO_CHECKPOINT_BYTES = 1 << 40       # --checkpoint-bytes that a run never reaches


def checkpoints_logged(server):
    """(end, seconds) of each checkpoint the server has logged as done.

    `end` is when bench read the line (time.monotonic()); `seconds` what the
    line says it took ("in 1.23 s"), or 0 if it does not say.
    """
    done = []
    for when, line in server.stamped:
        if CHECKPOINT_DONE.search(line) and "fail" not in line.lower():
            took = re.search(r"\bin ([\d.]+) ?s\b", line)
            done.append((when, float(took.group(1)) if took else 0.0))
    return done


def checkpoint_overlap(done, start, end):
    """How many of the checkpoints `done` ran during [start, end], and for how many seconds."""
    count, busy = 0, 0.0
    for finished, seconds in done:
        began = finished - seconds
        if began <= end and finished >= start:
            count += 1
            busy += min(end, finished) - max(start, began)
    return count, busy


def checkpoint_rows(opts):
    """PUT at 64 connections while checkpoints of --checkpoint-keys keys run, and without.

    Two servers start on the same snapshot, written directly as in
    _size_rows: one with a small --checkpoint-bytes, so that checkpoints
    follow each other through the load, one with a limit no run reaches.
    The PUTs overwrite existing keys (the dict keeps its size).  Their runs
    alternate, opts.repeat each.  Which checkpoints overlapped a run, and
    for how long, comes from the server's log lines ("Checkpoint: N keys
    ... in S s"), read once the servers have stopped (a stop waits for the
    checkpoint in progress).
    """
    keys, connections = opts.checkpoint_keys, 64
    cases = (("running", "checkpoints of %d keys running (--checkpoint-bytes %d)"
              % (keys, opts.checkpoint_bytes), opts.checkpoint_bytes),
             ("none", "no checkpoint (--checkpoint-bytes %d)" % NO_CHECKPOINT_BYTES,
              NO_CHECKPOINT_BYTES))
    workdirs, servers = [], []
    try:
        for _ in cases:
            workdirs.append(tempfile.mkdtemp(prefix="bench-checkpoint-"))
        _write_snapshot(workdirs[0], keys)
        shutil.copyfile(os.path.join(workdirs[0], "store.pickle"),
                        os.path.join(workdirs[1], "store.pickle"))
        for (_, _, limit), workdir in zip(cases, workdirs):
            servers.append(_our_server(opts, workdir, "--checkpoint-bytes", str(limit))
                           .start(timeout=600))
        runs = [[] for _ in cases]
        for _ in range(opts.repeat):
            for server, case_runs in zip(servers, runs):
                start = time.monotonic()
                with on_client_cpu():
                    r = run_load(HOST, server.port, connections, opts.checkpoint_duration,
                                 "PUT", keys, opts.value_size)
                r["span"] = (start, time.monotonic())
                case_runs.append(r)
    finally:
        for server in servers:
            server.stop(timeout=600)
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for (state, label, limit), server, case_runs in zip(cases, servers, runs):
        done = checkpoints_logged(server)
        for run in case_runs:
            run["checkpoints"], run["checkpoint_busy_s"] = checkpoint_overlap(done, *run["span"])
        best = max(case_runs, key=lambda run: run["rps"])
        busy = sum(run["checkpoint_busy_s"] for run in case_runs)
        total = sum(run["span"][1] - run["span"][0] for run in case_runs)
        summary = "%s/s, p50 %.2f, p99 %.1f, max %.0f ms; %d checkpoint(s) during the runs" % (
            format(round(best["rps"]), ","), best["p50_ms"] or 0, best["p99_ms"] or 0,
            best["max_ms"] or 0, sum(run["checkpoints"] for run in case_runs))
        if busy:
            summary += ", running %.0f%% of their time" % (100 * busy / total)
        took = [seconds for _, seconds in done if seconds]
        if took:
            summary += ", %.1f-%.1f s each" % (min(took), max(took))
        rows.append(dict(best, test="PUT c=%d, %s" % (connections, label), summary=summary,
                         checkpoints=state, keys=keys, checkpoint_bytes=limit,
                         checkpoints_logged=len(done), checkpoint_seconds=took,
                         checkpoint_busy_share=busy / total if total else 0.0,
                         runs_rps=[round(run["rps"]) for run in case_runs],
                         runs_p99_ms=[run["p99_ms"] for run in case_runs],
                         runs_checkpoints=[run["checkpoints"] for run in case_runs]))
    return rows


# (name for --skip, function): run in this order by bench.run.
PERSISTENCE_MEASUREMENTS = [("fsync", fsync_policy_rows), ("checkpoint", checkpoint_rows),
                            ("scale", scale_rows)]
