"""In-process tests of server.Connection, for what cannot be seen from outside: when replies go out.

The server runs on a real asyncio loop with a real store and journal, but
its connections are fed bytes directly and write to recording transports,
so that a test can look between two steps of the loop.
"""
import asyncio
import shutil
import sys
import tempfile
import unittest

from tests import support

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402
import server                                        # noqa: E402
import store as store_module                         # noqa: E402


class RecordingTransport(asyncio.Transport):
    """Records each write as (name, bytes) in a list shared by all connections."""

    def __init__(self, name, writes):
        super().__init__()
        self.name, self.writes, self.closing = name, writes, False

    def write(self, data):
        self.writes.append((self.name, bytes(data)))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def get_write_buffer_size(self):
        return 0

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    abort = close


class ReplyTimingTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kv-connection-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def run_on_server(self, scenario):
        """Run `scenario(server, connect)` on a server; connect(name) opens a connection."""
        async def main():
            loop = asyncio.get_running_loop()
            data, generation, _ = persistence.load(self.dir, lambda line: None)
            journal = persistence.Journal(self.dir, generation, "always", loop)
            try:
                store = store_module.Store(data, journal, 1 << 40, lambda line: None)
                kv = server.Server(loop, store, server.Limits(), server.Metrics())
                writes = []

                def connect(name):
                    connection = server.Connection(kv)
                    connection.connection_made(RecordingTransport(name, writes))
                    return connection
                await scenario(kv, connect, writes)
            finally:
                await loop.run_in_executor(None, journal.close)     # as the server stops
        asyncio.run(main())

    def test_the_replies_of_a_turn_go_out_together_after_every_connection_was_served(self):
        # One write per reply, between the connections' requests, woke the
        # client once per reply: GET throughput at 64 connections halved.
        async def scenario(kv, connect, writes):
            a, b = connect("a"), connect("b")
            a.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            b.data_received(b"GET /kv/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(writes, [], "a reply went out before the turn ended")
            await asyncio.sleep(0)
            self.assertEqual([name for name, _ in writes], ["a", "b"])
            self.assertTrue(writes[0][1].startswith(b"HTTP/1.1 200 OK\r\n"))
            replies = writes[1][1]      # b's two, in order, in one write
            self.assertTrue(replies.startswith(b"HTTP/1.1 404 Not Found\r\n"))
            self.assertEqual(replies.count(b"HTTP/1.1 "), 2)
            self.assertTrue(replies.endswith(b"\r\n\r\nok\n"))
        self.run_on_server(scenario)

    def test_a_half_closed_connection_gets_its_replies_then_is_closed(self):
        async def scenario(kv, connect, writes):
            a = connect("a")
            a.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            a.eof_received()
            await asyncio.sleep(0)
            self.assertEqual(len(writes), 1)
            self.assertEqual(writes[0][1].count(b"HTTP/1.1 200 OK\r\n"), 2)
            self.assertTrue(writes[0][1].endswith(b"\r\n\r\nok\n"))
            self.assertTrue(a.transport.is_closing())
        self.run_on_server(scenario)


if __name__ == "__main__":
    unittest.main()
