"""HTTP front end and process lifecycle of the key-value server.

    python3 server.py [--port 8080] [--working-dir ./data] ...   (--help for all)

The server is an http.server.ThreadingHTTPServer whose threads serve
requests, not connections: the main thread accepts connections and parks
them (the kernel watches their sockets); when a connection's request
arrives, a worker thread takes a turn on it: reads the request, calls the
Store (store.py), replies, and parks the connection again.  The reply to a
write is sent by the journal's writer thread once the write is durable
(KVHandler.write).  Four changes to the stdlib's way make it hold up under
load, each explained where it is made: connections wait for their next
request without a thread, and one worker serves the turns in arrival
order (KVServer); threads that had to wait for a slow client run request
code one at a time, in arrival order (Admission); every thread runs on one
CPU (pin_to_one_cpu), and a woken thread does not preempt the running one
(no_wakeup_preemption).  The store is a dict behind one lock;
persistence.py puts it on disk.

A PUT, from the socket to the disk
----------------------------------
    KVServer._accept_queued       accepts; process_request parks the socket
    KVServer._unpark_readable     the unparker thread: the request is there,
                                  so the connection's turn is queued
    KVServer._worker              a worker takes it: KVHandler.serve_turn
    KVHandler.handle_one_request  reads the request line, enters Admission
    KVHandler.parse_request       reads the headers, with http.server's limits
    KVHandler.read_body           Content-Length or chunked, at most
                                  --max-value-bytes, 413 before reading more
    KVHandler.do_kv               validates the key, then Store.put:
    Store._mutate                 under the lock, Journal.append (queues the
                                  record) and the dict, in the same order;
                                  then Journal.when_durable(send_when_durable);
                                  the worker parks the connection, and takes
                                  the next turn
    Journal._write_rounds         the journal's writer thread: one writev of
                                  every record queued, one fsync (group
                                  commit), then each waiting write's callback:
    send_when_durable             the 200 (status, headers, body in one send)

A SIGTERM, from the signal to exit 0
------------------------------------
    signal.set_wakeup_fd the signal's number goes down a pipe; the Python
                         handler does nothing (it would interrupt the main
                         thread, which may hold a lock).
    stopper              a thread reading that pipe: logs, then calls
                         server.shutdown(), which waits for serve_forever()
                         to return, so the main thread cannot call it itself.
                         A second signal changes nothing.
    serve_forever()      returns in the main thread; no more accepts, and
                         server_close() closes the listening socket.
    KVServer.drain       closes idle keep-alive connections at once; lets
                         requests in flight finish (Connection: close), up
                         to --shutdown-timeout.
    Store.seal           any later write gets 503; the dict is frozen.
    Store.save_and_close the final snapshot, then the journals go; exit 0,
                         or exit 1 if the save failed (the journal stays).
"""

import _thread
import argparse
import collections
import email.utils
import http.server
import io
import os
import queue
import re
import resource
import select
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

import persistence
from store import Sealed, Store

# ------------------------------------------------------------------ logging --

_log_lock = threading.Lock()


def log(message):
    """One line to stdout, flushed at once (the harnesses read it live)."""
    with _log_lock:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def fail(message):
    """One line to stderr: what failed and why, never a traceback."""
    sys.stderr.write("error: %s\n" % message)
    sys.stderr.flush()


# ---------------------------------------------------------------- HTTP layer --

MAX_LINE = 65536         # request line and header lines, as in http.server
MAX_HEADERS = 100        # as in http.client / http.server
READ_BUFFER = 65536      # per connection; pipelined requests arrive together
ADMISSION_SLOTS = 1      # threads running request code at once (Admission)
KEY = re.compile(r"[A-Za-z0-9:_.\-]+")
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")   # an RFC 9110 token
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
VERSION = re.compile(r"HTTP/(\d)\.(\d)")
KNOWN_VERSIONS = {"HTTP/1.1": "1", "HTTP/1.0": "0"}     # -> minor; these need no regex
REASONS = {status: phrase.encode() for status, (phrase, _)
           in http.server.BaseHTTPRequestHandler.responses.items()}
ALLOWED = {"/kv/": "GET, HEAD, PUT, DELETE", "/clear": "DELETE", "/health": "GET, HEAD"}


class RequestError(Exception):
    """A request we answer with an error status; `close` if the stream is unusable after it."""

    def __init__(self, status, message, close=False, headers=()):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers


class ClientGone(Exception):
    """The client closed the connection in the middle of a request."""


def parse_key(raw):
    """The key named by the path after /kv/ (percent-decoded), or RequestError."""
    if "%" in raw:
        try:
            raw = urllib.parse.unquote_to_bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise RequestError(400, "key contains invalid characters")
    if not raw:
        raise RequestError(400, "key cannot be empty")
    if not KEY.fullmatch(raw):
        raise RequestError(400, "key contains invalid characters")
    return raw


