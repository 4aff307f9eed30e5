"""Black-box tests of GET /export?prefix=P: NDJSON of the keys, sorted, from one consistent cut.

An export holds every write acknowledged before it began and no batch in
part; it is a valid body for POST /batch, which is how a store is copied.
Like a backup it is streamed by a thread, bounded (one at a time, 503 +
Retry-After past it) and cut off when its client stops reading.
"""
import base64
import http.client
import json
import socket
import threading
import time

from tests import support
from tests.test_batch import body, line
from tests.test_http_api import SharedServerTestCase
from tests.test_listing import put_many

NDJSON = "application/x-ndjson"


def export(server, target="/export", headers=None):
    """The lines of a 200 export, parsed: [{"key": K, "value": bytes, ...}]."""
    status, reply_headers, data = server.request("GET", target, None, headers)
    assert status == 200, (status, data)
    assert reply_headers["Content-Type"] == NDJSON, reply_headers["Content-Type"]
    assert data == b"" or data.endswith(b"\n"), data[-100:]
    lines = [json.loads(raw) for raw in data.splitlines()]
    for fields in lines:
        fields["value"] = base64.b64decode(fields["value"], validate=True)
    return lines


class ExportTests(SharedServerTestCase):

    def test_the_keys_under_the_prefix_sorted_with_their_values_in_base64(self):
        k = self.key("/")
        values = {k + "b/2": bytes(range(256)), k + "a": b"text\n", k + "b/1": b"\x00",
                  k + "c:x_y-z.w": b"v" * 5000}
        for key, value in values.items():
            self.server.put(key, value)
        self.server.put(self.key("-outside"), b"x")
        got = export(self.server, "/export?prefix=" + k)
        self.assertEqual([fields["key"] for fields in got], sorted(values))
        self.assertEqual({fields["key"]: fields["value"] for fields in got}, values)
        self.assertTrue(all(set(fields) == {"key", "value"} for fields in got), got)
        self.assertEqual(export(self.server, "/export?prefix=" + k + "b/"),
                         [{"key": k + "b/1", "value": b"\x00"},
                          {"key": k + "b/2", "value": bytes(range(256))}])
        self.assertEqual(export(self.server, "/export?prefix=" + k + "nothing"), [])
        everything = [fields["key"] for fields in export(self.server)]
        self.assertEqual(everything, sorted(everything))
        self.assertLessEqual(set(values) | {self.SENTINEL_KEY}, set(everything))

    def test_a_key_with_a_ttl_carries_the_seconds_left_and_an_expired_one_is_left_out(self):
        k = self.key("/")
        status, _, reply = self.server.request("POST", "/batch", body(
            line(k + "hour", b"h", ttl=3600), line(k + "second", b"s", ttl=1),
            line(k + "forever", b"f")))
        self.assertEqual(status, 200, reply)
        got = {fields["key"]: fields for fields in export(self.server, "/export?prefix=" + k)}
        self.assertEqual(got[k + "hour"]["ttl"], 3600)       # rounded up: not 3599
        self.assertIn(got.get(k + "second", {"ttl": 1})["ttl"], (1,))
        self.assertNotIn("ttl", got[k + "forever"])
        support.wait_until(lambda: k + "second" not in {
            fields["key"] for fields in export(self.server, "/export?prefix=" + k)}, 10,
            message="the key with a ttl of 1 s to leave the export")
        self.assertIsNone(self.server.get(k + "second"))

    def test_bad_requests(self):
        self.assertError("GET", "/export?prefix=a%20b", 400,
                         "prefix contains invalid characters\n")
        self.assertError("GET", "/export?limit=5", 400, "unknown parameter (known: prefix)\n")
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            with self.subTest(method=method):
                headers = self.assertError(method, "/export", 405, "method not allowed\n")
                self.assertEqual(headers.get_all("Allow"), ["GET"])

    def test_keep_alive_after_an_export_and_http_1_0(self):
        k = self.key("/")
        self.server.put(k + "a", b"1")
        conn = self.server.connection()
        self.addCleanup(conn.close)
        for _ in range(2):
            conn.request("GET", "/export?prefix=" + k)
            response = conn.getresponse()
            self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
            self.assertEqual(response.read(), b'{"key": "%sa", "value": "MQ=="}\n' % k.encode())
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().read(), b"ok\n")
        reply = self.server.raw(b"GET /export?prefix=%s HTTP/1.0\r\n\r\n" % k.encode())
        head, _, rest = reply.partition(b"\r\n\r\n")
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(rest, b'{"key": "%sa", "value": "MQ=="}\n' % k.encode())

    def test_an_export_is_a_batch_that_copies_the_store(self):
        k = self.key("/")
        values = {k + "%03d" % i: bytes([i]) * (i + 1) for i in range(200)}
        put_many(self.server, [k + "x"])
        for key, value in values.items():
            self.server.put(key, value)
        status, _, reply = self.server.request("POST", "/batch", body(
            line(k + "ttl", b"t", ttl=600)))
        self.assertEqual(status, 200, reply)
        status, _, dump = self.server.request("GET", "/export?prefix=" + k)
        self.assertEqual(status, 200)
        target = self.start_other_server()
        status, _, reply = target.request("POST", "/batch", dump)
        self.assertEqual((status, json.loads(reply)["applied"]), (200, 202))
        # The seconds left are read at two moments: they may differ by one.
        copied, source = export(target), export(self.server, "/export?prefix=" + k)
        ttls = [fields.pop("ttl") for fields in copied + source if "ttl" in fields]
        self.assertEqual(copied, source)
        self.assertEqual(len(ttls), 2)
        self.assertTrue(all(590 <= ttl <= 600 for ttl in ttls), ttls)

    def start_other_server(self):
        other = support.ServerProcess(self.server.data_dir + "-copy")
        self.addCleanup(support.shutil.rmtree, other.data_dir, True)
        self.addCleanup(other.__exit__, None, None, None)
        return other.start()


