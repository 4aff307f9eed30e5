"""Black-box tests of the command line and of the process lifecycle.

Starting (flags, environment, run.sh, refusals), and stopping: SIGTERM and
SIGINT save everything that was acknowledged; idle connections do not hold
shutdown up, requests in flight finish, stalled ones are cut off at
--shutdown-timeout; a write that arrives after the store is sealed gets 503.

Synchronisation points, so that no test depends on timing:
- "the server is inside a request": a PUT with `Expect: 100-continue` has
  been answered `100 Continue` (durability_support.start_put);
- "the server is draining": an idle keep-alive connection has been closed
  by the server (drain closes idle connections first thing);
- "the store is sealed": the `Flushing N keys` line (logged after the seal);
- "the save has not happened yet": the server runs with os.fsync held
  while a file of the test's exists (durability_support.FaultyFsyncServer),
  so its save waits until the test removes it (and the save then fails
  with EIO: that doubles as the failed-save test).
"""
import ast
import fcntl
import glob
import http.client
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from bench.load import burst
from tests import support
from tests.durability_support import (
    TRACEBACK, BareServer, Completed, FaultyFsyncServer, file_state, get_many, idle_connection,
    journals, read_response, run_cli, start_put, stop_within, wait_closed)

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402

RUN_SH = os.path.join(support.ROOT, "run.sh")
FLAGS = ("--host", "--port", "--working-dir", "--shutdown-timeout", "--max-value-bytes",
         "--fsync", "--checkpoint-bytes", "--lock-wait", "--cpu", "--access-log")
FLUSHING = re.compile(r"Flushing (\d+) keys to (\S+)")
SNAPSHOT = "store.pickle"


class LifecycleTestCase(support.ServerTestCase):

    def start_bare(self, *args, **kwargs):
        server = BareServer(*args, **kwargs)
        self.addCleanup(server.__exit__, None, None, None)
        return server.start()

    def sigterm_with_put_in_flight(self, server, key, value, sent):
        """Start a PUT of `value` with only `sent` bytes of its body, SIGTERM,
        and return the PUT's socket once the drain has begun (an idle probe
        connection was closed by the server)."""
        probe = idle_connection(server)
        put = start_put(server, key, len(value), value[:sent])
        self.addCleanup(probe.close)
        self.addCleanup(put.close)
        server.signal(signal.SIGTERM)
        self.assertTrue(wait_closed(probe, 20), "drain did not close the idle connection")
        return put

    def sub_dir(self, *names):
        return os.path.join(self.data_dir, *names)

    def assert_one_line(self, result, stream="stderr", contains=()):
        """`stream` of a finished run is exactly one line, mentioning each of `contains`."""
        self.assertNotIn(TRACEBACK, result.stdout + result.stderr, result)
        lines = result.lines(stream)
        self.assertEqual(len(lines), 1, "expected one line on %s: %r" % (stream, result))
        for text in contains:
            self.assertIn(str(text), lines[0], result)
        return lines[0]


# ------------------------------------------------------------------ starting --

