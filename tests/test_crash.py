"""Black-box crash durability: SIGKILL loses no acknowledged write.

Every fsync policy hands each record to the OS before replying, so a killed
process (as opposed to a power loss) loses nothing under any of them: the
kill tests run under `--fsync always`, `everysec` and `no` alike.

Then the journal on disk: a flipped byte in the middle is corruption (refuse
to start, name the file and offset, touch nothing); a torn tail is the trace
of a crash (truncate, log, start).  And with a tiny --checkpoint-bytes,
checkpoints run throughout a write load, a kill lands wherever it lands,
and journals do not pile up.
"""
import base64
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import unittest

from bench.load import burst
from tests import support
from tests.durability_support import (
    TRACEBACK, assert_state, file_state, get_many, journals, record_offsets, round_offset,
    run_cli, stop_within)
from tests.test_batch import body, line

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402


class Op:
    """One write as the client saw it: times, and the outcome (status None = unknown)."""

    __slots__ = ("key", "value", "start", "end", "status")

    def __init__(self, key, value):
        self.key, self.value = key, value          # value None: a DELETE
        self.start, self.end, self.status = time.monotonic(), float("inf"), None


def allowed_states(initial, ops):
    """The states a key may be in after a crash, given the ops sent on it since `initial`.

    The recovered state is that of the last op applied.  An op was applied if
    it was acknowledged (200); one whose outcome is unknown (no response:
    in flight at the kill) may or may not have been, at any moment until the
    kill.  An op C can be the last one applied unless an acknowledged op A
    was sent after C's response arrived (then A was applied after C).  The
    initial state survives only if no op on the key was acknowledged.
    """
    acked = [op for op in ops if op.status == 200]
    allowed = set() if acked else {initial}
    for c in ops:
        if c.status not in (200, None):
            continue                                # refused: never applied
        if any(a.start > c.end for a in acked):
            continue                                # superseded by a later acknowledged op
        allowed.add(c.value)
    return allowed


class KillTests:
    """SIGKILL scenarios, run once per fsync policy (see the subclasses)."""

    fsync = None

    def start(self, *args):
        return self.start_server("--fsync", self.fsync, *args)

    def kill_and_restart(self, server):
        server.kill()
        return self.restart(server)

    def test_puts_overwrites_deletes_and_clear_survive_kills(self):
        server = self.start()
        model = {}

        def put(key, value):
            server.put(key, value)
            model[key] = value

        def delete(key):
            self.assertEqual(server.request("DELETE", "/kv/" + key)[0], 200)
            model[key] = None

        steps = [
            ("puts", lambda: [put("k%d" % i, b"first-%d" % i) for i in range(20)]),
            ("overwrites", lambda: [put("k%d" % i, b"second-%d" % i) for i in range(0, 20, 2)]),
            ("deletes", lambda: [delete("k%d" % i) for i in range(0, 20, 3)]),
            ("binary", lambda: put("bin", bytes(range(256)) * 16)),
            ("clear", lambda: (self.assertEqual(server.request("DELETE", "/clear")[0], 200),
                               model.update(dict.fromkeys(model)))),
            ("after clear", lambda: [put("k%d" % i, b"third-%d" % i) for i in range(5)]),
            ("delete absent, overwrite twice", lambda: (delete("never"), put("k1", b"a"),
                                                         put("k1", b"b"))),
        ]
        for name, step in steps:
            step()
            server = self.kill_and_restart(server)
            assert_state(self, server, model, "after %s and SIGKILL" % name)

    def test_500_sequential_1k_writes(self):
        server = self.start()
        expected = {"seq-%d" % i: (b"%04d" % i) * 256 for i in range(500)}
        conn = server.connection()
        try:
            for key, value in expected.items():
                conn.request("PUT", "/kv/" + key, value)
                resp = conn.getresponse()
                self.assertEqual((resp.status, resp.read()), (200, b""), key)
        finally:
            conn.close()
        server = self.kill_and_restart(server)
        assert_state(self, server, expected)

    def test_random_kills_under_concurrent_puts_and_deletes(self):
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        keys = ["rk-%d" % i for i in range(8)]
        state = dict.fromkeys(keys)
        server = self.start()
        for round_ in range(8):
            ops, stop = [], threading.Event()
            lock = threading.Lock()

            def writer(t, wrng):
                conn, n = None, 0
                while not stop.is_set():
                    key = wrng.choice(keys)
                    value = None if wrng.random() < 0.3 else b"r%d-t%d-%d" % (round_, t, n)
                    n += 1
                    op = Op(key, value)
                    with lock:
                        ops.append(op)
                    try:
                        if conn is None:
                            conn = server.connection(10)
                        if value is None:
                            conn.request("DELETE", "/kv/" + key)
                        else:
                            conn.request("PUT", "/kv/" + key, value)
                        resp = conn.getresponse()
                        resp.read()
                        op.end, op.status = time.monotonic(), resp.status
                    except (OSError, http.client.HTTPException):
                        if conn is not None:
                            conn.close()
                        conn = None
                        if server.proc.poll() is not None:
                            return
                        stop.wait(0.01)             # unexpected while alive: retry calmly

            threads = [threading.Thread(target=writer, args=(t, random.Random(rng.random())))
                       for t in range(4)]
            target = rng.randint(20, 600)            # kill after this many acknowledged ops
            for t in threads:
                t.start()
            try:
                support.wait_until(lambda: sum(o.status == 200 for o in list(ops)) >= target,
                                   30, message="%d acknowledged ops (seed %d)" % (target, seed))
                server.kill()
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            odd = [(o.key, o.status) for o in ops if o.status not in (200, None)]
            self.assertEqual(odd, [], "unexpected statuses (seed %d)" % seed)
            server = self.start()
            actual = get_many(server, keys)
            for key in keys:
                on_key = [o for o in ops if o.key == key]
                allowed = allowed_states(state[key], on_key)
                self.assertIn(actual[key], allowed,
                              "round %d (seed %d), key %s: %d ops, %d acknowledged, %d unknown"
                              % (round_, seed, key, len(on_key),
                                 sum(o.status == 200 for o in on_key),
                                 sum(o.status is None for o in on_key)))
            state = actual
        self.assertEqual(stop_within(server)[0], 0, server.output())


