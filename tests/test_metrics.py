"""Black-box tests of GET /metrics: the Prometheus text format (0.0.4), and values that move.

`parse()` is a small strict reader of the format: it fails the test on any
line it does not understand, so that what it accepts, Prometheus does too.
PromtoolTest also gives the output to Prometheus's own checker.
Families are named kvstore_..., but for the standard process_ ones, which
keep the names Prometheus's client libraries give them.
"""
import collections
import http.client
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TIMEOUT = 30
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(r"(%s)(?:\{(.*)\})? (\S+)\Z" % NAME)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
HELP_OR_TYPE = re.compile(r"# (HELP|TYPE) (%s) (.*)\Z" % NAME)
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
PROCESS = {"process_cpu_seconds_total": "counter", "process_open_fds": "gauge",
           "process_max_fds": "gauge", "process_resident_memory_bytes": "gauge",
           "process_virtual_memory_bytes": "gauge", "process_start_time_seconds": "gauge"}


def parse_labels(text):
    labels, pos = {}, 0
    while pos < len(text):
        match = LABEL.match(text, pos)
        if not match:
            raise AssertionError("bad labels: {%s}" % text)
        name, value = match.group(1), match.group(2)
        if name in labels:
            raise AssertionError("label %s twice in {%s}" % (name, text))
        labels[name] = value
        pos = match.end()
    return labels


def parse(text):
    """{family: {"type", "help", "samples": {(name, frozenset(labels)): value}}}; strict."""
    if not text.endswith("\n"):
        raise AssertionError("the last line does not end with a newline")
    families, current = {}, None
    for line in text[:-1].split("\n"):
        meta = HELP_OR_TYPE.match(line)
        if meta:
            kind, name, rest = meta.groups()
            family = families.setdefault(name, {"samples": {}})
            if kind.lower() in family:
                raise AssertionError("a second %s for %s" % (kind, name))
            if family["samples"]:
                raise AssertionError("%s of %s after its samples" % (kind, name))
            family[kind.lower()] = rest
            current = name
            continue
        match = SAMPLE.match(line)
        if not match:
            raise AssertionError("not a sample line: %r" % line)
        name, labels, value = match.group(1), parse_labels(match.group(2) or ""), match.group(3)
        family = families.get(current)
        if family is None or "type" not in family or "help" not in family:
            raise AssertionError("%s has no HELP and TYPE before it" % name)
        if name not in [current + suffix for suffix in SUFFIXES[family["type"]]]:
            raise AssertionError("sample %s inside the family %s" % (name, current))
        key = (name, frozenset(labels.items()))
        if key in family["samples"]:
            raise AssertionError("series %s%s twice" % (name, labels))
        family["samples"][key] = float(value)           # "+Inf", "1e-05" too
    for name, family in families.items():
        if not name.startswith("kvstore_") and name not in PROCESS:
            raise AssertionError("%s lacks the kvstore_ prefix" % name)
        if family.get("type") not in SUFFIXES:
            raise AssertionError("%s has type %s" % (name, family.get("type")))
        if family["type"] == "counter":
            if not name.endswith("_total"):
                raise AssertionError("counter %s does not end in _total" % name)
            if any(v < 0 for v in family["samples"].values()):
                raise AssertionError("counter %s is negative" % name)
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name, samples):
    """Buckets cumulative and ending at +Inf; +Inf == _count; every series has _sum and _count."""
    series = {}
    for (sample, labels), value in samples.items():
        labels = dict(labels)
        le = labels.pop("le", None)
        entry = series.setdefault(frozenset(labels.items()), {"buckets": []})
        if sample.endswith("_bucket"):
            if le is None:
                raise AssertionError("%s bucket without le" % name)
            entry["buckets"].append((float(le), value))
        else:
            entry[sample[len(name):]] = value
    for labels, entry in series.items():
        buckets = sorted(entry["buckets"])
        if not buckets or buckets[-1][0] != math.inf:
            raise AssertionError("%s%s has no +Inf bucket" % (name, dict(labels)))
        counts = [count for _, count in buckets]
        if counts != sorted(counts):
            raise AssertionError("%s%s buckets are not cumulative: %s" % (name, dict(labels),
                                                                         buckets))
        if "_count" not in entry or "_sum" not in entry:
            raise AssertionError("%s%s lacks _sum or _count" % (name, dict(labels)))
        if counts[-1] != entry["_count"]:
            raise AssertionError("%s%s: +Inf bucket %s != _count %s"
                                 % (name, dict(labels), counts[-1], entry["_count"]))


