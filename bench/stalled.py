"""The stalled-client case: a well-behaved client beside connections that stall mid-request.

stalled_rows() measures GET latency at a few connections on a server alone,
then while `stalled` other connections each sit on half a request line
("GET /kv/key-1 HT", and nothing more), the runs alternating.  A server
that gives each of them a thread or a turn that waits for the rest of the
line, or that lets them fill a connection cap, shows it here as a slower or
starved well-behaved client; one that reads without waiting shows none.
The stalled connections are opened just before each run and closed after
it; how many the server had closed by then is reported too (a header
deadline, a cap).
"""
import errno
import selectors
import socket

from bench.wire import WRITE, clock, raise_fd_limit

STALLED_PREFIX = b"GET /kv/key-1 HT"    # half a request line, never finished
OPEN_WITHIN = 5.0                       # seconds to connect and send every prefix


def open_stalled(host, port, n):
    """Open n connections, each sending STALLED_PREFIX; return (sockets, how many got it out).

    Non-blocking, bounded by OPEN_WITHIN: a server whose listen queue is
    full leaves some connections pending, and they stay open as they are.
    """
    raise_fd_limit()
    sel, socks, pending = selectors.DefaultSelector(), [], set()
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        socks.append(sock)
        if sock.connect_ex((host, port)) in (0, errno.EINPROGRESS):
            sel.register(sock, WRITE)
            pending.add(sock)
    deadline, sent = clock() + OPEN_WITHIN, 0
    while pending and clock() < deadline:
        for key, _ in sel.select(0.05):
            sock = key.fileobj
            sel.unregister(sock)
            pending.discard(sock)
            try:
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sent += sock.send(STALLED_PREFIX) == len(STALLED_PREFIX)
            except OSError:
                pass
    sel.close()
    return socks, sent


def closed_by_server(socks):
    """How many of the stalled connections the server has closed (or reset)."""
    closed = 0
    for sock in socks:
        try:
            closed += sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed += 1
    return closed


def _run(port, load, stalled):
    socks, sent = open_stalled("127.0.0.1", port, stalled) if stalled else ([], 0)
    try:
        r = load()
        r.update(stalled_open=sent, stalled_closed=closed_by_server(socks))
    finally:
        for sock in socks:
            sock.close()
    return r


def stalled_rows(port, load, stalled, connections, repeat):
    """Rows for the server on `port`: load() alone, and beside `stalled` stalled connections.

    load() runs one closed loop of GETs at `connections` connections and
    returns run_load's result; the two cases alternate, `repeat` runs each.
    """
    cases = (("alone", 0), ("beside %d stalled connections" % stalled, stalled))
    runs = {label: [] for label, _ in cases}
    for _ in range(repeat):
        for label, stalled in cases:
            runs[label].append(_run(port, load, stalled))
    rows = []
    for label, stalled in cases:
        r = max(runs[label], key=lambda run: run["rps"])
        rows.append(dict(r, test="GET c=%d %s" % (connections, label), stalled_wanted=stalled,
                         runs_rps=[round(run["rps"]) for run in runs[label]],
                         runs_p99_ms=[run["p99_ms"] for run in runs[label]]))
    return rows