def send_unblocked(sock, data, done):
    """Send `data` on `sock`, then call done(); never block the caller on a slow client.

    The usual small reply fits in the socket's buffer and goes at once.  The
    rest of one that does not is sent by a thread of its own.
    """
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    except OSError:                             # the client is gone
        sent = len(data)
    if sent == len(data):
        done()
    else:
        _thread.start_new_thread(_send_rest, (sock, memoryview(data)[sent:], done))


def _send_rest(sock, rest, done):
    try:
        sock.sendall(rest)
    except OSError:
        pass
    finally:
        done()


class _ThisSecond:
    """What changes only once per second, built once per second instead of once per reply.

    The Date header; and the 200 of a write, which differs from one to the
    next only by its Date and Connection headers (building it costs a
    microsecond, a tenth of a PUT's Python time).
    """

    def __init__(self):
        self._second = None
        self._value = b""
        self._write_ok = {}         # Connection header -> the 200 of a write

    def date_header(self):
        now = int(time.time())
        if now != self._second:
            value = email.utils.formatdate(now, usegmt=True)
            self._write_ok = {}
            self._value, self._second = ("Date: %s\r\n" % value).encode("ascii"), now
        return self._value

    def write_ok(self, connection):
        """The 200 of a write (no body), with this Connection header."""
        self.date_header()              # a new second empties the cache
        cache = self._write_ok
        reply = cache.get(connection)
        if reply is None:
            reply = cache[connection] = build_reply(200, b"", connection)
        return reply


_this_second = _ThisSecond()


def build_reply(status, body, connection, headers=(), with_body=True):
    """A whole reply as bytes: status line, headers, blank line, body.

    Pure, so the journal's writer thread may build one too: it must not
    touch the state of a handler that is already on its next request.
    """
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body), _this_second.date_header(), connection]
    for name, value in headers:
        head.append(("%s: %s\r\n" % (name, value)).encode("latin-1"))
    head.append(b"\r\n")
    if with_body:
        head.append(body)
    return b"".join(head)


class Admission:
    """At most `slots` threads run request code at once; the others wait in line.

    Most turns run on one worker, one after the other (KVServer), and never
    wait here.  But a turn that had to wait for its client keeps its thread
    (KVHandler.worker_waits), and when the client's bytes come, that thread
    wants the GIL back, as may hundreds of others like it.  The GIL is not
    fair: a thread can wait for it through many turns of the others.  (With
    a thread per connection, as this server had at first, the slowest GETs
    at 256 connections (wrk's p99) took 1.35 s where an asyncio server takes
    8 ms; 0.28 s once admission came.)  So a thread takes a slot once its
    request has arrived and gives it back when the reply is on its way.
    Waiting for a slot is waiting on a lock of one's own, not on the GIL,
    and slots are handed over in arrival order.

    A thread gives its slot up whenever it would block: while it waits for
    more of a request from a slow client, and while it waits for a client
    to read its reply (send_all).  Parked connections hold no slot, and
    neither does a write waiting for its fsync: the journal's writer thread
    sends its reply (KVHandler.write).

    The server uses one slot (ADMISSION_SLOTS).  With a thread per
    connection, two slots let the tail spike: wrk, GET at 256 connections,
    p99 over 100 ms (up to 349 ms) in 7 runs of 22; one gave 15-24 ms in 10
    of 10, and no lower throughput there.
    """

    def __init__(self, slots):
        self._lock = threading.Lock()
        self._slots = slots
        self._active = 0                        # threads holding a slot
        self._waiting = collections.deque()    # one locked Lock per waiting thread

    def enter(self):
        with self._lock:
            if self._active < self._slots:
                self._active += 1
                turn = None
            else:
                turn = threading.Lock()
                turn.acquire()
                self._waiting.append(turn)
        if turn is not None:
            turn.acquire()          # until leave() hands this slot over

    def leave(self):
        """Give the slot to the longest waiter, or back to the pool if none waits."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()   # the slot changes hands
            else:
                self._active -= 1


class _AdmittedReader(socket.SocketIO):
    """A connection's socket reader, and its place in Admission.

    `holding` says whether the connection holds a slot.  A recv() that
    would block first calls `before_wait` (the worker lets another take its
    place) and gives the slot up until data comes.  While `peeking`, it
    never waits: it reports "nothing yet" instead.
    """

    def __init__(self, sock, admission, before_wait):
        super().__init__(sock, "rb")
        self._admission = admission
        self._before_wait = before_wait     # called before a recv that would block
        self.holding = False
        self.peeking = False                # never wait: return None instead

    def enter(self):
        self._admission.enter()
        self.holding = True

    def leave(self):
        """Give the slot up, if held."""
        if self.holding:
            self.holding = False
            self._admission.leave()

    def readinto(self, buffer):
        # recv_into directly, not SocketIO.readinto: its checks cost a
        # Python call per read, and our sockets have no timeout to handle.
        if self.peeking:
            return None             # "nothing yet", to BufferedReader.peek()
        try:
            return self._sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        self._before_wait()
        held = self.holding
        self.leave()
        try:
            return self._sock.recv_into(buffer)
        finally:
            if held:
                self.enter()


class Parking:
    """Connections between two requests, waiting without a thread of their own.

    park() hands a connection's socket to the kernel to watch; wait()
    blocks until some have something to read and returns their handlers.
    Each parked handler is handed out once, to whoever pops it from
    self._parked first: wait(), or take_all() at shutdown.  On Linux the
    watching is an epoll set, each socket armed for one event at a time
    (EPOLLONESHOT), so that a parked connection costs one system call, its
    re-arming; elsewhere a selectors.DefaultSelector, registered and
    unregistered each time.
    """

    ONE_READ = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLONESHOT", 0)

    def __init__(self, use_epoll=hasattr(select, "epoll")):
        self._parked = {}               # fd -> handler
        self._epoll = select.epoll() if use_epoll else None
        self._selector = None if use_epoll else selectors.DefaultSelector()

    def park(self, handler):
        """Watch the handler's socket; raises OSError if the kernel will not."""
        fd = handler.request.fileno()
        self._parked[fd] = handler      # before the kernel can report it
        try:
            if self._selector:
                self._selector.register(fd, selectors.EVENT_READ)
            else:
                try:
                    self._epoll.modify(fd, self.ONE_READ)       # re-arm
                except FileNotFoundError:                       # a new socket
                    self._epoll.register(fd, self.ONE_READ)
        except OSError:
            self._parked.pop(fd, None)
            raise

    def _take(self, fd):
        handler = self._parked.pop(fd, None)    # atomic: one taker only
        if handler is not None and self._selector:
            self._selector.unregister(fd)
        return handler

    def wait(self):
        """Block until parked connections can be read; return their handlers."""
        if self._selector:
            fds = [key.fd for key, _ in self._selector.select()]
        else:
            fds = [fd for fd, _ in self._epoll.poll()]
        return [handler for handler in map(self._take, fds) if handler is not None]

    def take_all(self):
        """Every parked handler, taken out."""
        return [handler for handler in map(self._take, list(self._parked))
                if handler is not None]


