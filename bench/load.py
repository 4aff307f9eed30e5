"""A stdlib HTTP load generator for the key-value API: library and CLI.

- run_load(): closed loop, N keep-alive connections with one request each in
  flight, GET or PUT /kv/key-<i> over a key space; throughput and latency
  percentiles.  One `selectors` loop per process over non-blocking sockets with
  a minimal response parser (bench.wire), optionally split over processes.
- preload(): fill key-0 .. key-(n-1) quickly.
- burst() (bench.burst) and run_wrk() (bench.wrk), re-exported here.

    python3 -m bench.load --port P [--connections 64] [--duration 5] [--method GET]
    python3 -m bench.load burst --port P [-n 10000]

Loopback only; every loop here is bounded in time.
"""
import argparse
import collections
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import queue
import random
import selectors
import socket
import sys
import time
from array import array

from bench.burst import burst                     # noqa: F401  (re-exported: the tests use it)
from bench.wire import (READ, SCAN_EVERY, WRITE, clock, errname, parse_response, percentile,
                        recv_some, request, send_some)
from bench.wrk import run_wrk

@contextlib.contextmanager
def on_client_cpu():
    """Run the load generator (this thread, and what it starts) on the first CPU only.

    So that the client never takes more than one CPU from the server, and
    takes the same one whichever server it loads: on a 2-CPU machine, a
    client free to use both (wrk's second thread, say) would compete with
    the server for the CPU the server most needs.  The servers themselves
    are started outside this block and keep every CPU.  Does nothing on a
    single CPU or without sched_setaffinity.
    """
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        yield
        return
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(every)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, every)


# One process.  Measured on the 2-core machine against the asyncio server: one
# generator process (~0.8 core, half of it kernel time in loopback TCP; wrk
# spends as much) already saturates the server's core; a second process adds
# no throughput and doubles p99 (three busy processes on two cores).
DEFAULT_PROCESSES = 1


# -- the closed loop -----------------------------------------------------------

class _Conn:
    __slots__ = ("sock", "buf", "started", "connecting", "out")

    def __init__(self):
        self.sock = self.started = None
        self.buf = self.out = b""
        self.connecting = False