class CommandLineTest(LifecycleTestCase):

    def test_help_documents_every_flag_and_the_environment(self):
        result = run_cli(["--help"])
        self.assertEqual(result.code, 0, result)
        for word in FLAGS + ("HOST", "PORT", "DATA_DIR"):
            self.assertIn(word, result.stdout, "--help does not mention %s" % word)
        self.assertNotIn(TRACEBACK, result.stdout + result.stderr)

    def test_environment_is_used_when_flags_are_absent(self):
        port = support.free_port()
        data = self.sub_dir("from-env")
        server = self.start_bare(env={"PORT": str(port), "DATA_DIR": data, "HOST": "127.0.0.1"})
        self.assertEqual(server.listening.group(1), "127.0.0.1", server.output())
        self.assertEqual(server.port, port, server.output())
        server.put("env-key", b"env-value")
        self.assertTrue(os.path.isdir(data), "DATA_DIR %s was not created" % data)
        self.assertEqual(stop_within(server)[0], 0, server.output())
        self.assertTrue(os.path.exists(os.path.join(data, SNAPSHOT)), os.listdir(data))
        again = self.start_server(data_dir=data)
        self.assertEqual(again.get("env-key"), b"env-value")

    def test_flags_win_over_the_environment(self):
        env_port, flag_port = support.free_port(), support.free_port()
        env_dir, flag_dir = self.sub_dir("env"), self.sub_dir("flag")
        server = self.start_bare(
            "--host", "127.0.0.1", "--port", str(flag_port), "--working-dir", flag_dir,
            env={"HOST": "0.0.0.0", "PORT": str(env_port), "DATA_DIR": env_dir})
        self.assertEqual(server.listening.group(1), "127.0.0.1", server.output())
        self.assertEqual(server.port, flag_port, server.output())
        server.put("k", b"v")
        self.assertTrue(os.path.isdir(flag_dir))
        self.assertFalse(os.path.exists(env_dir), "DATA_DIR was used despite --working-dir")

    def test_port_with_equals_sign_and_as_separate_argument(self):
        for i, form in enumerate(("--port=%d", "--port %d")):
            with self.subTest(form=form):
                port = support.free_port()
                args = (form % port).split() + ["--host=127.0.0.1",
                                                "--working-dir=" + self.sub_dir(str(i))]
                server = self.start_bare(*args)
                self.assertEqual(server.port, port, server.output())
                server.put("k", b"v")
                self.assertEqual(server.get("k"), b"v")
                self.assertEqual(stop_within(server)[0], 0, server.output())

    def test_bad_usage_exits_2_with_one_line(self):
        base = ["--host", "127.0.0.1", "--port", "0", "--working-dir", self.data_dir]
        cases = [
            (["--port", "abc"], {}, "abc"),
            (["--port", "70000"], {}, "70000"),
            (["--port", "-1"], {}, "-1"),
            (["--port=80x"], {}, "80x"),
            (["--port"], {}, "--port"),
            (["--fsync", "sometimes"], {}, "sometimes"),
            (["--max-value-bytes", "0"], {}, "--max-value-bytes"),
            (["--max-value-bytes", "ten"], {}, "ten"),
            (["--checkpoint-bytes", "0"], {}, "--checkpoint-bytes"),
            (["--shutdown-timeout", "-1"], {}, "--shutdown-timeout"),
            (["--shutdown-timeout", "nan"], {}, "nan"),
            (["--lock-wait", "-1"], {}, "--lock-wait"),
            (["--cpu", "auto"], {}, "auto"),
            (["--cpu", "-1"], {}, "-1"),
            (["--no-such-flag"], {}, "--no-such-flag"),
            (["stray-argument"], {}, "stray-argument"),
        ]
        for extra, env, mention in cases:
            with self.subTest(args=extra):
                result = run_cli(base + extra, env=env)
                self.assertEqual(result.code, 2, result)
                line = self.assert_one_line(
                    result, "stderr" if result.stderr.strip() else "stdout")
                self.assertIn(mention, line)
        no_port = ["--host", "127.0.0.1", "--working-dir", self.data_dir]
        for value in ("abc", "70000"):
            with self.subTest(env_port=value):
                result = run_cli(no_port, env={"PORT": value})
                self.assertEqual(result.code, 2, result)
                line = self.assert_one_line(
                    result, "stderr" if result.stderr.strip() else "stdout")
                self.assertIn(value, line)

    def test_an_empty_variable_is_bad_usage_never_a_default(self):
        # Set but empty, HOST would bind every address, DATA_DIR put the
        # store, its lock and journal in the current directory, and
        # KV_AUTH_TOKEN_FILE switch auth off.  Run from an empty directory:
        # nothing may appear in it.
        cwd = tempfile.mkdtemp(prefix="kvtest-cwd-")
        self.addCleanup(shutil.rmtree, cwd, True)
        flags = {"HOST": ["--host", "127.0.0.1"], "PORT": ["--port", "0"],
                 "DATA_DIR": ["--working-dir", self.data_dir], "KV_AUTH_TOKEN_FILE": []}
        for name in flags:
            with self.subTest(variable=name):
                args = [arg for other, pair in flags.items() if other != name for arg in pair]
                result = run_cli(args, env={name: ""}, cwd=cwd)
                self.assertEqual(result.code, 2, result)
                self.assert_one_line(result, contains=[name])
                self.assertEqual(os.listdir(cwd), [], "an empty %s wrote there" % name)

    def test_an_empty_path_or_a_malformed_host_is_bad_usage(self):
        cwd = tempfile.mkdtemp(prefix="kvtest-cwd-")
        self.addCleanup(shutil.rmtree, cwd, True)
        base = {"--host": "127.0.0.1", "--port": "0", "--working-dir": self.data_dir}
        cases = [("--working-dir", ""), ("--auth-token-file", ""), ("--host", ""),
                 ("--host", "999.1.1.1"), ("--host", "[::1"), ("--host", "[127.0.0.1]"),
                 ("--host", "bad host"), ("--host", "-bad.example"), ("--host", "::1::2")]
        for flag, value in cases:
            with self.subTest(flag=flag, value=value):
                args = dict(base, **{flag: value})
                result = run_cli([word for pair in args.items() for word in pair], cwd=cwd)
                self.assertEqual(result.code, 2, result)
                self.assert_one_line(result, contains=[flag])
                self.assertEqual(os.listdir(cwd), [])

    @unittest.skipUnless(socket.has_ipv6, "needs IPv6")
    def test_ipv6_with_or_without_brackets_is_logged_in_brackets(self):
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            self.skipTest("no IPv6 loopback here: %s" % e)
        for i, host in enumerate(("[::1]", "::1")):
            with self.subTest(host=host):
                server = self.start_bare("--host", host, "--port", "0",
                                         "--working-dir", self.sub_dir(str(i)))
                self.assertEqual(server.listening.group(1), "[::1]", server.output())
                server.host = "::1"
                server.put("k", b"v")
                self.assertEqual(server.get("k"), b"v")
                self.assertEqual(stop_within(server)[0], 0, server.output())

    def test_version(self):
        with open(support.SERVER, encoding="utf-8") as f:
            version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)
        result = run_cli(["--version"])
        self.assertEqual((result.code, result.stdout, result.stderr),
                         (0, "kvstore %s\n" % version, ""))
        self.assertRegex(version, r"^\d+\.\d+\.\d+$")

    def start_on_a_taken_port(self):
        """run_cli() of a server whose port another socket holds; (result, port)."""
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            port = blocker.getsockname()[1]
            return run_cli(["--host", "127.0.0.1", "--port", str(port),
                            "--working-dir", self.data_dir]), port

    def test_port_in_use_exits_1_naming_the_port(self):
        result, port = self.start_on_a_taken_port()
        self.assertEqual(result.code, 1, result)
        self.assert_one_line(result, contains=[port])
        self.assertLess(result.seconds, 10, result)

    def test_a_taken_port_fails_before_the_data_is_loaded_and_leaves_no_file(self):
        # The port is bound first: a taken port is told at once, not after
        # loading a large snapshot, and the failed start changes nothing.
        # main 322ce3d loaded the store (and opened a new journal) first.
        persistence.write_snapshot(self.data_dir, {"k%d" % i: b"v" for i in range(1000)})
        before = sorted(os.listdir(self.data_dir))
        result, _ = self.start_on_a_taken_port()
        self.assertEqual(result.code, 1, result)
        self.assertNotIn("Loaded", result.stdout + result.stderr)
        self.assertEqual(sorted(os.listdir(self.data_dir)), before)

    def test_unusable_data_dir_exits_1_naming_it(self):
        regular = self.sub_dir("a-file")
        with open(regular, "wb") as f:
            f.write(b"not a directory")
        for working_dir in (os.path.join(regular, "sub"), regular):
            with self.subTest(working_dir=working_dir):
                result = run_cli(["--host", "127.0.0.1", "--port", "0",
                                  "--working-dir", working_dir])
                self.assertEqual(result.code, 1, result)
                self.assert_one_line(result, contains=[regular])
        with open(regular, "rb") as f:
            self.assertEqual(f.read(), b"not a directory")

    def test_second_server_on_the_same_directory_exits_1(self):
        first = self.start_server()
        first.put("mine", b"first")
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.data_dir,
                          "--lock-wait", "0.5"])
        self.assertEqual(result.code, 1, result)
        self.assert_one_line(result, contains=[os.path.realpath(self.data_dir), "in use",
                                               "waited 0.5 s"])
        self.assertGreaterEqual(result.seconds, 0.5, "it did not wait for the lock")
        # The first server is undisturbed, and still persists what it is given.
        self.assertEqual(first.get("mine"), b"first")
        first.put("after", b"second attempt refused")
        self.assertEqual(stop_within(first)[0], 0, first.output())
        again = self.restart(first)
        self.assertEqual(again.get("mine"), b"first")
        self.assertEqual(again.get("after"), b"second attempt refused")

    def test_run_sh_is_the_server_and_resolves_relative_dirs_from_the_cwd(self):
        cwd = tempfile.mkdtemp(prefix="kvtest-cwd-")
        self.addCleanup(shutil.rmtree, cwd, True)
        port = support.free_port()
        server = self.start_bare("--port=%d" % port, "--working-dir=rel/dir",
                                 "--host=127.0.0.1", executable=RUN_SH, cwd=cwd)
        self.assertEqual(server.port, port)
        with open("/proc/%d/cmdline" % server.proc.pid, "rb") as f:
            argv = f.read().split(b"\0")
        self.assertTrue(any(a.endswith(b"server.py") for a in argv),
                        "run.sh's PID is not the server (no exec?): %r" % argv)
        data = os.path.join(cwd, "rel", "dir")
        self.assertTrue(os.path.isdir(data), "relative --working-dir not under the caller's cwd")
        self.assertFalse(os.path.exists(os.path.join(support.ROOT, "rel")))
        server.put("via-run-sh", b"yes")
        # The harnesses signal run.sh's own PID and wait for it.
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output())
        self.assertTrue(os.path.exists(os.path.join(data, SNAPSHOT)), os.listdir(data))

    def test_run_sh_runs_the_python_that_PYTHON_names(self):
        # As `make test PYTHON=...` does: a host whose python3 is too old
        # runs the server with another interpreter.
        bin_dir = tempfile.mkdtemp(prefix="kvtest-bin-")
        self.addCleanup(shutil.rmtree, bin_dir, True)
        python = os.path.join(bin_dir, "python-for-kvstore")
        os.symlink(sys.executable, python)
        server = self.start_bare("--port=0", "--host=127.0.0.1",
                                 "--working-dir=" + self.sub_dir("data"), executable=RUN_SH,
                                 env={"PYTHON": python})
        with open("/proc/%d/cmdline" % server.proc.pid, "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[0], python.encode(), argv)
        self.assertTrue(argv[1].endswith(b"server.py"), argv)
        server.put("k", b"v")
        self.assertEqual(stop_within(server)[0], 0, server.output())

    def test_files_are_private(self):
        old = os.umask(0o022)           # a permissive umask must not make them readable
        try:
            server = self.start_server()
        finally:
            os.umask(old)
        server.put("k", b"secret")
        running = journals(self.data_dir) + [self.sub_dir("LOCK")]
        self.assertTrue(journals(self.data_dir), os.listdir(self.data_dir))
        for path in running:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual(stop_within(server)[0], 0, server.output())
        for path in [self.sub_dir(SNAPSHOT)] + journals(self.data_dir):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)


