"""burst(): n connections opened at the same moment, one PUT each.

The spec's "10,000 clients each sending one PUT at the same moment": every
connection is started by a non-blocking connect in one tight loop, then one
`selectors` loop sends each request and reads each response.  Each connection
has its own timeout and no retry, and its outcome is recorded exactly once.
Used by the benchmark and by the test suite (`from bench.load import burst`).
"""
import collections
import errno
import selectors
import socket

from bench.wire import (READ, SCAN_EVERY, WRITE, clock, errname, parse_response, raise_fd_limit,
                        recv_some, request, send_some)


class _Shot:
    __slots__ = ("i", "sock", "out", "buf", "started")


def _burst_request(i, value):
    body = value if value is not None else b"value-%d" % i
    return request("PUT", b"burst-%d" % i, body)


class Burst:
    """n one-request connections opened at once; each outcome is recorded exactly once."""

    def __init__(self, addr, n, timeout, value):
        self.addr, self.n, self.timeout, self.value = addr, n, timeout, value
        self.sel = selectors.DefaultSelector()
        self.pending = {}            # _Shot -> True, until its outcome is recorded
        self.statuses, self.failures = collections.Counter(), collections.Counter()
        self.slowest = 0.0

    def finish(self, shot, status=None, failure=None):
        if self.pending.pop(shot, None) is None:
            return                   # already recorded
        if status is not None:
            self.statuses[status] += 1
            self.slowest = max(self.slowest, clock() - shot.started)
        else:
            self.failures[failure] += 1
        try:
            self.sel.unregister(shot.sock)
        except (KeyError, ValueError):
            pass
        shot.sock.close()

    def launch(self):
        """Start every connect as fast as the kernel takes them."""
        for i in range(self.n):
            shot = _Shot()
            shot.i, shot.buf, shot.started = i, b"", clock()
            shot.out = _burst_request(i, self.value)
            try:
                shot.sock = socket.socket()
            except OSError as exc:            # EMFILE: too few file descriptors
                self.failures[errname(exc.errno)] += 1
                continue
            self.pending[shot] = True
            shot.sock.setblocking(False)
            code = shot.sock.connect_ex(self.addr)
            if code not in (0, errno.EINPROGRESS):
                self.finish(shot, failure=errname(code))
            else:
                self.sel.register(shot.sock, WRITE, shot)

    def writable(self, shot):
        code = shot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self.finish(shot, failure=errname(code))
        shot.out, failure = send_some(shot.sock, shot.out)
        if failure:
            return self.finish(shot, failure=failure)
        if not shot.out:
            self.sel.modify(shot.sock, READ, shot)

    def readable(self, shot):
        data, failure = recv_some(shot.sock)
        if failure:
            return self.finish(shot, failure=failure)
        if data is None:
            return
        shot.buf += data
        try:
            parsed = parse_response(shot.buf)
        except ValueError:
            return self.finish(shot, failure="bad response")
        if parsed is not None:
            self.finish(shot, status=parsed[0])
        elif not data:
            self.finish(shot, failure="closed")

    def run(self):
        start = clock()
        self.launch()
        next_scan = clock() + SCAN_EVERY
        # Every shot's own deadline is at most `timeout` after the last launch; + 1 s of slack.
        hard_stop = clock() + self.timeout + 1.0
        while self.pending and clock() < hard_stop:
            for key, mask in self.sel.select(SCAN_EVERY):
                shot = key.data
                if shot in self.pending:
                    (self.readable if mask & READ else self.writable)(shot)
            now = clock()
            if now >= next_scan:
                next_scan = now + SCAN_EVERY
                for shot in [s for s in self.pending if now - s.started > self.timeout]:
                    self.finish(shot, failure="timeout")
        for shot in list(self.pending):
            self.finish(shot, failure="timeout")
        self.sel.close()
        return clock() - start


def burst(host, port, n=10000, timeout=15.0, value=None):
    """Open n connections at the same moment, each sending one `PUT /kv/burst-<i>`.

    The body is b"value-<i>" unless `value` is given.  Each connection has
    its own `timeout` (from its connect) and no retry.  Returns dict(answered,
    ok, errors, seconds, slowest_s, statuses, failures): answered + errors == n,
    ok counts the 200s, statuses maps each HTTP status to its count, failures
    each kind of error (timeout, ECONNREFUSED, closed, ...) to its count.
    Raises the soft RLIMIT_NOFILE to the hard limit first.
    """
    raise_fd_limit()
    run = Burst((host, port), n, timeout, value)
    try:
        seconds = run.run()
    finally:
        for shot in list(run.pending):    # only after an exception: close what is left
            shot.sock.close()
    answered = sum(run.statuses.values())
    return {"answered": answered, "ok": run.statuses.get(200, 0),
            "errors": sum(run.failures.values()), "seconds": seconds,
            "slowest_s": run.slowest, "statuses": run.statuses, "failures": run.failures}