class KVHandler(http.server.BaseHTTPRequestHandler):
    """One connection: requests in, replies out, until either side closes.

    Overridden hooks of BaseHTTPRequestHandler, and why:
      __init__            only sets the connection up: it is served in
                          turns (serve_turn), each on whichever worker
                          thread takes it, not by one call to handle();
      setup, finish       a reader that leaves its Admission slot while it
                          waits, and, before the socket closes, a wait for
                          the reply the journal's writer may still owe;
      handle_one_request  to answer every method on our paths (405 with
                          Allow, where the base answers 501), and to tell the
                          server when the connection is idle between requests
                          so that shutdown can close it at once;
      parse_request       a header parser of our own: the base one goes
                          through email.parser and costs most of a request's
                          time; ours keeps its limits and refusals;
      send_error          text/plain bodies, as every reply of ours;
      log_message         to stdout, and only with --access-log.
    Replies are built whole (format_reply, build_reply): status line,
    headers and body go in one write, so that a reply is one TCP segment
    when it fits (with Nagle off, two writes would be two segments; with
    Nagle on, the second one would wait ~40 ms for the client's delayed
    ACK).
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "kvstore"

    # -- the request loop -----------------------------------------------------

    def __init__(self, request, client_address, server):
        # Not the base class's __init__, which serves the connection to its
        # end: here a connection is served in turns (KVServer), so this only
        # sets it up.
        self.request, self.client_address, self.server = request, client_address, server
        self.replaced = False       # this turn's worker has been replaced (worker_waits)
        self.setup()

    def setup(self):
        super().setup()
        self.reader = _AdmittedReader(self.connection, self.server.admission, self.worker_waits)
        self.rfile = io.BufferedReader(self.reader, READ_BUFFER)
        self.reply_owed = threading.Lock()  # held while the journal owes this connection a reply

    def serve_turn(self):
        """Answer the requests that have arrived.

        Returns True if the connection should wait, parked, for more;
        False once it is done (then finish() and close it).
        """
        while True:
            self.handle_one_request()
            if self.close_connection:
                return False
            self.reader.peeking = True      # a pipelined request already read?
            try:
                if not self.rfile.peek(1):
                    return True
            finally:
                self.reader.peeking = False

    def worker_waits(self):
        """This turn is about to wait for its client (or the disk): let another worker go on."""
        if not self.replaced:
            try:
                self.server.start_worker()
            except RuntimeError:        # no thread to be had: the queue waits for this turn
                return
            self.replaced = True

    def finish(self):
        self.await_owed_reply()
        super().finish()

    def handle_one_request(self):
        self.close_connection = True          # until a full request says otherwise
        if not self.server.set_idle(self.request, True):
            return                            # shutting down: take no new request
        try:
            line = self.rfile.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):        # RFC 9112 2.2: ignore a stray CRLF
                line = self.rfile.readline(MAX_LINE + 1)
        finally:
            self.server.set_idle(self.request, False)
        if not line:
            return                            # the client closed (or drain woke us)
        self.raw_requestline = line
        self.requestline = line.decode("latin-1").rstrip("\r\n")   # for the access log
        self.command = None                   # nothing parsed yet, for reply()
        self.request_version = "HTTP/1.1"
        self.await_owed_reply()               # replies go out in request order
        self.reader.enter()
        try:
            if len(line) > MAX_LINE:
                raise RequestError(414, "request line too long", close=True)
            self.parse_request()
            self.route()
        except RequestError as e:
            self.reply(e.status, (e.message + "\n").encode(), close=e.close, headers=e.headers)
        except ClientGone:
            self.close_connection = True
        finally:
            self.reader.leave()

    def parse_request(self):
        """Parse the request line and headers into command, path, headers.

        self.headers is a dict of lower-cased names; repeated headers are
        joined with ", " (RFC 9110 5.3), which also lets read_body() notice
        two different Content-Length values.  Raises RequestError.
        """
        words = self.requestline.split()
        if len(words) != 3:
            raise RequestError(400, "bad request line", close=True)
        self.command, self.path, self.request_version = words
        minor = KNOWN_VERSIONS.get(self.request_version)
        if minor is None:
            version = VERSION.fullmatch(self.request_version)
            if not version:
                raise RequestError(400, "bad request line", close=True)
            if version.group(1) != "1":
                raise RequestError(505, "http version not supported", close=True)
            minor = version.group(2)
        headers = {}
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise RequestError(431, "header line too long", close=True)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ClientGone()
            text = line.decode("latin-1").rstrip("\r\n")
            name, colon, value = text.partition(":")
            if not colon or not HEADER_NAME.fullmatch(name):
                raise RequestError(400, "bad header line", close=True)
            name = name.lower()
            value = value.strip(" \t")
            headers[name] = headers[name] + ", " + value if name in headers else value
        else:
            raise RequestError(431, "too many headers", close=True)
        self.headers = headers
        tokens = headers.get("connection", "").lower()
        if minor == "0":
            self.close_connection = "keep-alive" not in tokens
        else:
            self.close_connection = "close" in tokens
        return True

    # -- bodies ---------------------------------------------------------------

    def read_body(self):
        """The request body (b"" if none).  Sets self.has_length.  Raises RequestError, ClientGone.

        A body over --max-value-bytes is refused from its Content-Length,
        before a byte of it is read; a request that is ambiguous about its
        length is refused, because that ambiguity is how requests get
        smuggled past a proxy.  Both close the connection: we cannot know
        where the next request would start.
        """
        length = self.headers.get("content-length")
        encoding = self.headers.get("transfer-encoding")
        self.has_length = length is not None or encoding is not None
        limit = self.server.max_value_bytes
        if encoding is not None:
            if length is not None:
                raise RequestError(400, "ambiguous message length", close=True)
            if encoding.lower() != "chunked":
                raise RequestError(501, "transfer-encoding not supported", close=True)
            self.send_continue()
            return self.read_chunked(limit)
        if length is None:
            return b""
        if "," in length:                       # the header was repeated
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1:
                raise RequestError(400, "ambiguous message length", close=True)
            length = values.pop()
        if not (length.isascii() and length.isdigit()):
            raise RequestError(400, "bad content-length", close=True)
        length = int(length)
        if length > limit:
            raise RequestError(413, "value too large", close=True)
        if length == 0:
            return b""
        self.send_continue()
        return self.read_exactly(length)

    def read_exactly(self, n):
        data = self.rfile.read(n)
        if len(data) < n:
            raise ClientGone()
        return data

    def read_chunked(self, limit):
        """Decode a chunked body: hex size line, data, CRLF; ends with a 0 chunk and trailers."""
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                raise ClientGone()
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not CHUNK_SIZE.fullmatch(size):
                raise RequestError(400, "bad chunked body", close=True)
            size = int(size, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise RequestError(413, "value too large", close=True)
            chunks.append(self.read_exactly(size))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise RequestError(400, "bad chunked body", close=True)
        for _ in range(MAX_HEADERS + 1):          # trailer fields: read and ignore
            line = self.rfile.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return b"".join(chunks)
            if not line:
                raise ClientGone()
            if len(line) > MAX_LINE:
                break
        raise RequestError(400, "bad chunked body", close=True)

    def send_continue(self):
        """Honour Expect: 100-continue: the client waits for this before sending the body."""
        if (self.headers.get("expect", "").lower() == "100-continue"
                and self.request_version != "HTTP/1.0"):
            if self.send_all(b"HTTP/1.1 100 Continue\r\n\r\n"):
                self.reader.enter()     # to read the body in turn

    # -- routing and the API --------------------------------------------------

    def route(self):
        path = self.path
        if not path.startswith("/"):              # absolute form: http://host/path
            scheme, _, rest = path.partition("://")
            path = "/" + rest.partition("/")[2] if scheme.lower() in ("http", "https") else ""
        path = path.partition("?")[0]
        body = self.read_body()
        if path.startswith("/kv/"):
            self.check_method("/kv/", ("GET", "HEAD", "PUT", "DELETE"))
            self.do_kv(parse_key(path[4:]), body)
        elif path == "/clear":
            self.check_method("/clear", ("DELETE",))
            self.write(self.server.store.clear)
        elif path == "/health":
            self.check_method("/health", ("GET", "HEAD"))
            self.reply(200, b"ok\n")
        else:
            raise RequestError(404, "not found")

    def check_method(self, path, methods):
        if self.command not in methods:
            raise RequestError(405, "method not allowed", headers=(("Allow", ALLOWED[path]),))

    def do_kv(self, key, body):
        store = self.server.store
        if self.command in ("GET", "HEAD"):
            value = store.get(key)
            if value is None:
                raise RequestError(404, "key not found")
            self.reply(200, value)
        elif self.command == "PUT":
            if not self.has_length:
                raise RequestError(411, "length required")
            if not body:
                raise RequestError(400, "value cannot be empty")
            self.write(store.put, key, body)
        else:
            self.write(store.delete, key)

    def write(self, mutation, *args):
        """Run a store mutation; the journal's writer sends the 200 once it is durable.

        This thread does not wait for the disk: it goes back to the
        connection, and the next request it reads (if the client pipelines)
        waits in await_owed_reply() until this reply is out.  The 500 of a
        write the journal could not make durable is built only then, by the
        writer.  Sealed gets a 503 and a journal that had already failed a
        500, both from here at once.
        Why: a thread that slept through the fsync had to be woken, and to
        win the GIL, once more per write.  PUT at 64 connections under
        --fsync always went from ~13k to ~20k/s, with a quarter of the
        context switches.
        """
        connection = self.connection_header()
        ok = _this_second.write_ok(connection)
        requestline = self.requestline

        def send_when_durable(error):          # runs in the journal's writer thread
            reply = ok
            if error:
                log("Journal write failed: %s" % error)
                reply = build_reply(500, b"storage error\n", connection)
            send_unblocked(self.connection, reply, self.reply_owed.release)
            self.log_message('"%s" %s %s', requestline, 500 if error else 200, 0)

        self.reply_owed.acquire()
        queued = False
        try:
            mutation(*args, on_durable=send_when_durable)
            queued = True
        except Sealed:
            raise RequestError(503, "shutting down", close=True)
        except OSError as e:
            log("Journal write failed: %s" % e)
            raise RequestError(500, "storage error")
        finally:
            if not queued:
                self.reply_owed.release()

    def await_owed_reply(self):
        """Return once the journal has sent this connection's last reply."""
        if self.reply_owed.locked():
            self.worker_waits()
            with self.reply_owed:
                pass

    # -- replies --------------------------------------------------------------

    def format_reply(self, status, body=b"", close=False, headers=()):
        """A whole reply as bytes.  HEAD gets the headers of GET and no body."""
        return build_reply(status, body, self.connection_header(close), headers,
                           with_body=self.command != "HEAD")

    def connection_header(self, close=False):
        """The Connection header of this request's reply; decides whether the connection closes."""
        if close or self.server.draining:
            self.close_connection = True
        if self.close_connection:
            return b"Connection: close\r\n"
        if self.request_version == "HTTP/1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def reply(self, status, body=b"", close=False, headers=()):
        """Send a whole reply in one write."""
        self.send_all(self.format_reply(status, body, close, headers))
        if self.server.access_log:
            self.log_request(status, len(body))

    def send_all(self, data):
        """Send `data`; a client that does not read it holds up nobody else.

        The usual reply fits in the socket's buffer and goes at once.  If
        not, the worker lets another take its place, and the admission slot
        is given up, before it waits (as a read does in _AdmittedReader).
        Returns True if the slot was given up.
        """
        try:
            sent = self.connection.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return False
        self.worker_waits()
        self.reader.leave()
        self.connection.sendall(memoryview(data)[sent:])
        return True

    def send_error(self, code, message=None, explain=None):
        """The base class's error path (not normally reached): text/plain, and close."""
        self.reply(code, ("%s\n" % (message or self.responses[code][0])).encode(), close=True)

    def log_message(self, format, *args):
        # The request line names the key, never the value.
        if self.server.access_log:
            log("%s - %s" % (self.address_string(), format % args))


