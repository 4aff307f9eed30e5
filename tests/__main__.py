"""Run the whole suite: `python3 -m tests` (what `make test` does).

    python3 -m tests [-j N] [PATTERN ...]

The test modules run in parallel, each in a worker process of its own
(the longest few, one process per test class), `-j` at a time (default 4,
or $KV_TEST_JOBS; `-j 1` runs them one after the other), the longest first
so that the last to finish is a short one (see Schedule for the few that
time a flood).  Each worker is a fork of a process that has imported the
test modules once (Workers).  Four on two CPUs: many tests wait on the
server's timers, and a fourth worker uses the CPU they leave (whole runs on
the shared 2-CPU machine, when the suite was slower: 73-74 s with 4, 77-83 s
with 3; later, 5 or 6 were no faster than 4).  Every test
already has its own port and data directory, so they share nothing but the
CPUs.  PATTERNs select tests as unittest's -k does (a substring of the
test's full name, or a glob), e.g. `python3 -m tests shutdown`.

Output: one line per module (or class) as it finishes, with its counts, time and
CPU, one line per failing or skipped test under it, then the tracebacks of
the failures, then the totals.  The last line is always "N passed, N failed, N skipped": CI reads
it.  The exit status is 0 only if no test failed and at least one ran.
"""
import argparse
import importlib
import json
import multiprocessing
import os
import queue
import resource
import sys
import tempfile
import threading
import time
import traceback
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# The units of work, each run by a worker process: a module, or for the long
# modules in SPLIT, each of its test classes.  DURATIONS is what each took in a
# whole run with 4 workers, on the shared 2-CPU machine: (seconds, seconds of CPU
# of the worker and the servers it waited for); now the means of six runs with
# other work beside them (load average 3 to 7), so longer than alone.  Units
# start longest first, the TIMED ones before all.  A unit missing here counts as
# long (it starts early) and busy; stale figures only make the schedule a little
# worse, never a result wrong.
SPLIT = {"test_attacks", "test_crash", "test_disk", "test_expiry", "test_failures",
         "test_lifecycle", "test_limits", "test_persistence"}
