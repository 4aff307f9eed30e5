"""A power-cut simulation of the journal: the last, never-fsynced write torn in any order.

    python3 -m bench.powercut [--runs 25] [--root DIR] [--seed N]

Each run starts the server (`--fsync always`) with its journal writer under
a small wrapper that notes, after each fsync of a journal, how far the file
is durable (and makes each fsync 2 ms slower, as a slow disk, so that a cut
often finds a write in flight).  Eight clients PUT unique keys; at a random
instant the writer is frozen and every process killed, as a power cut
stops everything at once.  Then each journal's bytes past its durable size,
which were never fsynced and so never acknowledged, are torn as a disk may
tear them: 512-byte sectors or 4 KiB pages lost (zeros or garbage), in any
order, the file's size cut or not.  The server restarts; a run passes if it
starts and serves every acknowledged write.

`--root` runs the server of another checkout (a `git archive` of main, say:
not a worktree, which this would fill with __pycache__) for comparison.
Loopback only; every wait is bounded.
"""
import argparse
import http.client
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOURNAL = re.compile(r"journal-\d+\.log\Z")
LISTENING = re.compile(rb"Server listening on \S+:(\d+)")

# The journal writer, with os.fsync noting "path size" in LOG after each
# fsync of a journal: what a power cut cannot take any more.
WRITER = r"""
import os, runpy, sys, time
root, log = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
real_fsync = os.fsync
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def fsync(fd):
    time.sleep(0.002)
    real_fsync(fd)
    path = os.readlink("/proc/self/fd/%d" % fd)
    if "journal-" in path:
        os.write(out, ("%s %d\n" % (path, os.fstat(fd).st_size)).encode())
os.fsync = fsync
sys.argv[0] = os.path.join(root, "persistence.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# server.py, its journal writer started under WRITER.
SERVER = r"""
import os, runpy, sys
root, log = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.path.insert(0, root)
import persistence
persistence.Journal.WRITER_COMMAND = [sys.executable, "-c", %r, root, log, "journal-writer"]
sys.argv[0] = os.path.join(root, "server.py")
runpy.run_path(sys.argv[0], run_name="__main__")
""" % WRITER


def start(command, timeout=30):
    """Start a server; (process, port), or (process, None) if it exited first."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = LISTENING.search(line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()   # drain
            return proc, int(match.group(1)), lines
    return proc, None, lines


def writer_pid(server):
    with open("/proc/%d/task/%d/children" % (server.pid, server.pid)) as f:
        for child in f.read().split():
            with open("/proc/%s/cmdline" % child, "rb") as c:
                if b"journal-writer" in c.read().split(b"\0"):
                    return int(child)
    raise RuntimeError("no journal writer found")


def load(port, acked, stop, seed):
    """PUT unique keys on one connection until `stop`; note each acknowledged one."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    n = 0
    try:
        while not stop.is_set():
            key, value = "c%d-%d" % (seed, n), rng.randbytes(rng.randrange(100, 3000))
            n += 1
            conn.request("PUT", "/kv/" + key, value)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                acked[key] = value
    except (OSError, http.client.HTTPException):
        pass                                # the cut
    finally:
        conn.close()


def power_cut(server):
    """Stop everything at once: the writer frozen first, so that its fsync log is final."""
    writer = writer_pid(server)
    os.kill(writer, signal.SIGSTOP)
    os.killpg(server.pid, signal.SIGKILL)
    os.kill(writer, signal.SIGKILL)
    server.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(writer, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def tear(rng, path, durable):
    """Tear the bytes of `path` past `durable` as a power cut may; a description, or None."""
    with open(path, "rb") as f:
        content = bytearray(f.read())
    if len(content) <= durable:
        return None
    grain = rng.choice([512, 4096])
    cuts = sorted({durable, len(content)} | set(range((durable // grain + 1) * grain,
                                                        len(content), grain)))
    pieces = list(zip(cuts, cuts[1:]))
    how = rng.choice(["the first", "all but the last", "one", "random ones"])
    if how == "the first":
        lost = {0}
    elif how == "all but the last":
        lost = set(range(len(pieces) - 1)) or {0}
    elif how == "one":
        lost = {rng.randrange(len(pieces))}
    else:
        lost = {i for i in range(len(pieces)) if rng.random() < 0.5} or {0}
    garbage = rng.random() < 0.5
    for i in lost:
        a, b = pieces[i]
        content[a:b] = rng.randbytes(b - a) if garbage else bytes(b - a)
    size = len(content)
    if rng.random() < 0.3:                  # the size, too, reached the disk only in part
        size = rng.choice([b for a, b in pieces[max(lost):]])
    with open(path, "wb") as f:
        f.write(content[:size])
    return "%d of %d bytes unsynced, %d-byte %s: %s lost (%s)%s" % (
        len(content) - durable, len(content), grain, "sectors" if grain == 512 else "pages",
        how, "garbage" if garbage else "zeros", ", size cut to %d" % size
        if size < len(content) else "")


def check(port, acked):
    """The acknowledged keys that the restarted server does not serve as acknowledged."""
    wrong = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for key, value in acked.items():
            conn.request("GET", "/kv/" + key)
            response = conn.getresponse()
            if response.read() != value or response.status != 200:
                wrong.append(key)
    finally:
        conn.close()
    return wrong


def one_run(root, seed, directory, log):
    """One power cut and restart; (passed, description)."""
    rng = random.Random(seed)
    server, port, lines = start([sys.executable, "-c", SERVER, root, log,
                                 "--host", "127.0.0.1", "--port", "0", "--working-dir",
                                 directory, "--fsync", "always", "--checkpoint-bytes",
                                 str(rng.choice([1 << 20, 1 << 30]))])
    if port is None:
        return False, "the first start failed: %r" % lines[-3:]
    acked, stop = {}, threading.Event()
    clients = [threading.Thread(target=load, args=(port, acked, stop, seed * 100 + i))
               for i in range(8)]
    for client in clients:
        client.start()
    time.sleep(rng.uniform(0.3, 1.5))
    power_cut(server)
    stop.set()
    for client in clients:
        client.join(30)
    durable = {}
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                path, size = line.rsplit(" ", 1)
                durable[path] = int(size)
    torn = [tear(rng, os.path.join(directory, name),
                 durable.get(os.path.join(directory, name), 0))
            for name in sorted(os.listdir(directory)) if JOURNAL.match(name)]
    torn = "; ".join(t for t in torn if t) or "nothing unsynced to tear"
    again, port, lines = start([sys.executable, os.path.join(root, "server.py"), "--host",
                                "127.0.0.1", "--port", "0", "--working-dir", directory])
    try:
        if port is None:
            again.wait(30)
            errors = [l.decode(errors="replace").strip() for l in lines if b"error" in l]
            return False, "%s -> start refused (exit %s): %s" % (torn, again.returncode,
                                                               errors[-1:] or lines[-1:])
        wrong = check(port, acked)
        return not wrong, "%s -> started, %d acknowledged writes, %d missing" % (
            torn, len(acked), len(wrong))
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait(30)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--root", default=ROOT, help="the checkout whose server runs")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    passed = 0
    for run in range(args.runs):
        work = tempfile.mkdtemp(prefix="kvpowercut-")
        try:
            ok, description = one_run(root, args.seed * 1000 + run,
                                      os.path.join(work, "data"), os.path.join(work, "fsyncs"))
        finally:
            shutil.rmtree(work, True)
        passed += ok
        print("run %2d: %s: %s" % (run + 1, "ok  " if ok else "FAIL", description), flush=True)
    print("%d of %d runs started with every acknowledged write (%s)" % (passed, args.runs, root))
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