# -------------------------------------------------------------------- server --

class KVServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer whose threads serve turns, not connections; it knows its connections.

    Every accepted socket is in self._connections until its handler is
    done with it.  Between two requests a connection is parked; a turn
    that waits for the rest of a request line is in self._idle: drain()
    closes both at once.
    """

    request_queue_size = 4096   # listen backlog (the stdlib's 5 drops a burst
                                # of connects; the kernel caps it at somaxconn)

    def __init__(self, address, store, max_value_bytes, access_log):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.max_value_bytes = max_value_bytes
        self.access_log = access_log
        self.draining = False
        self.admission = Admission(ADMISSION_SLOTS)
        self._connections = set()
        self._idle = set()
        self._lock = threading.Lock()           # guards _connections (_idle: see set_idle)
        self._changed = threading.Condition(self._lock)      # a connection ended
        self._turns = queue.SimpleQueue()       # handlers whose requests have arrived
        self._parking = Parking()
        super().__init__(address, KVHandler)
        threading.Thread(target=self._unpark_readable, name="unparker", daemon=True).start()
        for _ in range(self.WORKERS):
            self.start_worker()

    def server_bind(self):
        # HTTPServer.server_bind() looks up our fully qualified host name,
        # which can hang for seconds on a machine without DNS; nothing here
        # uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- threads: a turn per request, not a thread per connection ----------
    #
    # ThreadingMixIn gives each connection a thread of its own, which sleeps
    # in recv() until the next request: every request then costs a thread
    # switch, and a burst of 10,000 connects means 10,000 threads.  Here a
    # connection between two requests has no thread: it is parked (Parking),
    # its socket watched by the kernel.  The unparker thread waits for
    # parked sockets to become readable and queues their turns, in arrival
    # order; a worker takes a turn, serves the requests that have arrived
    # (KVHandler.serve_turn), parks the connection again and takes the next
    # turn.  Under load the queue is seldom empty, so the worker goes from
    # one request to the next without sleeping.
    #
    # One worker, because one runs Python at a time anyway: with two, GET
    # at 256 connections fell from 34.9k to 26.4k/s and its p99 rose from
    # 10 to 16 ms (3 interleaved pairs).  A turn that must wait (for the
    # rest of a slow client's request, for a client to read a large reply,
    # for the fsync a pipelined write needs first) starts a new worker
    # before it waits (KVHandler.worker_waits), so the queue never waits
    # behind it, and its own thread ends with the turn.
    #
    # Measured against a thread per connection (interleaved pairs of 3 s
    # runs on the 2-CPU VM): PUT at 64 connections 27.5k against 25.4k/s
    # (6 pairs); GET at 64 connections 54.9k against 49.5k/s (4 pairs); GET
    # at 256 connections 48.1k against 26.7k/s, p99 7-10 ms against 15-18
    # ms (3 pairs).  Context switches per PUT (perf stat, 3 runs each):
    # 0.26-0.30 against 1.01-1.05.

    WORKERS = 1

    def start_worker(self):
        _thread.start_new_thread(self._worker, ())

    def _worker(self):
        while not self._take_turn(self._turns.get()):
            pass                        # until another worker takes this one's place

    def _take_turn(self, handler):
        """Serve a turn, then park the connection or close it.  True if this worker was replaced."""
        try:
            more = handler.serve_turn()
        except Exception:
            self.handle_error(handler.request, handler.client_address)
            more = False
        replaced, handler.replaced = handler.replaced, False
        if more:
            try:
                self.park(handler)      # from here, another turn may own it
                return replaced
            except OSError as e:        # the kernel will not watch it: close it
                log("Cannot park a connection: %s" % e)
        try:
            handler.finish()            # may wait for an owed reply, and be replaced
        except Exception:
            pass
        self.shutdown_request(handler.request)
        return replaced or handler.replaced

    def park(self, handler):
        """Let the connection wait for its next request without a thread."""
        self._parking.park(handler)
        if self.draining:               # drain() may have taken the others already
            self._queue_turns(self._parking.take_all())

    def _queue_turns(self, handlers):
        for handler in handlers:
            self._turns.put(handler)

    def _unpark_readable(self):
        while True:
            self._queue_turns(self._parking.wait())

    def process_request(self, request, client_address):
        with self._lock:
            self._connections.add(request)
        try:
            self.park(KVHandler(request, client_address, self))
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def service_actions(self):
        # Called by serve_forever() after each accept and every poll_interval.
        self._accept_queued()

    def server_activate(self):
        super().server_activate()
        # Non-blocking, so that _accept_queued() can accept until the
        # kernel's queue is empty.  (Accepted sockets are blocking again.)
        self.socket.setblocking(False)

    def _accept_queued(self):
        """Accept every connection already waiting, not just one per select()."""
        for _ in range(self.request_queue_size):
            try:
                request, client_address = self.socket.accept()
            except OSError:         # BlockingIOError: queue empty; EMFILE: later
                return
            self.process_request(request, client_address)

    def shutdown_request(self, request):
        super().shutdown_request(request)
        with self._lock:
            self._connections.discard(request)
            self._idle.discard(request)
            self._changed.notify_all()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return                        # the client went away: nothing to report
        log("Unexpected error serving %s: %r" % (client_address[0], error))

    def set_idle(self, request, idle):
        """Mark a connection as waiting for its next request (or not).

        Returns False when the server is draining and the connection should
        close instead of waiting.  It runs twice per request, so it takes no
        lock: a connection first joins _idle, then reads `draining`; drain()
        first sets `draining`, then looks at _idle.  Each step is atomic
        under the GIL, so whichever of the two comes second sees the other's
        step: either drain() wakes the connection, or the connection sees
        `draining` itself.  None can slip into a wait that lasts.
        """
        if not idle:
            self._idle.discard(request)
            return True
        self._idle.add(request)
        if self.draining:
            self._idle.discard(request)
            return False
        return True

    def drain(self, timeout):
        """Close idle connections now; wait up to `timeout` s for the others.

        Guarantees: when it returns, no connection is between requests, and
        each request that was in flight has finished, unless the deadline
        passed first; returns how many connections were still open then.
        It does not stop a handler that is still running: Store.seal() is
        what keeps such a late request from changing the saved state.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self.draining = True
            for request in list(self._idle):     # a copy: handlers change it unlocked
                # shutdown(SHUT_RD) wakes a thread blocked in recv();
                # close() would not.  Bytes already buffered are still read.
                try:
                    request.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            # A turn for each parked connection: it sees `draining`, and closes.
            self._queue_turns(self._parking.take_all())
            while self._connections:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return len(self._connections)