class Scrape:
    """One parsed /metrics; value(name, **labels) of one series (0 if absent)."""

    def __init__(self, server):
        status, headers, body = server.request("GET", "/metrics")
        assert status == 200, (status, body)
        assert headers.get("Content-Type") == CONTENT_TYPE, headers.get("Content-Type")
        self.text = body.decode("utf-8")
        self.families = parse(self.text)

    def value(self, name, **labels):
        for family in self.families.values():
            value = family["samples"].get((name, frozenset(labels.items())))
            if value is not None:
                return value
        return 0


class MetricsTest(support.ServerTestCase):

    def test_the_format_is_strict_prometheus_text(self):
        server = self.start_server()
        server.put("k", b"v")
        scrape = Scrape(server)
        for name, kind in [("kvstore_keys", "gauge"), ("kvstore_requests_total", "counter"),
                           ("kvstore_connections", "gauge"),
                           ("kvstore_journal_fsyncs_total", "counter"),
                           ("kvstore_storage_writable", "gauge"),
                           ("kvstore_request_duration_seconds", "histogram"),
                           ("kvstore_value_bytes", "gauge"), ("kvstore_journal_bytes", "gauge"),
                           ("kvstore_journal_fsync_seconds_total", "counter"),
                           ("kvstore_journal_fsync_duration_seconds", "histogram"),
                           ("kvstore_checkpoints_total", "counter"),
                           ("kvstore_checkpoint_failures_total", "counter"),
                           ("kvstore_last_checkpoint_timestamp_seconds", "gauge"),
                           ("kvstore_build_info", "gauge")] + sorted(PROCESS.items()):
            with self.subTest(name):
                self.assertEqual(scrape.families[name]["type"], kind)
        self.assertEqual(scrape.value("kvstore_storage_writable"), 1)
        status, headers, body = server.request("HEAD", "/metrics")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers["Content-Type"], CONTENT_TYPE)
        self.assertEqual(server.request("PUT", "/metrics", b"x")[0], 405)

    def test_the_parser_refuses_what_prometheus_would(self):
        good = "# HELP kvstore_x_total X.\n# TYPE kvstore_x_total counter\nkvstore_x_total 1\n"
        parse(good)
        for bad in [good.replace("# HELP kvstore_x_total X.\n", ""),           # no HELP
                    good.replace("kvstore_x", "x"),                             # no prefix
                    good.replace("_total", ""),                                 # counter name
                    good.replace(" 1\n", " one\n"),                             # value
                    good.replace("total 1", 'total{a="1",a="2"} 1'),            # label twice
                    good.replace("total 1", "total{a=1} 1"),                    # unquoted
                    good + "kvstore_x_total 2\n",                               # series twice
                    good[:-1]]:                                                 # no last \n
            with self.subTest(bad=bad):
                with self.assertRaises((AssertionError, ValueError)):
                    parse(bad)
        histogram = ("# HELP kvstore_h H.\n# TYPE kvstore_h histogram\n"
                     'kvstore_h_bucket{le="1"} 2\nkvstore_h_bucket{le="+Inf"} 1\n'
                     "kvstore_h_sum 1\nkvstore_h_count 1\n")
        with self.assertRaises(AssertionError):
            parse(histogram)                                    # not cumulative
        with self.assertRaises(AssertionError):
            parse(histogram.replace('"1"} 2', '"1"} 1').replace("count 1", "count 2"))

    def test_values_move_when_requests_are_made(self):
        server = self.start_server()
        before = Scrape(server)
        for i in range(3):
            server.put("key%d" % i, b"x" * (10 + i))      # 10 + 11 + 12 bytes
        server.put("key0", b"y" * 5)                        # replaces 10 bytes by 5
        self.assertEqual(server.request("GET", "/kv/key1")[0], 200)
        self.assertEqual(server.request("GET", "/kv/absent")[0], 404)
        self.assertEqual(server.request("DELETE", "/kv/key2")[0], 200)
        self.assertEqual(server.request("POST", "/kv/key1")[0], 405)
        self.assertEqual(server.request("BREW", "/kv/key1")[0], 405)
        self.assertEqual(server.request("PUT", "/kv/%20", b"v")[0], 400)
        after = Scrape(server)

        def moved(name, **labels):
            return after.value(name, **labels) - before.value(name, **labels)

        requests = "kvstore_requests_total"
        self.assertEqual(moved(requests, method="PUT", code="200"), 4)
        self.assertEqual(moved(requests, method="GET", code="404"), 1)
        self.assertEqual(moved(requests, method="DELETE", code="200"), 1)
        self.assertEqual(moved(requests, method="POST", code="405"), 1)    # POST /batch's method
        self.assertEqual(moved(requests, method="other", code="405"), 1)   # BREW
        self.assertEqual(moved(requests, method="PUT", code="400"), 1)
        self.assertEqual(moved(requests, method="GET", code="200"), 2)     # key1, /metrics
        self.assertNotIn("BREW", after.text)
        self.assertEqual(moved("kvstore_request_duration_seconds_count", route="key",
                               method="PUT"), 5)
        self.assertGreater(moved("kvstore_request_duration_seconds_sum", route="key",
                                 method="PUT"), 0)
        self.assertEqual(after.value("kvstore_keys"), 2)
        self.assertEqual(after.value("kvstore_value_bytes"), 5 + 11)
        self.assertEqual(moved("kvstore_journal_records_total"), 5)
        self.assertGreater(moved("kvstore_journal_bytes"), 5 + 33)
        self.assertGreaterEqual(moved("kvstore_journal_fsyncs_total"), 1)
        self.assertGreater(moved("kvstore_journal_fsync_seconds_total"), 0)
        self.assertEqual(server.request("DELETE", "/clear")[0], 200)
        self.assertEqual(Scrape(server).value("kvstore_value_bytes"), 0)

    def test_latency_is_no_longer_than_the_client_waited(self):
        # After the server was idle (the stimulus, hence the sleeps), a
        # request on a new connection: the server's latency must start with
        # the request's bytes, not at the worker's last wake-up before them.
        server = self.start_server()
        before = Scrape(server)
        waited = 0.0
        for i in range(3):
            time.sleep(0.4)                 # the server idles: the stimulus, not a wait
            started = time.monotonic()
            self.assertEqual(server.request("GET", "/kv/absent")[0], 404)
            waited += time.monotonic() - started
        labels = {"route": "key", "method": "GET"}
        measured = (Scrape(server).value("kvstore_request_duration_seconds_sum", **labels)
                    - before.value("kvstore_request_duration_seconds_sum", **labels))
        self.assertLess(measured, waited + 0.05)

    def test_latency_by_route(self):
        server = self.start_server()
        server.put("k", b"v")
        requests = [("GET", "/kv/k", "key"), ("GET", "/kv/absent", "key"),
                    ("GET", "/kv?prefix=k", "listing"), ("GET", "/health", "health"),
                    ("GET", "/metrics", "metrics"), ("GET", "/snapshot", "snapshot"),
                    ("GET", "/no/such/path", "other"), ("DELETE", "/clear", "other"),
                    ("DELETE", "/kv?prefix=nothing/", "listing"), ("GET", "/export", "export"),
                    ("POST", "/batch", "batch")]
        before = Scrape(server)
        for method, path, _ in requests:
            self.assertLess(server.request(method, path)[0], 500, path)
        after = Scrape(server)
        expected = collections.Counter((route, method) for method, _, route in requests)
        expected["metrics", "GET"] += 1                 # the scrape `before`
        name = "kvstore_request_duration_seconds_count"
        for (route, method), count in expected.items():
            with self.subTest(route=route, method=method):
                self.assertEqual(after.value(name, route=route, method=method)
                                 - before.value(name, route=route, method=method), count)
        routes = {dict(labels)["route"] for (sample, labels) in
                  after.families["kvstore_request_duration_seconds"]["samples"]}
        self.assertLessEqual(routes, {"key", "listing", "health", "metrics", "snapshot",
                                      "export", "batch", "other"})

    def test_a_stream_is_counted_once_its_last_chunk_is_read(self):
        # A snapshot's or an export's thread sends the body; were the request
        # counted after its last chunk, in a later loop step, a scrape sent
        # at once on another connection would miss it (about a third of the
        # time, before the fix).
        server = self.start_server()
        server.put("k", b"v")
        name = "kvstore_request_duration_seconds_count"
        for route in ("snapshot", "export"):
            for i in range(1, 16):
                self.assertEqual(server.request("GET", "/" + route)[0], 200)
                self.assertEqual(Scrape(server).value(name, route=route, method="GET"), i,
                                 "%s %d" % (route, i))

    def test_process_metrics(self):
        started = time.time()
        server = self.start_server()
        scrape = Scrape(server)
        pid = server.proc.pid
        self.assertGreater(scrape.value("process_resident_memory_bytes"), 1 << 20)
        self.assertGreater(scrape.value("process_virtual_memory_bytes"),
                           scrape.value("process_resident_memory_bytes"))
        open_fds = scrape.value("process_open_fds")
        self.assertGreaterEqual(open_fds, 4)            # stdio, the listening socket...
        self.assertLessEqual(abs(open_fds - len(os.listdir("/proc/%d/fd" % pid))), 3)
        self.assertGreaterEqual(scrape.value("process_max_fds"), open_fds)
        # A scrape's precision (a clock tick) from when the process began.
        self.assertGreaterEqual(scrape.value("process_start_time_seconds"), started - 2)
        self.assertLessEqual(scrape.value("process_start_time_seconds"), time.time())
        self.assertGreater(scrape.value("process_cpu_seconds_total"), 0)
        self.assertEqual(Scrape(server).value("process_start_time_seconds"),
                         scrape.value("process_start_time_seconds"))

    def test_build_info_names_the_version(self):
        server = self.start_server()
        version = subprocess.run([sys.executable, support.SERVER, "--version"],
                                 capture_output=True, text=True, check=True).stdout.split()[1]
        samples = Scrape(server).families["kvstore_build_info"]["samples"]
        self.assertEqual(len(samples), 1, samples)
        (name, labels), value = next(iter(samples.items()))
        self.assertEqual((name, value), ("kvstore_build_info", 1))
        self.assertEqual(dict(labels)["version"], version)
        self.assertRegex(dict(labels)["python"], r"^3\.\d+\.\d+")

    def test_last_checkpoint_time(self):
        server = self.start_server("--checkpoint-bytes", "1000")
        self.assertEqual(Scrape(server).value("kvstore_last_checkpoint_timestamp_seconds"), 0)
        before = time.time()
        server.put("a", b"x" * 2000)
        support.wait_until(lambda: Scrape(server).value("kvstore_checkpoints_total") >= 1,
                           message="a checkpoint")
        checkpoint = Scrape(server).value("kvstore_last_checkpoint_timestamp_seconds")
        self.assertGreaterEqual(checkpoint, before - 1)
        self.assertLessEqual(checkpoint, time.time() + 1)
        self.assertEqual(server.stop(), 0)
        # The next run starts from the snapshot the clean stop wrote.
        snapshot = os.stat(os.path.join(self.data_dir, "store.pickle")).st_mtime
        again = self.restart(server)
        self.assertAlmostEqual(
            Scrape(again).value("kvstore_last_checkpoint_timestamp_seconds"), snapshot, 2)
        self.assertGreaterEqual(snapshot, checkpoint)

    def test_value_bytes_survive_a_restart(self):
        server = self.start_server()
        server.put("a", b"12345")
        server.put("b", b"678")
        self.assertEqual(server.stop(), 0)
        server = self.restart(server)
        self.assertEqual(Scrape(server).value("kvstore_value_bytes"), 8)

    def test_open_connections(self):
        server = self.start_server()
        baseline = Scrape(server).value("kvstore_connections")      # this scrape's own: 1
        self.assertEqual(baseline, 1)
        sockets = [socket.create_connection((server.host, server.port)) for _ in range(5)]
        try:
            support.wait_until(lambda: Scrape(server).value("kvstore_connections") == 6,
                               message="6 connections counted")
        finally:
            for s in sockets:
                s.close()
        support.wait_until(lambda: Scrape(server).value("kvstore_connections") == 1,
                           message="the closed connections uncounted")

    def test_connections_refused_at_the_cap_and_requests_timed_out(self):
        server = self.start_server("--max-connections", "2", "--header-timeout", "0.5")
        address = (server.host, server.port)
        with socket.create_connection(address, timeout=TIMEOUT) as slow:
            slow.sendall(b"GET /kv/")                   # and nothing more: 408 at the deadline
            self.assertIn(b" 408 ", support.read_until_quiet(slow, TIMEOUT))
        held = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(2)]
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as third:
                self.assertIn(b" 503 ", support.read_until_quiet(third, TIMEOUT))
        finally:
            for sock in held:
                sock.close()

        def scrape():
            try:
                return Scrape(server)
            except (AssertionError, OSError, http.client.HTTPException):
                return None                 # still at the cap: the held ones are closing
        after = support.wait_until(scrape, TIMEOUT, message="a scrape under the cap")
        self.assertEqual(after.families["kvstore_connections_refused_total"]["type"], "counter")
        self.assertGreaterEqual(after.value("kvstore_connections_refused_total"), 1)
        self.assertEqual(after.value("kvstore_requests_timed_out_total"), 1)

    def test_checkpoints_and_their_failures(self):
        server = self.start_server("--checkpoint-bytes", "1000")
        server.put("a", b"x" * 2000)
        support.wait_until(lambda: Scrape(server).value("kvstore_checkpoints_total") >= 1,
                           message="a checkpoint counted")
        # A directory where the checkpoint's temporary file must go: it cannot be written.
        os.mkdir(os.path.join(self.data_dir, "store.pickle.tmp"))
        server.put("b", b"x" * 2000)
        support.wait_until(lambda: Scrape(server).value("kvstore_checkpoint_failures_total") >= 1,
                           message="a failed checkpoint counted")
        self.assertEqual(Scrape(server).value("kvstore_storage_writable"), 1)


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"),
                     "needs root to mount a small tmpfs (a full disk)")