# ------------------------------------------------------------------ stopping --

def thread_cpus(pid):
    """The CPU set of every thread of process `pid`: {tid: frozenset of CPUs}."""
    tasks = os.listdir("/proc/%d/task" % pid)
    return {int(tid): frozenset(os.sched_getaffinity(int(tid))) for tid in tasks}


def thread_policies(pid):
    """The scheduling policy of every thread of process `pid`, as a set."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/%d/task" % pid)}


@unittest.skipUnless(hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1,
                     "needs Linux and two CPUs")
class CpuTest(LifecycleTestCase):

    def test_default_pins_nothing_and_keeps_the_scheduling_policy(self):
        server = self.start_server()
        server.put("k", b"v")                       # handler threads exist now
        cpus = thread_cpus(server.proc.pid)
        self.assertGreaterEqual(len(cpus), 2)
        self.assertEqual(set(cpus.values()), {frozenset(os.sched_getaffinity(0))})
        self.assertEqual(thread_policies(server.proc.pid), {os.sched_getscheduler(0)})
        self.assertNotIn("Running on CPU", server.output())

    def test_cpu_n_runs_every_thread_on_cpu_n(self):
        cpu = max(os.sched_getaffinity(0))
        server = self.start_server("--cpu", str(cpu))
        server.put("k", b"v")
        cpus = thread_cpus(server.proc.pid)
        self.assertGreaterEqual(len(cpus), 2)
        self.assertEqual(set(cpus.values()), {frozenset({cpu})})
        self.assertIn("Running on CPU %d" % cpu, server.output())
        # ... and no woken thread preempts the one holding the GIL.
        self.assertEqual(thread_policies(server.proc.pid), {os.SCHED_BATCH})
        self.assertEqual(server.stop(), 0)

    def test_a_cpu_it_may_not_use_exits_1(self):
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.data_dir,
                          "--cpu", "4096"])
        self.assertEqual(result.code, 1, result)
        self.assert_one_line(result, contains=["CPU 4096"])


class ShutdownTest(LifecycleTestCase):

    def test_sigterm_and_sigint_save_everything(self):
        values = {"plain": b"hello", "binary": bytes(range(256)) * 4, "over": b"new",
                  "gone": None}
        for signum in (signal.SIGTERM, signal.SIGINT):     # SIGHUP reloads: test_auth
            with self.subTest(signal=signum.name):
                data = self.sub_dir(signum.name)
                server = self.start_server(data_dir=data)
                server.put("plain", b"hello")
                server.put("binary", bytes(range(256)) * 4)
                server.put("over", b"old")
                server.put("over", b"new")
                server.put("gone", b"soon")
                self.assertEqual(server.request("DELETE", "/kv/gone")[0], 200)
                code, _ = stop_within(server, signum)
                self.assertEqual(code, 0, server.output())
                self.assertIn("Received %s, shutting down" % signum.name, server.output())
                flushing = FLUSHING.search(server.output())
                self.assertIsNotNone(flushing, server.output())
                self.assertEqual(int(flushing.group(1)), 3, server.output())
                self.assertEqual(os.path.realpath(flushing.group(2)),
                                 os.path.realpath(os.path.join(data, SNAPSHOT)))
                again = self.start_server(data_dir=data)
                for key, value in values.items():
                    self.assertEqual(again.get(key), value, key)

    def test_idle_server_exits_promptly(self):
        server = self.start_server()
        server.put("k", b"v")
        code, seconds = stop_within(server)
        self.assertEqual(code, 0, server.output())
        self.assertLess(seconds, 5.0, server.output())

    def test_signal_right_after_startup_is_not_lost(self):
        # The harnesses send SIGTERM as soon as they have seen the server
        # listen.  Repeated, because the window (the main thread still inside
        # its "Server listening" log call) is short.
        for attempt in range(8):
            server = self.start_server(data_dir=self.sub_dir(str(attempt)))
            try:
                code, seconds = stop_within(server, timeout=10)
            except AssertionError as e:
                raise AssertionError("attempt %d: %s" % (attempt, e)) from None
            self.assertEqual(code, 0, server.output())

    def test_idle_keep_alive_connections_do_not_delay_shutdown(self):
        server = self.start_server("--shutdown-timeout", "30")
        server.put("k", b"v")
        after_request = idle_connection(server)
        never_spoke = socket.create_connection((server.host, server.port), timeout=10)
        self.addCleanup(after_request.close)
        self.addCleanup(never_spoke.close)
        code, seconds = stop_within(server, timeout=40)
        self.assertEqual(code, 0, server.output())
        self.assertLess(seconds, 10.0, "an idle connection held shutdown up")
        self.assertEqual(self.restart(server).get("k"), b"v")

    def test_request_in_flight_completes_and_is_saved(self):
        server = self.start_server("--shutdown-timeout", "30")
        value = b"0123456789" * 100
        put = self.sigterm_with_put_in_flight(server, "in-flight", value, 500)
        put.sendall(value[500:])                     # the server is draining now
        status, headers, body = read_response(put)
        self.assertEqual(status, 200, body)
        self.assertEqual(headers.get("connection", "").lower(), "close")
        self.assertTrue(wait_closed(put, 10))
        self.assertEqual(server.wait(30), 0, server.output())
        self.assertEqual(self.restart(server).get("in-flight"), value)

    def test_stalled_request_delays_shutdown_no_longer_than_the_timeout(self):
        server = self.start_server("--shutdown-timeout", "1")
        server.put("before", b"kept")
        stalled = start_put(server, "stalled", 100, b"x" * 50)
        self.addCleanup(stalled.close)
        code, seconds = stop_within(server, timeout=30)
        self.assertEqual(code, 0, server.output())
        self.assertGreaterEqual(seconds, 0.9, "shutdown did not wait for the request in flight")
        self.assertLess(seconds, 1 + 8, "shutdown waited far longer than --shutdown-timeout")
        again = self.restart(server)
        self.assertEqual(again.get("before"), b"kept")
        self.assertIsNone(again.get("stalled"))

    def start_blockable(self, *args):
        """A server whose final save block_save() can hold (FaultyFsyncServer)."""
        server = FaultyFsyncServer(self.data_dir, *args)
        self.addCleanup(server.__exit__, None, None, None)
        return server.start()

    def block_save(self, server):
        """Make the next snapshot save block until unblock_save(), then fail.

        Every fsync waits, and then fails with EIO: the save's first fsync
        (the journal's last round, then the temporary snapshot's) holds it.
        """
        server.hold_fsync()
        server.fail_fsync()

    def unblock_save(self, server):
        """Let the blocked save go on (it fails); return the exit code."""
        server.release_fsync()
        try:
            return server.wait(30)
        finally:
            server.heal_fsync()

    def test_write_after_the_seal_gets_503(self):
        # The drain gives up on `late` (stalled mid-body) at the timeout, then seals.
        server = self.start_blockable("--shutdown-timeout", "0.3")
        server.put("before", b"kept")
        late = start_put(server, "late", 10, b"12345")
        self.addCleanup(late.close)
        self.block_save(server)
        server.signal(signal.SIGTERM)
        server.wait_for_line(FLUSHING, 30)           # logged after the store is sealed
        late.sendall(b"67890")
        status, headers, body = read_response(late)
        self.assertEqual((status, body), (503, b"shutting down\n"), server.output())
        self.assertEqual(headers.get("connection", "").lower(), "close")
        self.assertTrue(wait_closed(late, 10))
        self.assertEqual(self.unblock_save(server), 1, server.output())
        again = self.restart(server)
        self.assertEqual(again.get("before"), b"kept")
        self.assertIsNone(again.get("late"), "a write refused with 503 was applied")

    def test_failed_save_exits_1_and_keeps_the_previous_snapshot(self):
        server = self.start_server()
        server.put("a", b"1")
        server.put("b", b"2")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        previous = file_state(self.sub_dir(SNAPSHOT))
        server = self.start_blockable(*server.args)
        server.put("c", b"3")
        self.assertEqual(server.request("DELETE", "/kv/a")[0], 200)
        self.block_save(server)
        server.signal(signal.SIGTERM)
        server.wait_for_line(FLUSHING, 30)
        self.assertEqual(self.unblock_save(server), 1, server.output())
        self.assertNotIn(TRACEBACK, server.output())
        snapshot = os.path.realpath(self.sub_dir(SNAPSHOT))
        complaints = [l for l in server.output().splitlines()
                      if snapshot in l and not FLUSHING.search(l) and "Loaded" not in l]
        self.assertEqual(len(complaints), 1, server.output())
        self.assertEqual(file_state(self.sub_dir(SNAPSHOT)), previous)
        self.assertTrue(journals(self.data_dir), "the journal was dropped after a failed save")
        again = self.restart(server)
        self.assertEqual((again.get("a"), again.get("b"), again.get("c")), (None, b"2", b"3"))

    @unittest.skipUnless(shutil.which("nohup"), "needs nohup")
    def test_sighup_ignored_at_start_stays_ignored(self):
        server = NohupServer(self.data_dir)
        self.addCleanup(server.__exit__, None, None, None)
        server.start()
        server.put("before", b"1")
        # A SIGHUP that is ignored is dropped when sent; one that is handled
        # would be delivered before the SIGTERM (lower numbers first).
        server.signal(signal.SIGHUP)
        server.put("after", b"2")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        self.assertNotIn("SIGHUP", server.output())
        self.assertIn("Received SIGTERM, shutting down", server.output())
        again = self.restart(server)
        self.assertEqual((again.get("before"), again.get("after")), (b"1", b"2"))

    def test_shutdown_says_what_it_waits_for_and_a_second_signal_changes_nothing(self):
        server = self.start_server("--shutdown-timeout", "30")
        server.put("k", b"v")
        value = b"y" * 64
        put = start_put(server, "in-flight", len(value), value[:10])
        self.addCleanup(put.close)
        server.signal(signal.SIGTERM)
        waiting = server.wait_for_line(
            r"Waiting up to (\d+\.\d) s \(--shutdown-timeout\) for 1 connection", 20)
        self.assertTrue(20 < float(waiting.group(1)) <= 30, waiting.group(0))
        server.signal(signal.SIGINT)                 # both land while draining
        server.signal(signal.SIGTERM)
        server.wait_for_line(r"Received SIG(INT|TERM): already shutting down", 20)
        put.sendall(value[10:])
        status, _, body = read_response(put)
        self.assertEqual(status, 200, body)
        self.assertEqual(server.wait(30), 0, server.output())
        self.assertEqual(len(FLUSHING.findall(server.output())), 1, server.output())
        again = self.restart(server)
        self.assertEqual((again.get("k"), again.get("in-flight")), (b"v", value))

    def test_signal_storm_during_shutdown(self):
        server = self.start_server()
        expected = {"storm-%d" % i: b"v%d" % i for i in range(50)}
        for key, value in expected.items():
            server.put(key, value)
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        sent = 0
        while server.proc.poll() is None and time.monotonic() < deadline and sent < 5000:
            try:
                server.signal((signal.SIGINT, signal.SIGTERM)[sent % 2])
            except ProcessLookupError:
                break
            sent += 1
        code, _ = stop_within(server, timeout=max(1, deadline - time.monotonic()))
        self.assertEqual(code, 0, server.output()[-2000:])
        again = self.restart(server)
        self.assertEqual(get_many(again, expected), expected)


# ------------------------------------------------- failures of the process --

class NohupServer(support.ServerProcess):
    """The server started under nohup: SIGHUP ignored from the start."""

    def command(self):
        return ["nohup"] + super().command()


def with_closed_fds(redirections, *args):
    """A command that runs server.py ARGS with the shell's `redirections` (e.g. `>&-`: closed)."""
    return (["sh", "-c", 'exec "$@" ' + redirections, "sh", sys.executable, support.SERVER]
            + list(args))


