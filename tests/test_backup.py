"""Black-box tests of GET /snapshot, the backup, and of restoring one as the README says.

A backup is the whole store at one instant, in the snapshot file's format:
it loads with persistence.load_snapshot (whose unpickler refuses every
global), and a server started on an empty directory holding it as
store.pickle serves exactly that state.
"""
import http.client
import io
import os
import socket
import threading
import time
import unittest

import persistence
from tests import support

TIMEOUT = 30


def load(test, body):
    """The dict in a backup's bytes, read as the server reads its snapshot."""
    return persistence.load_snapshot(support.temp_file(test, "backup.pickle", body))


class _Buffered:
    """A socket stand-in whose makefile() is one shared reader, so that responses can follow each other."""

    class Reader(io.BufferedReader):
        def close(self):                # http.client closes it after each response
            pass

    def __init__(self, sock):
        self.file = self.Reader(socket.SocketIO(sock, "rb"))

    def makefile(self, *args, **kwargs):
        return self.file


def read_response(buffered, method="GET"):
    response = http.client.HTTPResponse(buffered, method=method)
    response.begin()
    return response, response.read()


class SnapshotTest(support.ServerTestCase):

    def test_a_backup_taken_while_writers_run_restores_every_acknowledged_write(self):
        # State from before: enough keys that the pickling takes a while,
        # and the writers' changes would land in the middle of it.
        persistence.write_snapshot(self.data_dir, {"old-%d" % i: b"o%d" % i
                                                   for i in range(200000)})
        server = self.start_server()
        server.request("DELETE", "/kv/old-7")
        acked = [[] for _ in range(4)]      # per writer, its keys in the order acknowledged
        stop = threading.Event()
        errors = []

        def writer(n):
            conn = server.connection(TIMEOUT)
            try:
                for i in range(100000):
                    if stop.is_set():
                        return
                    key = "w%d-%d" % (n, i)
                    conn.request("PUT", "/kv/" + key, body=key.encode() * 50)
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        raise AssertionError("PUT %s: %d" % (key, response.status))
                    acked[n].append(key)
            except Exception as e:
                errors.append(e)
            finally:
                conn.close()

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(len(acked))]
        for thread in threads:
            thread.start()
        try:
            support.wait_until(lambda: all(len(keys) >= 20 for keys in acked) or errors,
                               message="every writer under way")
            before = [list(keys) for keys in acked]     # acknowledged before the backup began
            status, headers, body = server.request("GET", "/snapshot")
            during = [len(keys) for keys in acked]
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
        self.assertEqual(errors, [])
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/octet-stream")
        self.assertEqual(headers["Transfer-Encoding"], "chunked")
        backup = load(self, body)
        for n, keys in enumerate(before):
            for key in keys:
                self.assertEqual(backup.get(key), key.encode() * 50, key)
            # One instant: each writer's keys in the backup are a prefix of its writes.
            mine = sorted((int(k.split("-")[1]) for k in backup if k.startswith("w%d-" % n)))
            self.assertEqual(mine, list(range(len(mine))), "writer %d has a gap" % n)
            self.assertLessEqual(len(mine), during[n] + 1)
        self.assertEqual(sum(k.startswith("old-") for k in backup), 199999)
        self.assertNotIn("old-7", backup)

        # Restore, as the README says: an empty data directory, the backup as store.pickle.
        restored_dir = os.path.dirname(support.temp_file(self, "store.pickle", body))
        restored = self.start_server(data_dir=restored_dir)
        again = restored.request("GET", "/snapshot")[2]
        self.assertEqual(load(self, again), backup)
        for key in (before[0][0], before[3][-1], "old-0"):
            self.assertEqual(restored.get(key), backup[key])
        self.assertIsNone(restored.get("old-7"))

    def test_http_1_0_gets_the_same_bytes_until_the_connection_closes(self):
        server = self.start_server()
        server.put("a", b"1")
        server.put("b", bytes(range(256)))
        _, _, chunked = server.request("GET", "/snapshot")
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /snapshot HTTP/1.0\r\n\r\n")
            reply = support.read_until_quiet(sock, timeout=TIMEOUT, quiet=TIMEOUT)
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertNotIn(b"chunked", head)
        self.assertEqual(body, chunked)
        self.assertEqual(load(self, body), {"a": b"1", "b": bytes(range(256))})

    def test_a_backup_carries_the_snapshot_checksum(self):
        server = self.start_server()
        server.put("k", b"v")
        status, _, body = server.request("GET", "/snapshot")
        self.assertEqual(status, 200)
        backup = support.temp_file(self, "backup.pickle", body)
        self.assertEqual(persistence.check_snapshot(backup), (1, len(body), True))

    @staticmethod
    def pipelined(server, first_path, second_path):
        """Two GETs sent at once on one connection: [(response, body), (response, body)]."""
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
                                  for path in (first_path, second_path)))
            buffered = _Buffered(sock)
            return [read_response(buffered), read_response(buffered)]

    def test_a_request_pipelined_after_a_snapshot_is_answered_after_it(self):
        data = {"k%d" % i: bytes([i]) * (1 << 20) for i in range(8)}    # takes a while to send
        persistence.write_snapshot(self.data_dir, data)
        server = self.start_server()
        (first, snapshot), (second, value) = self.pipelined(server, "/snapshot", "/kv/k1")
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(load(self, snapshot), data)
        self.assertEqual(value, data["k1"])

    def test_a_request_pipelined_before_a_snapshot_is_answered_before_it(self):
        server = self.start_server()
        server.put("k", b"v")
        for _ in range(20):     # the order once depended on which thread ran first
            (first, value), (second, snapshot) = self.pipelined(server, "/kv/k", "/snapshot")
            self.assertEqual((first.status, value), (200, b"v"))
            self.assertEqual(load(self, snapshot), {"k": b"v"})

    def test_the_connection_serves_requests_after_a_snapshot(self):
        server = self.start_server()
        server.put("k", b"v")
        conn = server.connection(TIMEOUT)
        self.addCleanup(conn.close)
        for _ in range(2):
            conn.request("GET", "/snapshot")
            response = conn.getresponse()
            self.assertEqual(load(self, response.read()), {"k": b"v"})
            conn.request("GET", "/kv/k")                # a while after, on the same connection
            self.assertEqual(conn.getresponse().read(), b"v")

    def test_only_get(self):
        server = self.start_server()
        for method in ("HEAD", "PUT", "DELETE", "POST"):
            with self.subTest(method):
                status, headers, _ = server.request(method, "/snapshot", b"x" if method in
                                                    ("PUT", "POST") else None)
                self.assertEqual(status, 405)
                self.assertEqual(headers["Allow"], "GET")

    def test_a_client_that_reads_nothing_holds_the_only_slot_until_its_deadline(self):
        server = self.start_server("--send-timeout", "2")
        for i in range(12):                 # more than the socket buffers of both ends hold
            server.put("big-%d" % i, bytes([i]) * (1 << 20))
        stalled = socket.socket()
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(TIMEOUT)
        stalled.connect((server.host, server.port))
        stalled.sendall(b"GET /snapshot HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(stalled.recv(1))                    # it has begun, and stalls
        status, headers, body = server.request("GET", "/snapshot")
        self.assertEqual((status, body), (503, b"a snapshot is already being sent; retry later\n"))
        self.assertEqual(headers["Retry-After"], "5")
        # The server goes on serving meanwhile: no worker waits for that client.
        started = time.monotonic()
        self.assertEqual(server.get("big-0"), b"\0" * (1 << 20))
        self.assertEqual(server.request("GET", "/health")[0], 200)
        # A request that waited for the stalled one would take the 2 s it is
        # given; 1.5 s leaves a loaded machine room (with 1 s, the bound of
        # 0.9 s did not).
        self.assertLess(time.monotonic() - started, 1.5, "a request waited for the stalled one")
        server.wait_for_line(r"Snapshot to 127\.0\.0\.1 cut off after \d+ bytes: "
                             r"nothing taken for 2 s", TIMEOUT)
        status, _, body = server.request("GET", "/snapshot")
        self.assertEqual(status, 200)
        self.assertEqual(len(load(self, body)), 12)
        # The stalled client's connection was closed: what it got ends short.
        stalled.settimeout(TIMEOUT)
        received = 1
        while True:
            try:
                chunk = stalled.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
        self.assertLess(received, 12 << 20)


if __name__ == "__main__":
    unittest.main()
