"""`python3 -m bench.run` (what `make bench` runs): measure each server, print a table, keep the JSON.

Every server in SERVERS is started as a subprocess on port 0 (its port read
from its "Server listening on HOST:PORT" line), all of them at once, so that
each load test can run on one server after the other, seconds apart
(measure_load); then each takes the burst, one at a time, then the
stalled-client case (bench.stalled), and all are stopped with SIGTERM.  A measurement returns rows: dicts with a "test"
name, a short "summary" for the table, and any raw numbers for the JSON.
To add a server, add a (name, argv) pair ("{workdir}" in argv becomes a
fresh temporary directory).

Then our server alone: bench.persist (fsync policies, checkpoints, scaling),
bench.listing (pages of keys out of a million, and GETs beside them),
bench.expiry (load beside 1,000 watches held, and beside 100,000 expiries)
and bench.batch (a million keys in by POST /batch, out by GET /export, and
PUTs beside exports).
Our server runs on its defaults, plus --server-flags; the header says which.
--skip leaves parts out.  The results go to stdout as Markdown tables (one
row per test, one column per server; the scaling figures one column per
size), followed by the goals and their verdicts (bench/goals.py),
and, raw, to bench/out/bench-<time>.json (git-ignored).  bench/README.md
says what each row measures.
"""
import argparse
import collections
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench.batch import batch_rows
from bench.goals import OURS, goal_rows, markdown as goals_markdown
from bench.load import DEFAULT_PROCESSES, burst, on_client_cpu, preload, run_load
from bench.expiry import expiry_rows, watch_rows
from bench.listing import listing_rows
from bench.persist import PERSISTENCE_MEASUREMENTS
from bench.stalled import stalled_rows
from bench.wire import raise_fd_limit
from bench.wrk import run_wrk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
HOST = "127.0.0.1"
PY = sys.executable
NOISY = 0.25        # cores used by other processes during a load test that make it "noisy"


SERVERS = [
    ("naive", [PY, "-m", "bench.naive_server", "--host", HOST, "--port", "0"]),
    ("asyncio", [PY, "-m", "bench.asyncio_server", "--host", HOST, "--port", "0"]),
    # On its defaults (--fsync always; no --cpu), plus --server-flags.  The
    # other fsync policies: bench.persist.  Named by bench.goals, which finds
    # our rows under that name.
    (OURS, [PY, "server.py", "--host", HOST, "--port", "0", "--working-dir", "{workdir}"]),
]
PARTS = ("load", "burst", "stalled", "fsync", "checkpoint", "scale", "listing", "watch",
         "expiry", "batch")                                                 # for --skip
# Our server alone, after the load: (name for --skip, function returning rows).
OUR_SERVER_MEASUREMENTS = PERSISTENCE_MEASUREMENTS + [
    ("listing", listing_rows), ("watch", watch_rows), ("expiry", expiry_rows),
    ("batch", batch_rows)]


# -- one server process ----------------------------------------------------------