# --------------------------------------------------------------- lifecycle --

def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:          # also refuses nan
        raise ValueError(text)
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def cpu_choice(text):
    if text in ("auto", "all"):
        return text
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"
cpu_choice.__name__ = "CPU (auto, all or a number)"
non_negative_float.__name__ = "non-negative number"
port_number.__name__ = "port (0-65535)"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit 2: "bad usage" (argparse would add the usage text).
        self.exit(2, "error: %s (see --help)\n" % message)


def parse_args(argv, environ):
    parser = ArgumentParser(
        description="An HTTP key-value store that keeps every acknowledged write "
                    "through clean shutdowns and crashes.",
        epilog="Environment: HOST, PORT and DATA_DIR are used when the flag is not given. "
               "Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad usage.")
    parser.add_argument("--host", default=environ.get("HOST", "0.0.0.0"),
                        help="address to bind (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=port_number, default=environ.get("PORT", "8080"),
                        help="TCP port; 0 picks a free one (env PORT, default 8080)")
    parser.add_argument("--working-dir", default=environ.get("DATA_DIR", "./data"),
                        metavar="DIR",
                        help="data directory, created if missing "
                             "(env DATA_DIR, default ./data)")
    parser.add_argument("--shutdown-timeout", type=non_negative_float, default=15.0,
                        metavar="SECONDS",
                        help="how long shutdown waits for requests in flight (default 15)")
    parser.add_argument("--max-value-bytes", type=positive_int, default=10 * 1024 * 1024,
                        metavar="N", help="largest accepted value (default 10485760)")
    parser.add_argument("--fsync", choices=persistence.Journal.POLICIES, default="always",
                        help="journal fsync policy: always = before each reply, shared by "
                             "concurrent writers; everysec = once a second; no = left to "
                             "the OS (default always)")
    parser.add_argument("--checkpoint-bytes", type=positive_int, default=64 * 1024 * 1024,
                        metavar="N",
                        help="write a snapshot and start a new journal when the journal "
                             "grows past N bytes (default 67108864)")
    parser.add_argument("--cpu", type=cpu_choice, default="auto",
                        help="run every thread on one CPU, with SCHED_BATCH: auto = "
                             "the last CPU this process may use, N = CPU N, all = "
                             "let them move (default auto; see README, Performance)")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per request (never a value); off by default")
    return parser.parse_args(argv)