class ClosedLoop:
    """N connections, each with at most one request in flight, fed from `source`.

    Latency runs from sending a request (or from opening the connection it
    goes on, when the server closed the previous one) to its last byte.  A
    request that gets no response (refused, reset, closed, timed out) is a
    failure; its connection is reopened at the next scan.
    """

    def __init__(self, addr, connections, source, timeout=15.0):
        self.addr, self.source, self.timeout = addr, source, timeout
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn() for _ in range(connections)]
        self.down = list(self.conns)          # connections to (re)open at the next scan
        self.running = self.exhausted = False
        self.latencies = array("q")           # microseconds, one per response
        self.statuses = collections.Counter()
        self.failures = collections.Counter()

    def open(self, c):
        c.buf, c.out, c.connecting = b"", b"", True
        c.started = clock() if self.running else None
        c.sock = socket.socket()
        c.sock.setblocking(False)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = c.sock.connect_ex(self.addr)
        if code not in (0, errno.EINPROGRESS):
            return self.fail(c, errname(code))
        self.sel.register(c.sock, WRITE, c)

    def fail(self, c, reason):
        """Drop the connection; count the request it carried, if any."""
        if c.started is not None:
            self.failures[reason] += 1
            c.started = None
        self.close(c)
        self.down.append(c)

    def close(self, c):
        if c.sock is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None

    def connected(self, c):
        code = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self.fail(c, errname(code))
        c.connecting = False
        self.sel.modify(c.sock, READ, c)
        if self.running:
            self.send(c)

    def send(self, c):
        req = next(self.source, None)
        if req is None:
            self.exhausted, c.started = True, None
            return
        if c.started is None:
            c.started = clock()
        try:
            sent = c.sock.send(req)
        except OSError as exc:
            return self.fail(c, errname(exc.errno))
        if sent < len(req):     # rare: the server is not reading; finish when writable
            c.out = req[sent:]
            self.sel.modify(c.sock, READ | WRITE, c)

    def writable(self, c):
        c.out, failure = send_some(c.sock, c.out)
        if failure:
            return self.fail(c, failure)
        if not c.out:
            self.sel.modify(c.sock, READ, c)

    def readable(self, c):
        data, failure = recv_some(c.sock)
        if failure:
            return self.fail(c, failure)
        if data is None:
            return
        if not data or c.started is None:   # closed, or talking out of turn: drop it
            return self.fail(c, "closed")
        c.buf += data
        try:
            parsed = parse_response(c.buf)
        except ValueError:
            return self.fail(c, "bad response")
        if parsed is None:
            return
        status, end, close = parsed
        self.latencies.append(int((clock() - c.started) * 1e6))
        self.statuses[status] += 1
        c.buf, c.started = c.buf[end:], None
        if close:
            self.close(c)
            if not self.exhausted:
                self.open(c)
        else:
            self.send(c)

    def scan(self, now):
        """Fail requests past their timeout; reopen dropped connections."""
        for c in self.conns:
            if c.started is not None and now - c.started > self.timeout:
                self.fail(c, "timeout")
        down, self.down = self.down, []
        for c in down:
            if self.exhausted:
                break
            self.open(c)

    def poll(self, until):
        """Handle socket events until `until` (or the source ran dry and nothing is in flight)."""
        next_scan = clock()
        while True:
            now = clock()
            if now >= next_scan:
                self.scan(now)
                next_scan = now + SCAN_EVERY
            if now >= until or (self.exhausted and all(c.started is None for c in self.conns)):
                return
            for key, mask in self.sel.select(min(SCAN_EVERY, until - now)):
                c = key.data
                if c.connecting:
                    self.connected(c)
                elif mask & READ:
                    self.readable(c)
                elif c.sock is not None:
                    self.writable(c)

    def connect(self, timeout=10.0):
        """Open every connection before the clock starts, so a run measures requests, not handshakes."""
        deadline = clock() + timeout
        self.scan(clock())
        while any(c.connecting and c.sock for c in self.conns) and clock() < deadline:
            for key, _ in self.sel.select(SCAN_EVERY):
                self.connected(key.data)

    def run(self, duration):
        """Send for `duration` seconds; return the raw result.  Closes every socket."""
        try:
            self.running = True
            cpu, start = time.process_time(), clock()
            for c in self.conns:
                if c.sock is not None and not c.connecting:
                    self.send(c)
            self.poll(start + duration)
            seconds = clock() - start
            cpu = time.process_time() - cpu
            stalled = self.censor()
        finally:
            self.shut()
        return {"seconds": seconds, "cpu": cpu, "latencies": self.latencies, "stalled": stalled,
                "statuses": self.statuses, "failures": self.failures}

    def censor(self):
        """Add the requests still in flight to the latency sample, at their age so far.

        Without them a stalled connection (say, a SYN dropped by a full listen
        queue, retried 1, 3, 7 s later) would vanish from the percentiles and a
        server that starves most of its clients would look fast.  Their age is a
        lower bound; they are not counted as requests or errors.  Returns how
        many of them had waited over a second: connections the server starved.
        """
        now, stalled = clock(), 0
        for c in self.conns:
            if c.started is not None:
                self.latencies.append(int((now - c.started) * 1e6))
                stalled += now - c.started > 1.0
        return stalled

    def shut(self):
        for c in self.conns:
            self.close(c)
        self.sel.close()


# -- run_load: the closed loop over one or more processes -----------------------

def request_pool(method, keys, value_size, seed=None, size=20000):
    """Ready-made requests for random keys in [0, keys): building them must not cost the loop."""
    rng = random.Random(seed)
    value = b"x" * value_size
    return [request(method, b"key-%d" % rng.randrange(keys), value) for _ in range(min(size, keys))]