DURATIONS = {
    "test_metrics": (10.2, 2.2), "test_lifecycle.ShutdownTest": (10.1, 3.5),
    "test_lifecycle.CommandLineTest": (8.3, 3.8),
    "test_lifecycle.ShutdownUnderLoadTest": (4.8, 2.6),
    "test_lifecycle.ProcessFailureTest": (3.8, 1.2), "test_lifecycle.CpuTest": (0.6, 0.3),
    "test_crash.KillFsyncAlwaysTest": (9.6, 2.9),
    "test_crash.KillFsyncEverysecTest": (7.5, 2.8), "test_crash.KillFsyncNoTest": (6.5, 2.7),
    "test_crash.CheckpointUnderLoadTest": (3.7, 1.7), "test_crash.BatchKillTest": (2.9, 1.7),
    "test_crash.JournalDamageTest": (2.7, 1.3), "test_crash.BurstKillTest": (2.5, 1.7),
    "test_crash.AllowedStatesTest": (0, 0), "test_attacks.PipelineFloodTest": (9.5, 4.5),
    "test_attacks.StalledDiskTest": (5.9, 1.6),
    "test_attacks.ConnectionDeadlineTest": (2.9, 0.2),
    "test_attacks.InflightMemoryTest": (1.7, 0.8), "test_attacks.HalfCloseTest": (0.2, 0.1),
    "test_attacks.HugeContentLengthTest": (0.2, 0.1), "test_backup": (9.2, 2),
    "test_export": (8.4, 1.4), "test_auth": (7, 2.9), "test_expiry.RestartTest": (5.8, 1.5),
    "test_expiry.WatchCostTest": (2.7, 1.5), "test_expiry.WatchTest": (2.4, 0.1),
    "test_expiry.ExpiryTest": (2.3, 0.2), "test_expiry.ReadmeRecipeTest": (0.5, 0.2),
    "test_batch": (5.1, 2.2), "test_disk.VanishedDirectoryTest": (4.3, 0.7),
    "test_disk.TornLastWriteTest": (1.5, 0.5),
    "test_disk.ChildrenDieWithTheServerTest": (1.3, 0.7),
    "test_disk.SnapshotChecksumTest": (1.3, 0.6), "test_disk.FullDiskRestartTest": (1, 0.8),
    "test_disk.UnchangedSnapshotTest": (0.8, 0.4),
    "test_persistence.GroupCommitTest": (4.2, 0.4),
    "test_persistence.CheckpointCrashTest": (3.5, 0.5),
    "test_persistence.DataDirectorySafetyTest": (1.9, 1.2),
    "test_persistence.BadSnapshotTest": (1.8, 1.1),
    "test_persistence.SnapshotChecksumTest": (1.2, 0.2),
    "test_persistence.VanishedFilesTest": (1.2, 0.1),
    "test_persistence.FailedSaveTest": (1, 0.3),
    "test_persistence.ApplyAfterDurableTest": (0.5, 0),
    "test_persistence.JournalOrderTest": (0.3, 0.2),
    "test_persistence.FailedCheckpointCleanupTest": (0.2, 0.1),
    "test_persistence.RoundsTest": (0.2, 0.1), "test_persistence.RecordTest": (0.1, 0),
    "test_persistence.LedgerTest": (0, 0), "test_persistence.LoadTest": (0, 0),
    "test_persistence.TornWriteTest": (0, 0), "test_deploy": (3.9, 1.7),
    "test_limits.FairnessTest": (3.6, 2.2), "test_limits.FileDescriptorTest": (2.2, 0.2),
    "test_limits.DeadlineTest": (1.9, 0.2), "test_limits.MemoryCapTest": (1.5, 0.3),
    "test_limits.ThreadLimitTest": (0.9, 0.5), "test_limits.ConnectionCapTest": (0.2, 0.1),
    "test_conditional": (3.3, 1.2), "test_http_api": (3.3, 1.9), "test_listing": (3.3, 1.6),
    "test_http_protocol": (3.1, 1), "test_failures.FsyncErrorTest": (2.9, 0.5),
    "test_failures.RlimitFullDiskTest": (1.5, 0.3),
    "test_failures.JournalWriterDeathTest": (1.3, 0.2),
    "test_failures.TmpfsFullDiskTest": (0.5, 0.2), "test_http11": (2.1, 1.4),
    "test_docs": (1.1, 0.9), "test_operations": (0.8, 0.5), "test_bench_goals": (0, 0),
    "test_connection": (0.7, 0.2),
    "test_bench_persist": (0, 0), "test_bench_run": (0, 0),
}
UNKNOWN_DURATION = (30, 30)
# Units whose tests bound another client's latency while they flood the server: on
# two CPUs, the other workers' CPU shows in those latencies.  Each starts first, and
# while it runs the other workers take only units that mostly wait (CPU under 30% of
# their time) while there are any.  (Under a load average of 9 to 11, with busy units
# beside it, PipelineFloodTest once saw a 99th percentile of 67 ms for a bound of 59.)
TIMED = {"test_attacks.PipelineFloodTest", "test_limits.FairnessTest"}
# A unit that runs longer than this is stopped and counted as failed: a hung
# test must not hang CI.
MODULE_TIMEOUT = 900


def load(unit, patterns):
    """The tests of one unit ("test_limits", "test_limits.DeadlineTest") that match `patterns`."""
    loader = unittest.TestLoader()
    if patterns:
        loader.testNamePatterns = [p if "*" in p else "*%s*" % p for p in patterns]
    return loader.loadTestsFromName("tests." + unit)


def test_classes(suite):
    """The names of the TestCase classes in a suite, in order, each once."""
    names = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            found = test_classes(item)
        else:
            found = [type(item).__name__]
        names.extend(n for n in found if n not in names)
    return names


def units(patterns):
    """The units to run, each with at least one test that matches `patterns`."""
    found = []
    for module in sorted(name[:-3] for name in os.listdir(TESTS)
                         if name.startswith("test") and name.endswith(".py")):
        try:
            suite = load(module, patterns)
        except Exception:                               # noqa: BLE001 - its worker reports it
            found.append(module)
            continue
        if not suite.countTestCases():
            continue
        classes = test_classes(suite)
        if module in SPLIT and "_FailedTest" not in classes:
            found.extend("%s.%s" % (module, name) for name in classes)
        else:
            found.append(module)
    return found


# -- the worker: one unit, in a process of its own -----------------------------