def raise_open_file_limit():
    """Each connection is a file descriptor; a burst of 10,000 needs more than the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 1 << 20), hard))
        except (ValueError, OSError):
            pass


def pin_to_one_cpu(choice):
    """Keep every thread of the process on one CPU; return it (None: not pinned).

    Only one thread runs Python at a time (the GIL), so a second CPU buys
    the server little; but a thread woken on another CPU than the one that
    woke it costs an inter-processor interrupt, each time the GIL or a lock
    changes hands: several times per request.  Measured on a 2-CPU VM: GET
    throughput x2.5, burst time /1.8 when pinned.  Must run before other
    threads start: they inherit the main thread's CPU set.
    """
    if choice == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if choice == "auto" else choice
    if choice == "auto" and len(allowed) < 2:
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def no_wakeup_preemption():
    """Ask Linux not to let a woken thread preempt the running one (SCHED_BATCH).

    On one CPU, a thread woken because its request arrived would preempt
    the thread that holds the GIL, find the GIL taken, and sleep again: two
    context switches for nothing.  Under SCHED_BATCH it waits until the
    running thread blocks, which is when that thread lets the GIL go.  It
    needs no privilege, and threads started later inherit it.  Measured on
    the 2-CPU VM, PUT at 64 connections: 23.5k/s against 19.3k/s (the means
    of 4 interleaved runs each), and a quarter fewer context switches.  The
    price is a longer tail with many more threads than CPUs: wrk, GET at 256
    connections, p99 38 ms against 26 ms (medians of 6 runs each), and
    spikes with two admission slots (see Admission).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass                    # not Linux, or not allowed: only slower