def _worker(addr, connections, duration, pool_args, timeout, ready, go, results):
    """One generator process: connect, wait for the common start, run, report."""
    loop = ClosedLoop(addr, connections, itertools.cycle(request_pool(*pool_args)), timeout)
    loop.connect()
    ready.put(True)
    if not go.wait(60):
        return loop.shut()
    result = loop.run(duration)
    result["latencies"] = result["latencies"].tobytes()
    results.put(result)


def _run_processes(addr, connections, duration, pool_args, timeout, processes):
    """Split the connections over `processes` spawned workers and collect their raw results."""
    ctx = multiprocessing.get_context("spawn")    # no fork: the caller may have threads
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    method, keys, value_size, seed = pool_args
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(addr, share, duration,
                               (method, keys, value_size, None if seed is None else seed + i),
                               timeout, ready, go, results))
             for i, share in enumerate(shares)]
    for proc in procs:
        proc.start()
    try:
        _collect(ready, procs, 60)
        go.set()
        raw = _collect(results, procs, duration + timeout + 60)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    for result in raw:
        result["latencies"] = array("q", result["latencies"])
    return raw


def _collect(channel, procs, timeout):
    """One item from each worker, failing fast if a worker died instead."""
    items, deadline = [], clock() + timeout
    while len(items) < len(procs):
        try:
            items.append(channel.get(timeout=0.2))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a load worker died (is the caller's main module guarded "
                                   "by `if __name__ == '__main__'`?)")
            if clock() > deadline:
                raise RuntimeError("load workers did not answer within %.0f s" % timeout)
    return items


def _ms(us):
    return None if us is None else us / 1000.0


def summarize(raw):
    """Merge the raw results of one or more loops into the public result dict."""
    latencies = sorted(itertools.chain.from_iterable(r["latencies"] for r in raw))
    statuses, failures = collections.Counter(), collections.Counter()
    for r in raw:
        statuses.update(r["statuses"])
        failures.update(r["failures"])
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    seconds = max(r["seconds"] for r in raw)
    return {"requests": ok, "errors": sum(failures.values()) + sum(statuses.values()) - ok,
            "seconds": seconds, "rps": ok / seconds if seconds else 0.0,
            "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
            "max_ms": _ms(latencies[-1] if latencies else None),
            "stalled": sum(r["stalled"] for r in raw), "statuses": statuses, "failures": failures,
            "client_cpu": sum(r["cpu"] for r in raw) / seconds if seconds else 0.0}


def run_load(host, port, connections=64, duration=5.0, method="GET", keys=100000,
             value_size=100, processes=DEFAULT_PROCESSES, timeout=15.0, seed=None):
    """Closed-loop load: `connections` keep-alive connections for `duration` seconds.

    Returns dict(requests, errors, seconds, rps, p50_ms, p99_ms, ...): `requests`
    counts 2xx responses, `errors` everything else (other statuses, and requests
    that got no response); the latency sample also holds the requests still in
    flight at the end, at their age so far (`stalled` counts those older than
    1 s); `client_cpu` is the generator's CPU in cores.  With processes > 1 the caller's main module must be guarded
    by `if __name__ == "__main__"` (the workers are spawned).
    """
    addr = (host, port)
    pool_args = (method, keys, value_size, seed)
    processes = max(1, min(processes, connections))
    if processes == 1:
        loop = ClosedLoop(addr, connections, itertools.cycle(request_pool(*pool_args)), timeout)
        try:
            loop.connect()
        except BaseException:
            loop.shut()
            raise
        raw = [loop.run(duration)]
    else:
        raw = _run_processes(addr, connections, duration, pool_args, timeout, processes)
    result = summarize(raw)
    result.update(connections=connections, method=method, processes=processes)
    return result


# -- preload -------------------------------------------------------------------