class Collector(unittest.TextTestResult):
    """A result that also keeps, for each test, what happened to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = []

    def record(self, test, kind, detail=""):
        test = getattr(test, "test_case", test)         # a subtest counts as its test
        self.outcomes.append({"id": test.id(), "kind": kind, "detail": detail})

    def addError(self, test, err):
        super().addError(test, err)
        self.record(test, "ERROR", self.errors[-1][1])

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.record(test, "FAIL", self.failures[-1][1])

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            detail = (self.failures if failed else self.errors)[-1][1]
            self.record(test, "FAIL" if failed else "ERROR", "%s\n%s" % (subtest.id(), detail))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.record(test, "skipped", reason)

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.record(test, "FAIL", "unexpected success")


def worker(unit, patterns, result_path):
    """Run one unit; write what happened to `result_path` (JSON)."""
    started = time.monotonic()
    suite = load(unit, patterns)
    with open(os.devnull, "w") as quiet:
        # buffer: what a test prints is kept with its failure, dropped if it passes.
        runner = unittest.TextTestRunner(stream=quiet, verbosity=0, buffer=True,
                                         resultclass=Collector)
        result = runner.run(suite)
    failed = {o["id"] for o in result.outcomes if o["kind"] in ("FAIL", "ERROR")}
    skipped = {o["id"] for o in result.outcomes if o["kind"] == "skipped"} - failed
    # CPU: the worker's, and its children's that it waited for (the servers it
    # started; not a helper process orphaned by a SIGKILL of its server).
    cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    with open(result_path, "w") as f:
        json.dump({"ran": result.testsRun, "failed": len(failed), "skipped": len(skipped),
                   "outcomes": result.outcomes, "seconds": time.monotonic() - started,
                   "cpu": cpu}, f)


# -- the parent: schedule the units, report ------------------------------------

def run_in_child(unit, patterns, result_path, log_path):
    """The body of a worker process: in ROOT, its output (fds 1 and 2) to `log_path`."""
    os.chdir(ROOT)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    worker(unit, patterns, result_path)


class Workers:
    """Starts the worker processes, each a fork of a process that has already imported
    unittest and the test modules (multiprocessing's forkserver): a few milliseconds
    of CPU, where a new interpreter that imports them takes over 100 (48 units: the
    suite went from 119.5 to 115.5 s of CPU).  The fork server is single-threaded,
    and each unit still runs in a process of its own."""

    def __init__(self, modules):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["unittest", "tests.__main__", "tests.support"]
                                            + ["tests." + m for m in modules])
        # A child finds its target by the name of the target's module: not "__main__"
        # (multiprocessing does not import a package's __main__ in a child).
        self.target = importlib.import_module("tests.__main__").run_in_child
        self.lock = threading.Lock()    # Process.start() from several threads at once

    def run(self, unit, patterns, result_path, log_path):
        """Run `unit` in a new worker process; its exit code, or a string if it was killed."""
        process = self.context.Process(target=self.target, name="tests " + unit,
                                       args=(unit, patterns, result_path, log_path))
        with self.lock:
            process.start()
        process.join(MODULE_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
            return "killed after %d s" % MODULE_TIMEOUT
        return process.exitcode


def run_unit(workers, unit, patterns, directory):
    """Run `unit` in a worker process; what it reported (or a failure if it did not)."""
    result_path = os.path.join(directory, unit + ".json")
    log_path = os.path.join(directory, unit + ".log")
    started = time.monotonic()
    code = workers.run(unit, patterns, result_path, log_path)
    try:
        with open(result_path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        try:
            with open(log_path, "rb") as f:
                output = f.read().decode("utf-8", "replace")
        except OSError:
            output = ""
        report = {"ran": 1, "failed": 1, "skipped": 0, "outcomes": [{
            "id": "tests." + unit, "kind": "ERROR",
            "detail": "the worker exited (%s) without a result; its output:\n%s"
                      % (code, output[-20000:])}]}
    report["seconds"] = time.monotonic() - started
    return report


class Schedule:
    """The units not started yet, and which to start next (see TIMED)."""

    def __init__(self, planned):
        self.waiting = sorted(planned, key=lambda u: (u not in TIMED, -duration(u)[0]))
        self.timed_running = 0
        self.lock = threading.Lock()

    def take(self):
        """The next unit to run, or None when none is left."""
        with self.lock:
            if not self.waiting:
                return None
            unit = self.waiting[0]
            if self.timed_running:
                unit = next((u for u in self.waiting if mostly_waits(u)), unit)
            self.waiting.remove(unit)
            self.timed_running += unit in TIMED
            return unit

    def done(self, unit):
        with self.lock:
            self.timed_running -= unit in TIMED


def duration(unit):
    return DURATIONS.get(unit, UNKNOWN_DURATION)


def mostly_waits(unit):
    seconds, cpu = duration(unit)
    return unit not in TIMED and cpu < 0.3 * seconds


def cache_bytecode(directory):
    """Where PYTHONDONTWRITEBYTECODE forbids bytecode caches, have the run keep one in
    `directory` (PYTHONPYCACHEPREFIX), for the worker processes and what they start.

    Else every server start compiles the server's modules again: some 400 starts,
    about 20 ms of CPU each on a 2-CPU machine (the suite went from 130-135 to 122-124
    s of CPU).  Nothing is written in the tree, and the directory goes with the run.
    """
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(directory, "pycache")


def main(argv):
    parser = argparse.ArgumentParser(prog="python3 -m tests", description=__doc__.split("\n")[0])
    parser.add_argument("-j", "--jobs", type=int,
                        default=int(os.environ.get("KV_TEST_JOBS", "4")),
                        help="worker processes at once (default 4, or $KV_TEST_JOBS)")
    parser.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)
    parser.add_argument("patterns", nargs="*", metavar="PATTERN",
                        help="run only the tests whose name matches (unittest -k)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.patterns[0], args.patterns[1:], args.worker)
        return 0

    started = time.monotonic()
    planned = units(args.patterns)
    # The fork server imports the modules that this process could import (units()
    # did); a module that fails to import fails in its own worker, as it would alone.
    workers = Workers(sorted({u.split(".")[0] for u in planned
                              if "tests." + u.split(".")[0] in sys.modules}))
    jobs = max(1, min(args.jobs, len(planned) or 1))
    print("Running %d module(s) or class(es) in %d worker(s)" % (len(planned), jobs),
          flush=True)

    totals = {"ran": 0, "failed": 0, "skipped": 0}
    failures, lock, cpu = [], threading.Lock(), 0.0
    schedule, finished = Schedule(planned), queue.Queue()

    def run_units(directory):
        """A worker thread: run the units the schedule gives, one after the other."""
        while True:
            unit = schedule.take()
            if unit is None:
                return
            try:
                report = run_unit(workers, unit, args.patterns, directory)
            except Exception:                           # noqa: BLE001 - a bug here
                report = {"ran": 1, "failed": 1, "skipped": 0, "seconds": 0, "outcomes": [
                    {"id": "tests." + unit, "kind": "ERROR",
                     "detail": traceback.format_exc()}]}
            schedule.done(unit)
            finished.put((unit, report))

    with tempfile.TemporaryDirectory(prefix="kvtest-run-") as directory:
        cache_bytecode(directory)
        threads = [threading.Thread(target=run_units, args=(directory,), daemon=True)
                   for _ in range(jobs)]
        for thread in threads:
            thread.start()
        for _ in planned:
            unit, report = finished.get()
            with lock:
                for key in totals:
                    totals[key] += report[key]
                status = "FAIL" if report["failed"] else "ok"
                cpu += report.get("cpu", 0)
                print("%-4s %-40s %3d tests, %d failed, %d skipped %6.1f s, CPU %5.1f s"
                      % (status, unit, report["ran"], report["failed"], report["skipped"],
                         report["seconds"], report.get("cpu", 0)), flush=True)
                seen = set()
                for outcome in report["outcomes"]:
                    if outcome["kind"] in ("FAIL", "ERROR"):
                        if outcome["id"] not in seen:
                            print("     %s: %s" % (outcome["kind"], outcome["id"]), flush=True)
                            seen.add(outcome["id"])
                        failures.append(outcome)
                    elif outcome["kind"] == "skipped":
                        print("     skipped: %s: %s" % (outcome["id"], outcome["detail"]),
                              flush=True)

    for outcome in failures:
        print("=" * 70)
        print("%s: %s" % (outcome["kind"], outcome["id"]))
        print("-" * 70)
        print(outcome["detail"].rstrip("\n"))
    if failures:
        print("=" * 70)
    failed, skipped = totals["failed"], totals["skipped"]
    passed = totals["ran"] - failed - skipped
    print("Ran %d tests in %.1f s (%d workers, %.0f s of CPU)"
          % (totals["ran"], time.monotonic() - started, jobs, cpu))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped), flush=True)
    return 0 if failed == 0 and totals["ran"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