class KillFsyncAlwaysTest(KillTests, support.ServerTestCase):
    fsync = "always"


class KillFsyncEverysecTest(KillTests, support.ServerTestCase):
    fsync = "everysec"


class KillFsyncNoTest(KillTests, support.ServerTestCase):
    fsync = "no"


class AllowedStatesTest(unittest.TestCase):
    """The checker of the random-kill test, on hand-made histories (it must be able to fail)."""

    def op(self, value, start, end, status=200):
        op = Op("k", value)
        op.start, op.end, op.status = start, end, status
        return op

    def test_rules(self):
        a = self.op(b"a", 0, 1)
        b = self.op(b"b", 2, 3)
        self.assertEqual(allowed_states(b"init", [a, b]), {b"b"})
        overlapping = self.op(b"c", 0.5, 2.5)
        self.assertEqual(allowed_states(b"init", [a, b, overlapping]), {b"b", b"c"})
        unknown = self.op(b"u", 4, float("inf"), None)
        self.assertEqual(allowed_states(b"init", [a, b, unknown]), {b"b", b"u"})
        self.assertEqual(allowed_states(b"init", [unknown]), {b"init", b"u"})
        early_unknown = self.op(b"e", -1, float("inf"), None)
        self.assertEqual(allowed_states(None, [early_unknown, a]), {b"a", b"e"})
        delete = self.op(None, 5, 6)
        self.assertEqual(allowed_states(b"init", [a, b, delete]), {None})
        self.assertEqual(allowed_states(b"init", []), {b"init"})