def _keeps_alive(addr, value, timeout):
    """PUT key-0 once; True if the server keeps the connection open afterwards."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(request("PUT", b"key-0", value))
        buf = b""
        while parse_response(buf) is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection without answering")
            buf += data
        return not parse_response(buf)[2]


def _pipelined_puts(addr, n_keys, value, connections, depth, deadline):
    """PUT key-1 .. key-(n-1) in batches of `depth` per connection, round robin; count statuses."""
    statuses = collections.Counter()
    keys = iter(range(1, n_keys))
    socks = [socket.create_connection(addr, timeout=30) for _ in range(connections)]
    try:
        while clock() < deadline:
            batches = []
            for sock in socks:
                batch = list(itertools.islice(keys, depth))
                if batch:
                    # Small batches: both directions fit in the socket buffers, so no deadlock.
                    sock.sendall(b"".join(request("PUT", b"key-%d" % k, value) for k in batch))
                    batches.append((sock, len(batch)))
            if not batches:
                break
            for sock, count in batches:
                _read_responses(sock, count, statuses)
    finally:
        for sock in socks:
            sock.close()
    return statuses


def _read_responses(sock, count, statuses):
    buf, pos = b"", 0
    while count:
        parsed = parse_response(buf, pos)
        if parsed is None:
            data = sock.recv(262144)
            if not data:
                raise ConnectionError("server closed a pipelined connection")
            buf = buf[pos:] + data
            pos = 0
            continue
        status, pos, _ = parsed
        statuses[status] += 1
        count -= 1


def preload(host, port, n_keys=100000, value_size=100, connections=4, depth=100, timeout=600.0):
    """PUT key-0 .. key-(n_keys-1), each a value of value_size bytes, as fast as the server allows.

    Pipelined over a few keep-alive connections; a server that closes every
    connection after one response (HTTP/1.0) is fed by a closed loop instead.
    Returns dict(keys, ok, seconds, statuses, failures).
    """
    addr, value, start = (host, port), b"x" * value_size, clock()
    statuses, failures = collections.Counter(), collections.Counter()
    if n_keys > 0 and _keeps_alive(addr, value, 30):
        statuses = _pipelined_puts(addr, n_keys, value, connections, depth, start + timeout)
        statuses[200] += 1                     # the probe's key-0
    elif n_keys > 0:
        source = (request("PUT", b"key-%d" % k, value) for k in range(1, n_keys))
        loop = ClosedLoop(addr, 16, source, 30)
        result = loop.run(timeout)
        statuses, failures = result["statuses"], result["failures"]
        statuses[200] += 1
    return {"keys": n_keys, "ok": statuses.get(200, 0), "seconds": clock() - start,
            "statuses": statuses, "failures": failures}


# -- CLI -----------------------------------------------------------------------

def _load_main(argv):
    parser = argparse.ArgumentParser(prog="python3 -m bench.load",
                                     description="Closed-loop GET/PUT load (`burst` subcommand: see burst -h).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", "-c", type=int, default=64)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    parser.add_argument("--method", choices=("GET", "PUT"), default="GET")
    parser.add_argument("--keys", type=int, default=100000, help="key space: key-0 .. key-(K-1)")
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--processes", "-p", type=int, default=DEFAULT_PROCESSES)
    parser.add_argument("--preload", action="store_true", help="PUT every key first")
    parser.add_argument("--wrk", action="store_true", help="use wrk instead (must be installed)")
    args = parser.parse_args(argv)
    if args.preload:
        print(json.dumps(preload(args.host, args.port, args.keys, args.value_size)), flush=True)
    if args.wrk:
        result = run_wrk(args.host, args.port, args.connections, args.duration, args.method,
                         args.keys, args.value_size)
        if result is None:
            sys.exit("wrk is not installed")
    else:
        result = run_load(args.host, args.port, args.connections, args.duration, args.method,
                          args.keys, args.value_size, args.processes)
    print(json.dumps(result), flush=True)


def _burst_main(argv):
    parser = argparse.ArgumentParser(prog="python3 -m bench.load burst",
                                     description="n connections at once, one PUT each.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    print(json.dumps(burst(args.host, args.port, args.n, args.timeout)), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["burst"]:
        _burst_main(argv[1:])
    else:
        _load_main(argv)


if __name__ == "__main__":
    main()