OLD_PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[6-9].*/bin/python3")))


class ProcessFailureTest(LifecycleTestCase):

    def test_closed_stdout_stops_neither_the_server_nor_its_shutdown(self):
        # As `./run.sh | head -2`: the reader of the log goes away.
        server = support.ServerProcess(self.data_dir, "--access-log")    # started by hand:
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(server.command(), cwd=support.ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=stderr,
                                    start_new_session=True)
            self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
            hung = threading.Timer(support.START_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
            hung.start()                    # a server that never listens ends the loop
            match = None
            for line in proc.stdout:
                match = support.LISTENING.search(line.decode())
                if match:
                    break
            hung.cancel()
            self.assertIsNotNone(match, "the server did not listen")
            proc.stdout.close()             # from now on every log line fails (EPIPE)
            server.proc, server.port = proc, int(match.group(2))
            for i in range(3):              # each logs a line (--access-log)
                server.put("k%d" % i, b"v%d" % i)
            self.assertEqual(server.get("k0"), b"v0")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                self.fail("SIGTERM was ignored once stdout was closed")
            stderr.seek(0)
            errors = stderr.read().decode("utf-8", "replace")
        self.assertEqual(code, 0, errors)
        self.assertNotIn(TRACEBACK, errors)
        again = self.start_server()
        self.assertEqual([again.get("k%d" % i) for i in range(3)], [b"v0", b"v1", b"v2"])

    def test_stdout_and_stderr_closed_at_start(self):
        # Log lines must not land in whatever file gets fd 1 or 2 (a journal).
        port = support.free_port()
        proc = subprocess.Popen(
            with_closed_fds(">&- 2>&-", "--host", "127.0.0.1", "--port", str(port),
                            "--working-dir", self.data_dir, "--access-log"),
            cwd=support.ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
        server = support.ServerProcess(self.data_dir)
        server.port = port

        def serving():
            self.assertIsNone(proc.poll(), "the server exited with %s" % proc.poll())
            try:
                return server.request("GET", "/health", timeout=5)[0] == 200
            except OSError:
                return False
        support.wait_until(serving, support.START_TIMEOUT, 0.05, "the server to listen")
        server.put("k", b"v")
        server.put("k2", b"v2")
        for name in os.listdir(self.data_dir):
            with open(self.sub_dir(name), "rb") as f:
                self.assertNotIn(b"/kv/k", f.read(), "a log line went into %s" % name)
        os.killpg(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0)
        again = self.start_server()
        self.assertEqual((again.get("k"), again.get("k2")), (b"v", b"v2"))
        self.assertEqual(stop_within(again)[0], 0, again.output())
        # Nor may the one line of a refusal, with stdin closed too.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            proc = subprocess.Popen(
                with_closed_fds("<&- >&- 2>&-", "--host", "127.0.0.1",
                                "--port", str(taken.getsockname()[1]),
                                "--working-dir", self.data_dir),
                cwd=support.ROOT, start_new_session=True)
            self.assertEqual(proc.wait(20), 1)
        for name in os.listdir(self.data_dir):
            with open(self.sub_dir(name), "rb") as f:
                self.assertNotIn(b"cannot listen", f.read(), "the error went into %s" % name)

    def hold_lock(self):
        """Take the data directory's lock as a server that is still dying would; return the fd."""
        fd = os.open(self.sub_dir("LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def test_start_waits_for_a_server_that_is_still_dying(self):
        with self.start_server() as first:
            first.put("k", b"v")
            self.assertEqual(stop_within(first)[0], 0, first.output())
        fd = self.hold_lock()
        server = support.ServerProcess(self.data_dir, "--lock-wait", "30")
        self.addCleanup(server.__exit__, None, None, None)
        server.start(wait=False)
        server.wait_for_line(r"is in use by another process; waiting up to 30 s", 20)
        fcntl.flock(fd, fcntl.LOCK_UN)                 # the old server is gone
        server.port = int(server.wait_for_line(support.LISTENING).group(2))
        self.assertEqual(server.get("k"), b"v")

    def test_signal_ends_the_wait_for_the_lock(self):
        self.hold_lock()
        server = support.ServerProcess(self.data_dir, "--lock-wait", "60")
        self.addCleanup(server.__exit__, None, None, None)
        server.start(wait=False)
        server.wait_for_line(r"waiting up to 60 s", 20)
        code, seconds = stop_within(server, timeout=20)
        self.assertEqual(code, 0, server.output())
        self.assertIn("Received SIGTERM while waiting", server.output())

    def test_lock_held_past_the_wait_exits_1(self):
        self.hold_lock()
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.data_dir,
                          "--lock-wait", "1"])
        self.assertEqual(result.code, 1, result)
        self.assert_one_line(result, contains=[os.path.realpath(self.data_dir), "in use",
                                               "waited 1 s"])
        self.assertGreaterEqual(result.seconds, 1, result)
        self.assertIn("waiting up to 1 s", result.stdout)

    def test_server_py_parses_as_python_3_7(self):
        # So that an old Python reaches the version check (compiled first).
        with open(support.SERVER, encoding="utf-8") as f:
            source = f.read()
        try:
            ast.parse(source, support.SERVER, feature_version=(3, 7))
        except SyntaxError as e:
            self.fail("server.py needs a newer Python to parse (line %s: %s): older ones "
                      "would not reach the version check" % (e.lineno, e.msg))

    @unittest.skipUnless(OLD_PYTHONS, "no Python 3.6 to 3.9 under ~/.pyenv/versions")
    def test_python_older_than_3_10_exits_2_with_one_line(self):
        for python in OLD_PYTHONS:
            with self.subTest(python=python):
                proc = subprocess.run(
                    [python, support.SERVER, "--host", "127.0.0.1", "--port", "0",
                     "--working-dir", self.data_dir],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
                result = Completed(proc.returncode, proc.stdout.decode(), proc.stderr.decode(),
                                   0.0)
                self.assertEqual(result.code, 2, result)
                self.assert_one_line(result, contains=["3.10"])
                self.assertEqual(result.stdout, "")
        self.assertEqual(os.listdir(self.data_dir), [], "an old Python touched the data")


# ------------------------------------------------------------ under load --

class ShutdownUnderLoadTest(LifecycleTestCase):

    def test_every_write_acknowledged_during_sigterm_is_saved(self):
        server = self.start_server()
        acked, refused, unexpected = {}, set(), []
        lock = threading.Lock()
        stop = threading.Event()

        def writer(t, keep_alive):
            conn, n = None, 0
            while not stop.is_set():
                key, value = "w%d-%d" % (t, n), b"value-%d-%d-" % (t, n) * 8
                n += 1
                try:
                    if conn is None:
                        conn = server.connection(10)
                    conn.request("PUT", "/kv/" + key, value)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.will_close or not keep_alive:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException):
                    if conn is not None:
                        conn.close()
                        conn = None
                    if server.proc.poll() is not None:
                        return                      # the server is gone: done
                    continue                        # outcome unknown: no claim on it
                with lock:
                    if resp.status == 200:
                        acked[key] = value
                    elif resp.status == 503:
                        refused.add(key)
                    else:
                        unexpected.append((key, resp.status))

        threads = [threading.Thread(target=writer, args=(t, t % 2 == 0)) for t in range(6)]
        for t in threads:
            t.start()
        try:
            support.wait_until(lambda: len(acked) >= 1000, 60, message="1000 acknowledged writes")
            at_signal = len(acked)
            code, _ = stop_within(server, timeout=40)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        self.assertEqual(code, 0, server.output())
        self.assertEqual(unexpected, [])
        again = self.restart(server)
        state = get_many(again, list(acked) + sorted(refused))
        missing = [k for k, v in acked.items() if state[k] != v]
        self.assertEqual(missing, [], "%d of %d acknowledged writes lost (%d at SIGTERM)"
                         % (len(missing), len(acked), at_signal))
        self.assertEqual([k for k in refused if state[k] is not None], [],
                         "writes answered 503 were applied")

    def test_burst_of_10000_then_sigterm_keeps_every_key(self):
        server = self.start_server()
        n = 10000
        result = burst(server.host, server.port, n=n, timeout=60.0)
        self.assertEqual((result["answered"], result["ok"]), (n, n),
                         "burst: %r" % {k: v for k, v in result.items() if k != "latencies"})
        code, _ = stop_within(server, timeout=60)
        self.assertEqual(code, 0, server.output())
        again = self.restart(server)
        state = get_many(again, ["burst-%d" % i for i in range(n)])
        wrong = [i for i in range(n) if state["burst-%d" % i] != b"value-%d" % i]
        self.assertEqual(len(wrong), 0, "e.g. burst-%s" % wrong[:5])


if __name__ == "__main__":
    unittest.main()