class JournalDamageTest(support.ServerTestCase):

    def killed_with_journal(self, count=10):
        server = self.start_server()
        for i in range(count):
            server.put("key-%d" % i, b"value %d " % i * 10)
        server.kill()
        found = journals(self.data_dir)
        self.assertEqual(len(found), 1, found)
        return server, found[0]

    def test_flipped_byte_in_the_middle_refuses_to_start(self):
        server, journal = self.killed_with_journal()
        with open(journal, "rb") as f:
            buf = bytearray(f.read())
        offsets = record_offsets(buf)
        self.assertEqual(len(offsets), 10)
        # The error names the round that holds the damaged record (one each here).
        for position, expected_offset in ((offsets[5] + 20, round_offset(buf, offsets[5])),
                                          (offsets[3] + 1, round_offset(buf, offsets[3]))):
            with self.subTest(position=position):
                damaged = bytearray(buf)
                damaged[position] ^= 0x20
                with open(journal, "wb") as f:
                    f.write(damaged)
                past = time.time() - 3600
                os.utime(journal, (past, past))
                before = file_state(journal)
                result = run_cli(["--host", "127.0.0.1", "--port", "0",
                                  "--working-dir", self.data_dir])
                self.assertEqual(result.code, 1, result)
                self.assertNotIn(TRACEBACK, result.stdout + result.stderr)
                lines = result.lines("stderr")
                self.assertEqual(len(lines), 1, result)
                self.assertIn(os.path.realpath(journal), lines[0])
                self.assertIn(str(expected_offset), lines[0])
                self.assertEqual(file_state(journal), before, "the damaged journal was modified")

    def test_torn_tail_is_truncated_and_everything_before_it_recovered(self):
        server, _ = self.killed_with_journal()
        expected = {"key-%d" % i: b"value %d " % i * 10 for i in range(10)}
        whole = b"".join(persistence.encode_record(persistence.PUT, "torn", b"T" * 100))
        tails = {
            "half a record": whole[:len(whole) // 2],
            "a header alone": whole[:12],
            "a short piece of garbage": random.Random(3).randbytes(7),
            "zeros": bytes(100),
            "a whole record with a bad last byte": whole[:-1] + bytes([whole[-1] ^ 1]),
            # a write torn out of page order by a power cut: its start lost, its end there
            "a record whose first bytes were lost": bytes(20) + whole[20:],
            "a damaged header, then stale bytes": bytes([whole[0] ^ 4]) + whole[1:] + b"\xee" * 64,
        }
        for n, (name, tail) in enumerate(tails.items()):
            with self.subTest(tail=name):
                journal = journals(self.data_dir)[-1]
                size = os.path.getsize(journal)
                with open(journal, "ab") as f:
                    f.write(tail)
                server = self.start_server()
                number = re.compile(r"(?<!\d)%d(?!\d)" % size)
                logged = [l for l in server.output().splitlines()
                          if os.path.basename(journal) in l and number.search(l)]
                self.assertEqual(len(logged), 1, "torn tail not logged:\n" + server.output())
                expected["torn"] = None
                assert_state(self, server, expected)
                # Let the start-up checkpoint fold the old journals away, then
                # write into the newest one, which the next round damages.
                support.wait_until(lambda: len(journals(self.data_dir)) == 1, 20,
                                   message="one journal after the start-up checkpoint")
                server.put("round-%d" % n, b"r")
                expected["round-%d" % n] = b"r"
                server.kill()


class CheckpointUnderLoadTest(support.ServerTestCase):

    def test_checkpoints_during_writes_then_kill(self):
        server = self.start_server("--checkpoint-bytes", "4096")
        acked, lock, stop = {}, threading.Lock(), threading.Event()
        acks = [0]
        in_flight = {}                   # thread -> (key, value) sent, outcome unknown
        most_journals, generations = [0], set()

        def writer(t):
            conn, n = None, 0
            while not stop.is_set():
                key, value = "cp-%d-%d" % (t, n % 150), b"%d-%d-" % (t, n) * 30
                n += 1
                in_flight[t] = (key, value)
                try:
                    if conn is None:
                        conn = server.connection(10)
                    conn.request("PUT", "/kv/" + key, value)
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    return                          # killed: this one stays in flight
                with lock:
                    del in_flight[t]
                    if resp.status == 200:
                        acked[key] = value
                        acks[0] += 1
                    else:
                        return

        def sampler():
            while not stop.wait(0.002):
                try:
                    found = journals(self.data_dir)
                except OSError:
                    continue
                most_journals[0] = max(most_journals[0], len(found))
                generations.update(found)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
        threads.append(threading.Thread(target=sampler))
        for t in threads:
            t.start()
        try:
            support.wait_until(lambda: len(generations) >= 20 and acks[0] >= 1000, 60,
                               message="20 journal generations (checkpoints) under load")
            server.kill()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        self.assertLessEqual(most_journals[0], 3, "journals accumulate during checkpoints")
        server = self.start_server("--checkpoint-bytes", "4096")
        actual = get_many(server, acked)
        for key, value in in_flight.values():
            if actual.get(key) == value:    # the write in flight at the kill made it: fine
                acked[key] = value
        lost = [k for k, v in acked.items() if actual[k] != v]
        self.assertEqual(lost, [], "%d of %d acknowledged keys wrong" % (len(lost), len(acked)))
        support.wait_until(lambda: len(journals(self.data_dir)) <= 2, 20,
                           message="journals folded into a snapshot after restart")


class BatchKillTest(support.ServerTestCase):
    """SIGKILL while large batches are sent, parsed, journaled: each is there whole, or not at all.

    Batch number g puts KEYS keys to values saying g, and deletes every
    third key (which ones depends on g): a recovered store is the state of
    exactly one batch, one at least as late as the last acknowledged and
    no later than the last sent.  The kill comes when the journal has
    grown by a random number of bytes (a poll, not a timer): before a
    batch's record, in the middle of its write, between two.
    """

    KEYS = 2000
    VALUE = 700         # bytes: a batch is about 2 MB of NDJSON, a 1.3 MB journal record

    def expected(self, generation):
        """{key: value or None} after batch `generation` (None: before the first)."""
        if generation is None:
            return dict.fromkeys(self.keys)
        return {key: None if (i + generation) % 3 == 0 else
                (b"%d/%s/" % (generation, key.encode())).ljust(self.VALUE, b".")
                for i, key in enumerate(self.keys)}

    def batch(self, generation):
        return body(*(line(key, op="delete") if value is None else line(key, value)
                      for key, value in self.expected(generation).items()))

    def recovered(self, server):
        """The generation whose state the server holds (None: no batch); fails for any other."""
        status, _, data = server.request("GET", "/export?prefix=batch/")
        self.assertEqual(status, 200)
        state = dict.fromkeys(self.keys)
        for raw in data.splitlines():
            fields = json.loads(raw)
            state[fields["key"]] = base64.b64decode(fields["value"])
        present = [value for value in state.values() if value is not None]
        generation = int(present[0].split(b"/")[0]) if present else None
        self.assertEqual(state, self.expected(generation), "a batch recovered in part")
        return generation

    def test_batches_killed_at_any_moment_are_whole_or_absent(self):
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        self.keys = ["batch/%04d" % i for i in range(self.KEYS)]
        args = ("--checkpoint-bytes", str(1 << 40))     # one journal: its size says where we are
        server = self.start_server(*args)
        generation, recovered = 0, None
        for round_ in range(6):
            acked, sent, stop = [recovered], [recovered], threading.Event()
            journal = journals(self.data_dir)[-1]

            def writer(first):
                conn = server.connection(30)
                for g in range(first, first + 1000):
                    if stop.is_set():
                        break
                    sent[0] = g
                    try:
                        conn.request("POST", "/batch", self.batch(g))
                        response = conn.getresponse()
                        response.read()
                    except (OSError, http.client.HTTPException):
                        break               # killed: g's outcome unknown
                    if response.status != 200:
                        break
                    acked[0] = g
                conn.close()

            thread = threading.Thread(target=writer, args=(generation,))
            thread.start()
            try:
                target = os.path.getsize(journal) + rng.randrange(1, 6 << 20)
                support.wait_until(lambda: os.path.getsize(journal) >= target
                                   or not thread.is_alive(), 60, 0.001,
                                   "the journal to grow (seed %d)" % seed)
                server.kill()
            finally:
                stop.set()
                thread.join(30)
            server = self.restart(server, *args)
            recovered = self.recovered(server)
            # The last acknowledged (or the state before), or a later one sent.
            allowed = {acked[0]} | {g for g in range(generation, sent[0] + 1)
                                    if acked[0] is None or g > acked[0]}
            self.assertIn(recovered, allowed, "round %d (seed %d): acknowledged %s, sent %s"
                          % (round_, seed, acked[0], sent[0]))
            generation = sent[0] + 1
        self.assertEqual(stop_within(server)[0], 0, server.output())


class BurstKillTest(support.ServerTestCase):

    def test_burst_of_10000_then_sigkill_keeps_every_key(self):
        server = self.start_server()
        n = 10000
        result = burst(server.host, server.port, n=n, timeout=60.0)
        self.assertEqual((result["answered"], result["ok"]), (n, n), "burst: %r" % result)
        server.kill()
        server = self.start_server()
        expected = {"burst-%d" % i: b"value-%d" % i for i in range(n)}
        assert_state(self, server, expected)


if __name__ == "__main__":
    unittest.main()