def open_store(args):
    """Create the data directory, lock it, recover the data, open a new journal."""
    directory = os.path.abspath(args.working_dir)
    try:
        persistence.make_data_directory(directory)
        lock = persistence.lock_directory(directory)
        data, generation, replayed = persistence.load(directory, log)
        # Creating the new journal also proves the directory is writable:
        # better to fail now than at shutdown.
        journal = persistence.Journal(directory, generation, args.fsync)
    except OSError as e:
        raise persistence.DataError("%s: data directory is not usable: %s"
                                    % (e.filename or directory, e.strerror))
    store = Store(data, journal, args.checkpoint_bytes, log)
    if replayed:
        store.request_checkpoint()      # fold the replayed journals into a snapshot
    return store, lock


def install_signal_handlers():
    """Route SIGTERM and SIGINT to a pipe; return its read end.

    Python's own C-level handler writes each signal's number to the fd given
    to signal.set_wakeup_fd(); the stopper thread (serve()) reads it.  The
    Python-level handler does nothing at all: it runs in the main thread
    between two bytecodes, perhaps while that thread holds a lock (in
    log(), or in Event.set()), and a handler that took the same lock would
    wait for itself forever.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)       # required by set_wakeup_fd()
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)
    return read_end


def serve(args, store, signal_pipe):
    """Serve until a signal, then drain, seal and save.  Returns the exit code."""
    try:
        server = KVServer((args.host, args.port), store, args.max_value_bytes, args.access_log)
    except (OSError, OverflowError) as e:
        store.abandon()
        fail("cannot listen on %s:%s: %s" % (args.host, args.port,
                                              getattr(e, "strerror", None) or e))
        return 1

    def stopper():
        # shutdown() waits until serve_forever() has returned, so it must
        # run on a thread other than the main one, which runs serve_forever().
        # (Called before serve_forever() starts, it makes it return at once.)
        signum = os.read(signal_pipe, 1)[0]
        log("Received %s, shutting down" % signal.Signals(signum).name)
        server.shutdown()

    threading.Thread(target=stopper, name="stopper", daemon=True).start()
    host, port = server.server_address[:2]
    log("Server listening on %s:%d" % (host, port))
    # A short poll interval: serve_forever() notices shutdown() within it.
    server.serve_forever(poll_interval=0.05)
    server.server_close()

    still_open = server.drain(args.shutdown_timeout)
    if still_open:
        log("Shutdown timeout: %d connection(s) still in a request; their writes are refused"
            % still_open)
    store.seal()
    path = persistence.snapshot_path(store.directory)
    log("Flushing %d keys to %s" % (len(store), path))
    started = time.monotonic()
    try:
        size = store.save_and_close()
    except OSError as e:
        fail("saving %s failed: %s; the journal still holds every write" % (path, e))
        return 1
    log("Saved %d bytes in %.2f s; bye" % (size, time.monotonic() - started))
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    raise_open_file_limit()
    try:
        cpu = pin_to_one_cpu(args.cpu)           # before any thread starts
    except OSError as e:
        fail("cannot run on CPU %s: %s" % (args.cpu, e.strerror))
        os._exit(1)
    if args.cpu != "all":
        no_wakeup_preemption()                  # every thread shares one CPU
    if cpu is not None:
        log("Running on CPU %d (--cpu all lets threads use every CPU)" % cpu)
    signal_pipe = install_signal_handlers()     # before the load, which may be long
    try:
        store, directory_lock = open_store(args)
    except persistence.DataError as e:
        fail(str(e))
        os._exit(1)
    code = serve(args, store, signal_pipe)
    sys.stdout.flush()
    # Exit at once, while `store` is still referenced: the data is saved,
    # and freeing a dict of a million keys object by object takes longer
    # than saving it did.  Worker threads stalled on slow clients end too.
    os._exit(code)


if __name__ == "__main__":
    main()