class Server:
    """A server subprocess in its own session; stdout kept (last lines), stderr discarded."""

    def __init__(self, name, argv):
        self.name, self.argv = name, argv
        self.proc = self.port = self.workdir = None
        self.lines = collections.deque(maxlen=200)
        self.stamped = collections.deque(maxlen=200)    # (time.monotonic() when read, line)
        self.listening = threading.Event()

    def start(self, timeout=60.0):
        self.workdir = tempfile.mkdtemp(prefix="bench-")
        argv = [a.replace("{workdir}", self.workdir) for a in self.argv]
        # stderr to /dev/null: the naive server logs every request there.
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self.listening.wait(timeout) or self.port is None:
            self.stop(5.0)
            raise RuntimeError("%s did not print 'Server listening on' within %.0f s:\n%s"
                               % (self.name, timeout, "\n".join(self.lines)))
        return self

    def _read(self):
        # Keep draining stdout to the end: a server blocked on a full pipe would stall the bench.
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            self.stamped.append((time.monotonic(), line))
            if "Server listening on " in line and self.port is None:
                self.port = int(line.rsplit(":", 1)[1])
                self.listening.set()
        self.listening.set()        # exited: start() stops waiting

    def cpu_seconds(self):
        """User + system CPU time the server process has used so far."""
        with open("/proc/%d/stat" % self.proc.pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()   # after "(comm)", which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def _signal(self, signum):
        try:
            os.killpg(self.proc.pid, signum)     # the whole group, as the test harnesses do
        except ProcessLookupError:
            pass

    def stop(self, timeout=60.0):
        """SIGTERM, wait up to `timeout`, then SIGKILL; return (exit code, seconds taken)."""
        start = time.monotonic()
        try:
            if self.proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            self.proc.stdout.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode, time.monotonic() - start


# -- measurements -------------------------------------------------------------------

def fmt_ms(ms):
    return "-" if ms is None else "%.1f" % ms if ms >= 10 else "%.2f" % ms


def machine_cpu_seconds():
    """CPU time used by everything on the machine so far (all cores, /proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")   # minus idle, iowait


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)     # wrk, once it has exited
    return usage.ru_utime + usage.ru_stime


def load_summary(r):
    notes = ", %d err" % r["errors"] if r["errors"] else ""
    if r.get("stalled"):
        notes += ", %d stalled" % r["stalled"]
    if r["others_cpu"] > NOISY:
        notes += ", noisy"
    return "%s/s, p50 %s, p99 %s ms%s" % (format(round(r["rps"]), ","), fmt_ms(r["p50_ms"]),
                                         fmt_ms(r["p99_ms"]), notes)


def _load_cell(server, opts, runner, method, connections):
    """One closed-loop run, with the CPU that the server, the client and the rest used."""
    before = server.cpu_seconds(), children_cpu_seconds(), machine_cpu_seconds()
    start = time.monotonic()
    with on_client_cpu():
        r = runner(HOST, server.port, connections, opts.duration, method, opts.keys,
                   opts.value_size)
    wall = time.monotonic() - start
    r["server_cpu"] = (server.cpu_seconds() - before[0]) / wall
    if "client_cpu" not in r:
        r["client_cpu"] = (children_cpu_seconds() - before[1]) / wall
    # The machine is shared (2 cores): CPU that neither side used means the numbers are suspect.
    r["others_cpu"] = max(0.0, (machine_cpu_seconds() - before[2]) / wall
                          - r["server_cpu"] - r["client_cpu"])
    return r


def _add(results, server, row):
    print("  %-22s %-14s %s" % (row["test"], server.name, row["summary"]), flush=True)
    results[server.name].append(row)


def measure_load(results, servers, opts, runner, label):
    """Each load cell on every server in turn, opts.repeat times; each keeps its best run.

    Interleaved so that a comparison is of runs seconds apart: the VM's
    neighbours change its speed from one minute to the next (our server's
    PUT at 64 connections: 18.4k and 28.2k/s in two runs within a minute),
    and measuring one server's cells after the other's would put that drift
    into the ratios.  The best run, for every server alike, drops the runs
    a neighbour's burst cut short.
    """
    for method in ("GET", "PUT"):
        for connections in opts.connections:
            test = "%s%s c=%d" % (label, method, connections)
            runs = {server.name: [] for server in servers}
            for _ in range(opts.repeat):
                for server in servers:
                    runs[server.name].append(_load_cell(server, opts, runner, method,
                                                        connections))
            for server in servers:
                r = max(runs[server.name], key=lambda run: run["rps"])
                r["runs_rps"] = [round(run["rps"]) for run in runs[server.name]]
                r["runs_p99_ms"] = [run["p99_ms"] for run in runs[server.name]]
                _add(results, server, dict(r, test=test, summary=load_summary(r)))


def measure_preload(server, opts):
    with on_client_cpu():
        r = preload(HOST, server.port, opts.keys, opts.value_size)
    summary = "%s keys in %.1f s" % (format(r["ok"], ","), r["seconds"])
    if r["ok"] != opts.keys:
        summary += " (%d failed!)" % (opts.keys - r["ok"])
    return dict(r, test="preload %d x %d B" % (opts.keys, opts.value_size), summary=summary)


def measure_burst(server, opts):
    with on_client_cpu():
        r = burst(HOST, server.port, opts.burst, opts.burst_timeout)
    summary = "%s/%s ok in %.1f s, slowest reply %.1f s" % (
        format(r["ok"], ","), format(opts.burst, ","), r["seconds"], r["slowest_s"])
    if r["failures"]:
        summary += " (%s)" % ", ".join("%d %s" % (v, k) for k, v in sorted(r["failures"].items()))
    return dict(r, test="burst %d PUT" % opts.burst, summary=summary)


# -- running it all ---------------------------------------------------------------

def measure_stalled(server, opts):
    """bench.stalled's two rows, with the summaries of the load cells."""
    rows = stalled_rows(server.port, lambda: _load_cell(server, opts, run_load, "GET",
                                                       opts.stalled_load),
                        opts.stalled, opts.stalled_load, opts.repeat)
    for row in rows:
        row["test"] = "stalled: " + row["test"]
        row["summary"] = load_summary(row)
        if row["stalled_wanted"]:
            row["summary"] += "; %d/%d stalled connections open, %d closed by the server" % (
                row["stalled_open"], row["stalled_wanted"], row["stalled_closed"])
    return rows


def bench_servers(chosen, opts):
    """Start the chosen servers, measure them side by side, stop them; {name: rows}."""
    results, servers = {}, []
    try:
        for name, argv in SERVERS:
            if name not in chosen:
                continue
            if name == OURS:
                argv = argv + opts.server_flags
            try:
                servers.append(Server(name, argv).start())
                results[name] = []
            except (OSError, RuntimeError) as exc:  # one broken server must not cost the others
                print("  %s could not start: %s" % (name, exc), flush=True)
                results[name] = [{"test": "start", "summary": "failed to start",
                                  "error": str(exc)}]
        for server in servers:
            _add(results, server, measure_preload(server, opts))
        runners = [(lambda *args: run_load(*args, processes=opts.processes), "")]
        if opts.wrk and shutil.which("wrk"):
            runners.append((run_wrk, "wrk "))
        for runner, label in runners if "load" not in opts.skip else ():
            measure_load(results, servers, opts, runner, label)
        if opts.burst > 0 and "burst" not in opts.skip:
            for server in servers:      # one at a time: a burst takes the whole machine
                _add(results, server, measure_burst(server, opts))
        if opts.stalled > 0 and "stalled" not in opts.skip:
            for server in servers:
                for row in measure_stalled(server, opts):
                    _add(results, server, row)
    finally:
        for server in servers:
            code, seconds = server.stop()
            _add(results, server, {"test": "SIGTERM exit", "exit_code": code, "seconds": seconds,
                                   "summary": "exit %s in %.1f s" % (code, seconds)})
    return results


def markdown(results, first_column="test"):
    """One row per test (in first-seen order), one column per server."""
    names = list(results)
    tests = list(dict.fromkeys(row["test"] for rows in results.values() for row in rows))
    cells = {(name, row["test"]): row["summary"] for name, rows in results.items() for row in rows}
    lines = ["| %s | " % first_column + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for test in tests:
        lines.append("| %s | %s |" % (test, " | ".join(cells.get((n, test), "") for n in names)))
    return "\n".join(lines)


def scale_markdown(rows):
    """The rows that carry a "figure": one row per figure, one column per size."""
    scaled = {}
    for row in rows:
        if "figure" in row:
            scaled.setdefault("%s keys" % format(row["keys"], ","), []).append(
                dict(row, test=row["figure"]))
    return markdown(scaled, "figure") if scaled else ""


def measure_persistence(opts):
    """bench.persist's measurements and bench.listing's, those not skipped; one that fails is a row saying so."""
    rows = []
    for part, measure in OUR_SERVER_MEASUREMENTS:
        if part in opts.skip:
            continue
        if not rows:
            print("## persistence, listing and batches (our server)", flush=True)
        try:
            new = measure(opts)
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            new = [{"test": part, "summary": "failed: %s" % exc, "error": str(exc)}]
        for row in new:
            print("  %-32s %s" % (row["test"], row["summary"]), flush=True)
        rows += new
    return rows


def _our_flags(opts):
    return "its defaults" if not opts.server_flags else " ".join(opts.server_flags)


def _sizes(text):
    return [int(x) for x in text.split(",") if int(x) > 0]


def _parts(text):
    parts = [x for x in text.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(", ".join(sorted(unknown)))
    return parts


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load test")
    parser.add_argument("--repeat", type=lambda s: max(1, int(s)), default=2,
                        help="runs per load test; the best is reported (default 2)")
    parser.add_argument("--connections", default="1,16,64,256",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--keys", type=int, default=100000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--burst", type=int, default=10000, help="burst size; 0 skips it")
    parser.add_argument("--burst-timeout", type=float, default=15.0)
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES,
                        help="load generator processes")
    parser.add_argument("--no-wrk", dest="wrk", action="store_false",
                        help="skip the wrk cross-check (it runs only if wrk is installed)")
    parser.add_argument("--servers", help="comma-separated names (default: all): "
                        + ", ".join(name for name, _ in SERVERS))
    parser.add_argument("--server-flags", type=shlex.split, default=[],
                        help="extra flags for our server, e.g. '--cpu 1' (default: none, "
                             "its defaults)")
    parser.add_argument("--stalled", type=int, default=1000,
                        help="stalled connections in the stalled-client case; 0 skips it "
                             "(default 1000)")
    parser.add_argument("--stalled-load", type=int, default=1,
                        help="connections of the well-behaved client beside them (default 1)")
    parser.add_argument("--checkpoint-keys", type=int, default=1000000,
                        help="keys in the checkpoint case; 0 skips it (default 1000000)")
    parser.add_argument("--checkpoint-bytes", type=int, default=8000000,
                        help="our server's --checkpoint-bytes in that case (default 8000000)")
    parser.add_argument("--checkpoint-duration", type=float, default=10.0,
                        help="seconds per run in that case (default 10)")
    parser.add_argument("--sizes", type=_sizes, default=[100000, 1000000, 5000000],
                        help="key counts for the scaling figures (start, save, RSS, replay); "
                             "0 skips them (default 100000,1000000,5000000)")
    parser.add_argument("--listing-keys", type=int, default=1000000,
                        help="keys in the listing case (bench.listing); 0 skips it "
                             "(default 1000000)")
    parser.add_argument("--batch-keys", type=int, default=1000000,
                        help="keys imported by POST /batch and exported (bench.batch); 0 "
                             "skips it (default 1000000)")
    parser.add_argument("--batch-lines", type=int, default=10000,
                        help="lines (keys) per POST /batch in that case (default 10000)")
    parser.add_argument("--batch-duration", type=float, default=10.0,
                        help="seconds per run of PUT c=64 beside exports (default 10)")
    parser.add_argument("--skip", type=_parts, default=[],
                        help="comma-separated parts to leave out: " + ", ".join(PARTS))
    opts = parser.parse_args(argv)
    if not opts.sizes:
        opts.skip.append("scale")
    if opts.checkpoint_keys <= 0:
        opts.skip.append("checkpoint")
    if opts.listing_keys <= 0:
        opts.skip.append("listing")
    if opts.batch_keys <= 0:
        opts.skip.append("batch")
    return opts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python3 -m bench.run"] + argv)
    opts = parse_args(argv)
    chosen = opts.servers.split(",") if opts.servers else [name for name, _ in SERVERS]
    unknown = set(chosen) - {name for name, _ in SERVERS}
    if unknown:
        sys.exit("unknown server(s): %s" % ", ".join(sorted(unknown)))
    raise_fd_limit()            # inherited by the servers: the burst needs thousands of fds
    # SIGTERM as an exception, so that `finally` stops the server (it runs in its own session).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = {}
    if not {"load", "burst", "stalled"} <= set(opts.skip):
        print("## servers: %s" % ", ".join(chosen), flush=True)
        results = bench_servers(chosen, opts)
    persistence = measure_persistence(opts)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform(), "loadavg": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d"), "wrk": bool(shutil.which("wrk"))}
    header = ("%s, %d cores, Python %s; `%s`; load: best of %d runs of %g s per cell, "
              "%d keys of %d B preloaded; our server (`%s`): server.py with %s"
              % (machine["date"], machine["cpus"], machine["python"], command, opts.repeat,
                 opts.duration, opts.keys, opts.value_size, OURS, _our_flags(opts)))
    table = header
    if results:
        table += "\n\n" + markdown(results)
    flat = [row for row in persistence if "figure" not in row]
    if flat:
        table += "\n\n" + markdown({"our server": flat})
    if scale_markdown(persistence):
        table += "\n\nHow the figures grow with the number of keys (100 B values):\n\n"
        table += scale_markdown(persistence)
    goals = goal_rows(results, persistence)
    if goals:
        table += ("\n\nThe goals (our server on %s; throughput and latency "
                  "goals on the means of each cell's %d runs):\n\n"
                  % (_our_flags(opts), opts.repeat) + goals_markdown(goals))
    print("\n" + table, flush=True)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, time.strftime("bench-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as out:
        json.dump({"machine": machine, "options": vars(opts), "results": results,
                   "persistence": persistence, "goals": goals, "table": table}, out, indent=1)
    print("\nraw results: %s" % os.path.relpath(path), flush=True)


if __name__ == "__main__":
    main()