class ExportCutTest(support.ServerTestCase):

    def test_an_export_while_clients_write_is_a_consistent_cut(self):
        # Writers replace a group of 500 keys in one batch, generation after
        # generation, and PUT a counter one by one.  Every export must show
        # one generation for the whole group (no batch in part), at least
        # the one acknowledged before it began, and a counter at least as
        # far as acknowledged then.
        server = self.start_server()
        group = ["group/%03d" % i for i in range(500)]
        acked = {"generation": -1, "counter": -1}
        stop, errors = threading.Event(), []

        def batches():
            conn, generation = server.connection(), 0
            self.addCleanup(conn.close)
            while not stop.is_set():
                data = body(*(line(key, b"%d" % generation) for key in group))
                conn.request("POST", "/batch", data)
                response = conn.getresponse()
                if (response.status, response.read()[:1]) != (200, b"{"):
                    errors.append(response.status)
                    return
                acked["generation"], generation = generation, generation + 1

        def counter():
            conn, n = server.connection(), 0
            self.addCleanup(conn.close)
            while not stop.is_set():
                conn.request("PUT", "/kv/counter", b"%d" % n)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(response.status)
                    return
                acked["counter"], n = n, n + 1

        threads = [threading.Thread(target=batches), threading.Thread(target=counter)]
        for thread in threads:
            thread.start()
        try:
            # Both writers under way: an export before the first counter was
            # acknowledged may have no counter at all.
            support.wait_until(lambda: acked["generation"] >= 1 and acked["counter"] >= 0, 30,
                               message="a first batch and a first counter")
            exports = 0
            while exports < 15 or acked["generation"] < 5:
                before = dict(acked)
                got = {fields["key"]: fields["value"] for fields in export(server)}
                generations = {got.get(key) for key in group}
                self.assertEqual(len(generations), 1, "a batch seen in part: %s"
                                 % sorted(generations, key=repr)[:5])
                self.assertGreaterEqual(int(generations.pop()), before["generation"])
                self.assertGreaterEqual(int(got["counter"]), before["counter"])
                exports += 1
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual(errors, [])


class ExportBoundsTest(support.ServerTestCase):

    def fill(self, server):
        """About 8 MiB of export: more than the socket buffers hold."""
        value = b"v" * 4096
        for start in range(0, 1500, 500):
            data = body(*(line("key-%04d" % i, value) for i in range(start, start + 500)))
            self.assertEqual(server.request("POST", "/batch", data)[0], 200)

    def test_one_export_at_a_time_and_a_reader_that_stops_is_cut_off(self):
        server = self.start_server("--send-timeout", "2")
        self.fill(server)
        stalled = socket.create_connection((server.host, server.port), timeout=30)
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /export HTTP/1.1\r\nHost: t\r\n\r\n")
        started = time.monotonic()
        # The slot is taken while the first export waits for its reader.
        status, headers, reply = support.wait_until(
            lambda: (lambda r: r[0] == 503 and r)(server.request("GET", "/export")), 10,
            message="a 503 for a second export")
        self.assertEqual(reply, b"an export is already being sent; retry later\n")
        self.assertEqual(headers["Retry-After"], "5")
        # A snapshot has a slot of its own, and the others are served.
        self.assertEqual(server.request("GET", "/snapshot")[0], 200)
        self.assertEqual(server.request("GET", "/kv/key-0001")[0], 200)
        server.wait_for_line(r"Export to 127\.0\.0\.1 cut off after \d+ bytes: nothing taken "
                             r"for 2 s \(--send-timeout\)", 30)
        self.assertGreater(time.monotonic() - started, 1.5)
        self.assertEqual(len(export(server)), 1500)

    def test_a_client_that_goes_away_frees_the_slot(self):
        server = self.start_server()
        self.fill(server)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("GET", "/export")
        response = conn.getresponse()
        response.read(1000)
        conn.close()
        support.wait_until(lambda: server.request("GET", "/export")[0] == 200, 30,
                           message="the slot of an export whose client left")