class PromtoolTest(support.ServerTestCase):
    """`promtool check metrics` (Prometheus's linter) on a scrape with every family in it."""

    def test_promtool_finds_nothing_to_say(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI"):                # it must run there: never a silent skip
                self.fail("promtool not installed: .ci/run installs it (apt-get prometheus)")
            self.skipTest("needs promtool (apt-get install prometheus)")
        server = self.start_server()
        server.put("k", b"v")
        server.request("GET", "/kv/k")
        server.request("GET", "/metrics")
        text = Scrape(server).text
        checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                 capture_output=True, timeout=60)
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.assertEqual(checked.stdout + checked.stderr, b"", "promtool has remarks")


class StorageWritableTest(support.ServerTestCase):

    def test_a_full_disk_is_storage_writable_0(self):
        mount_point = tempfile.mkdtemp(prefix="kvtest-tmpfs-")
        self.addCleanup(os.rmdir, mount_point)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount_point],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            self.skipTest("cannot mount a tmpfs: %s" % mounted.stderr.strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mount_point], check=True)
        server = self.start_server(data_dir=mount_point)
        self.assertEqual(Scrape(server).value("kvstore_storage_writable"), 1)
        try:
            with open(os.path.join(mount_point, "filler"), "wb") as f:
                while True:
                    f.write(b"f" * 4096)
                    f.flush()
        except OSError:
            pass
        status, _, _ = server.request("PUT", "/kv/k", b"v" * 65536)
        self.assertGreaterEqual(status, 500)
        self.assertEqual(Scrape(server).value("kvstore_storage_writable"), 0)


if __name__ == "__main__":
    unittest.main()
