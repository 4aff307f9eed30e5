"""The thread-safe dict, and the order in which its changes reach the disk.

`Store` is a dict {str: bytes} behind one lock.  A change is made in two
steps.  (1) Under the lock, the mutation is checked (sealed? its
condition?) and its record queued in the journal; the queue's order is
the order of the mutations, under any concurrency.  (2) The journal's
writer (a process of its own) writes the queued records and, as the
policy says, fsyncs them, together with every other record queued by
then (group commit); then the journal, on its event loop (the server's),
calls apply_round(), which applies that round's records to the dict, in
journal order, under the lock, and only then runs their callbacks (the
server's 200s).  No system call is made under the lock, so one slow fsync never
blocks readers or other writers.

Readers see only the dict: only durable changes.  A write answered with
an error was never visible and is never replayed (the journal cuts it
off).  Writes queued but not yet durable are kept in an overlay
(QueuedWrites) so that QueuedWrites.latest(key), against which conditions
are checked, sees them; when a round fails, it and everything queued
after it fail together and the overlay is dropped (Store.fail_queued), so
that no write checked against a failed one survives it.

Where things live
-----------------
Store has the lock, the public interface and the order of the steps.  The
parts it holds have one job each.  These are called with its lock held
(Tags takes it itself where it hashes outside it):
- Contents: the dict as the durable writes leave it, with the deadlines
  (Expiry), the key index (KeyIndex), the bytes of the values, the
  revision and the last changes (History); apply() applies a round.
- QueuedWrites: the overlay of the writes queued but not yet applied.
- Tags: the tags kept for large values, and the conditions checked on them.
The Checkpointer, on a thread of its own, writes the checkpoints, and the
final snapshot at a stop (save_final); it takes the lock only to switch
journal files (Store.switch_journal).

A record is (op, key, value, extra): extra is a PUT's deadline (ms since
the epoch, None: permanent), or a BATCH's parts, each a record (op, key,
value, deadline) of a PUT or a DELETE (persistence.apply).

Guarantees
----------
- A mutation that returned normally (or whose on_durable got None) is in
  the journal, as durable as the fsync policy promises, and in the dict.
- One that raised (or whose on_durable got an error) is in neither.
- After seal(), every mutation raises Sealed; once the journal is closed
  (save_and_close) the dict no longer changes, and the snapshot taken then
  holds every mutation that ever returned.

Tags and conditional writes
---------------------------
Every value has a tag, value_tag(value), a digest of its bytes: the
server's ETag.  A write may carry a condition on the key's current tag
(compare-and-set); it is checked and the write queued in one critical
section, so of many writers holding the same tag exactly one wins
(Tags.check; the hashing is done before, outside the lock: Tags.seen).
The tags of large values are kept beside them (Tags), so that reading one
does not hash it again; they are not saved: after a restart a tag is
computed again on first use, and comes out the same.

Listing keys in order
---------------------
A dict has no order to page through, and sorting a million keys takes
half a second with the GIL held.  So the first listing starts a sorted
index of the keys (SortedKeys), which every later write keeps up to date
under the lock.  A small store's index is built at once; a large one's in
the background, while listings get KeyIndexBuilding (KeyIndex.build).
A page leaves out the keys whose deadline has passed (KeyIndex.listing).

Checkpoints
-----------
When the journal passes `checkpoint_bytes`, a background thread has a child
process write a new snapshot from the files and drops the old journals,
following the steps (and the crash analysis) in persistence.py.  The lock
is held only to switch journal files; the dict is never copied.  If the
file system has no room for a new snapshot, none is tried: write_problem()
says so (a stop could not save either), and the thread looks again every
few seconds.  At a stop, Store.save_and_close has the Checkpointer write
the final snapshot from the dict itself, frozen by then
(Checkpointer.save_final), unless nothing changed since the last one.
"""

import bisect
import collections
import errno
import hashlib
import heapq
import os
import threading
import time

import persistence
from persistence import BATCH, CLEAR, DELETE, EXPIRE, PUT


class Sealed(Exception):
    """The store is shutting down and accepts no more writes."""


class ConditionFailed(Exception):
    """A conditional write whose condition does not hold: nothing was changed.

    `index`: in a batch, the part whose condition failed.
    """

    def __init__(self, index=None):
        super().__init__(index)
        self.index = index


class NoRoom(OSError):
    """No room for a new snapshot: a checkpoint not even tried (Checkpointer._check_room)."""


class KeyIndexBuilding(Exception):
    """The sorted index of the keys is being built (a large store's first listing): retry."""


# Values at least this large keep their tag in Tags: hashing a
# smaller one (~3 us) costs about what looking its tag up would, and a kept
# tag (~150 bytes) stays under 4% of the value it describes.
TAG_CACHE_MIN_BYTES = 4096


def value_tag(value):
    """The tag of a value: the first 128 bits of its SHA-256, in hex.

    A digest, not a version number kept in the journal and the snapshot:
    it needs no change to the file formats, it is the same after any
    restart without bookkeeping, and it changes exactly when the bytes do.
    SHA-256 because it is the fastest of hashlib's digests on this hardware
    (~0.6 ms per MiB, with the GIL released); 128 bits keep collisions out
    of reach.
    """
    return hashlib.sha256(value).hexdigest()[:32]


class SortedKeys:
    """The keys in order: a list of sorted blocks, each of BLOCK to 2 * BLOCK keys.

    One sorted list would make each new key an insert into a list of them
    all (a memmove of 4 MB on average at a million keys); blocks make it a
    bisect over the blocks' last keys and an insert into one block.  A page
    is a bisect and slices.  Not thread-safe: the store's lock guards it.
    """

    BLOCK = 1000

    def __init__(self, sorted_keys=()):
        keys = list(sorted_keys)
        self._blocks = [keys[i:i + self.BLOCK] for i in range(0, len(keys), self.BLOCK)]
        self._lasts = [block[-1] for block in self._blocks]     # each block's last key

    def add(self, key):
        """Add `key`, if it is not there yet."""
        blocks, lasts = self._blocks, self._lasts
        i = bisect.bisect_left(lasts, key)
        if i == len(lasts):                     # after every key: the last block
            if not blocks:
                blocks.append([key])
                lasts.append(key)
                return
            i -= 1
            blocks[i].append(key)
            lasts[i] = key
        else:
            block = blocks[i]
            j = bisect.bisect_left(block, key)
            if block[j] == key:
                return
            block.insert(j, key)
        block = blocks[i]
        if len(block) > 2 * self.BLOCK:         # split it in two
            blocks.insert(i + 1, block[self.BLOCK:])
            del block[self.BLOCK:]
            lasts[i:i + 1] = [block[-1], blocks[i + 1][-1]]

    def remove(self, key):
        """Remove `key`, if it is there."""
        blocks, lasts = self._blocks, self._lasts
        i = bisect.bisect_left(lasts, key)
        if i == len(lasts):
            return
        block = blocks[i]
        j = bisect.bisect_left(block, key)
        if block[j] != key:
            return
        del block[j]
        if not block:
            del blocks[i], lasts[i]
        elif j == len(block):
            lasts[i] = block[-1]

    def page(self, prefix, after, count):
        """Up to `count` keys in order, each starting with `prefix` and greater than `after`."""
        if prefix > after:
            bound, find = prefix, bisect.bisect_left        # from the first key >= prefix
        else:
            bound, find = after, bisect.bisect_right        # from the first key > after
        blocks, keys = self._blocks, []
        i = find(self._lasts, bound)
        j = find(blocks[i], bound) if i < len(blocks) else 0
        while i < len(blocks) and len(keys) < count:
            keys += blocks[i][j:j + count - len(keys)]
            i, j = i + 1, 0
        if keys and not keys[-1].startswith(prefix):
            # The keys with the prefix come first: cut at the first without it.
            del keys[bisect.bisect_left(keys, True, key=lambda k: not k.startswith(prefix)):]
        return keys


def sorted_in_runs(keys, run=10000):
    """`keys` (a list) in order, as an iterator, without holding the GIL for long.

    sorted() of a million keys holds it for half a second, stalling every
    other thread (the event loop); runs of `run` keys take ~5 ms each, and
    heapq.merge yields them in order one at a time.
    """
    runs = [sorted(keys[start:start + run]) for start in range(0, len(keys), run)]
    return heapq.merge(*runs)


class KeyIndex:
    """The store's keys in order, made for the first listing and kept up to date after it.

    Called with the store's lock held, except build(), which a thread of
    its own runs for a large store (see "Listing keys in order" above).
    """

    # A first listing of up to this many keys sorts them at once (~10 ms);
    # a larger store's index is built in the background.
    AT_ONCE = 20000
    RUN = 10000                 # keys sorted at once by the background build (~5 ms)

    def __init__(self, data, lock):
        self._data, self._lock = data, lock
        self._sorted = None     # SortedKeys, once a listing has asked for it and it is built
        self._log = None        # while it is built: the keys written since its copy
        self._cleared = False   # ... and whether a CLEAR came since

    def page(self, prefix, after, count):
        """Up to `count` keys in order after `after` with `prefix`; KeyIndexBuilding meanwhile."""
        if self._sorted is None:
            if self._log is None:
                self._start()
            if self._sorted is None:
                raise KeyIndexBuilding()
        return self._sorted.page(prefix, after, count)

    def under(self, prefix):
        """The keys that start with `prefix`, in order; None while the index is being built.

        For a delete by prefix: a scan of the dict, under the lock and on
        the loop, took 55 ms a million keys for each DELETE /kv?prefix=,
        matching or not; one client repeating it made others' GETs wait
        50 ms (p50).  The index makes it a bisect and the keys found.
        """
        if self._sorted is None:
            if self._log is None:
                self._start()
            if self._sorted is None:
                return None
        keys, after = [], ""
        while True:
            found = self._sorted.page(prefix, after, self.RUN)
            keys += found
            if len(found) < self.RUN:       # the last page, or cut at a key without the prefix
                return keys
            after = found[-1]

    def listing(self, prefix, after, limit, unexpired):
        """(keys, more): up to `limit` keys in order after `after` with `prefix`, expired ones out.

        `unexpired(keys)` leaves out the keys whose deadline has passed
        (Expiry.unexpired); pages are taken until `limit` + 1 are left, or
        none follow: `more` is True if other such keys follow.
        """
        keys = []
        while len(keys) <= limit:
            wanted = limit + 1 - len(keys)
            found = self.page(prefix, after, wanted)
            if found:
                after = found[-1]
            keys += unexpired(found)
            if len(found) < wanted:
                break
        return keys[:limit], len(keys) > limit

    def _start(self):
        keys = list(self._data)         # the one O(n) step under the lock: a copy
        if len(keys) <= self.AT_ONCE:
            self._sorted = SortedKeys(sorted(keys))
        else:
            self._log, self._cleared = set(), False
            threading.Thread(target=self.build, args=(keys,), name="key-index",
                             daemon=True).start()

    def build(self, keys):
        """The background build: sort the keys copied at its start, then catch up, under the lock.

        Sorted in runs of RUN keys (sorted_in_runs): no step holds the GIL
        for long, and none holds the lock.  The writes made meanwhile are
        logged (note); at the end each logged key is added to or removed
        from the index as the dict says, and the index is in use from then on.
        """
        index = SortedKeys(sorted_in_runs(keys, self.RUN))
        with self._lock:
            if self._cleared:
                index = SortedKeys()
            for key in self._log:
                if key in self._data:
                    index.add(key)
                else:
                    index.remove(key)
            self._sorted, self._log = index, None

    def note(self, op, key):
        """A change about to be applied to the dict (op, key): keep the order, or log it."""
        index = self._sorted
        if index is not None:
            if op == PUT:
                if key not in self._data:
                    index.add(key)
            elif op != CLEAR:           # DELETE, EXPIRE
                if key in self._data:
                    index.remove(key)
            else:
                self._sorted = SortedKeys()
        elif self._log is not None:     # being built: log the key
            if op == CLEAR:
                self._log.clear()
                self._cleared = True
            else:
                self._log.add(key)


class Checkpointer:
    """The snapshots of a store: its checkpoints, from a thread of their own, and the final save.

    A write asks for a checkpoint (request_if_due) when the journal passes
    `checkpoint_bytes`; the thread then has a child process write a new
    snapshot from the files and drops the old journals, following the steps
    (and the crash analysis) in persistence.py.  The store's lock is held
    only for the switch of journal files (Store.switch_journal).  At a stop,
    Store.save_and_close has the last snapshot written (save_final), from
    the dict itself, frozen by then.  See "Checkpoints" above.
    """

    # Seconds before a checkpoint that failed for lack of room is tried
    # again: doubled after each one that got as far as writing, up to the max.
    ROOM_RETRY, ROOM_RETRY_MAX = 5.0, 300.0

    def __init__(self, store, checkpoint_bytes, log):
        self._store, self._log = store, log
        self.checkpoint_bytes = checkpoint_bytes
        self.lock = threading.Lock()    # one checkpoint, or the final save, at a time
        self._wanted = threading.Event()
        self.done = 0                   # written since start, for /metrics
        self.failures = 0
        self.room_problem = None        # why checkpoints fail for lack of room, if they do
        self.keep_open_in_child = ()    # fds a checkpoint's child inherits (the LOCK's)
        threading.Thread(target=self._loop, name="checkpointer", daemon=True).start()

    def request(self):
        """Ask the thread for a checkpoint (the journal is full, or journals were replayed)."""
        self._wanted.set()

    def request_if_due(self):
        """A write was queued: ask for a checkpoint if the journal passed `checkpoint_bytes`."""
        if self._store.journal.size >= self.checkpoint_bytes:
            self.request()

    def checkpoint(self):
        """Write a new snapshot from the files and drop the journals it holds.

        Requests go on while it runs: the store lock is held only for step
        b, and step c runs in a child process (persistence.snapshot_in_child)
        that builds the new snapshot from the previous one and the journals
        <= N, never from the live dict.  Raises OSError if the snapshot
        cannot be written; the journals then stay, so nothing is lost.
        NoRoom, before any file is made, if the snapshot cannot fit.
        """
        store = self._store
        journal = store.journal
        with self.lock:
            if store.sealed or journal.failed:
                return
            self._check_room()
            covered = store.switch_journal(journal.prepare_next())    # a. and b.
            # Journal `covered` gets its last records (any that failed are
            # cut off), its fsync, and is closed: it is complete on disk.
            journal.sync()
            started = time.monotonic()
            store.check_directory()
            keys, size = persistence.snapshot_in_child(                   # c.
                store.directory, covered, self.keep_open_in_child)
            store.check_directory()
            persistence.remove_journals(store.directory, covered)         # d.
            self.done += 1
            store.last_checkpoint_time = time.time()
            self._log("Checkpoint: %d keys, %d bytes written in %.2f s; journals <= %d removed"
                      % (keys, size, time.monotonic() - started, covered))

    def save_final(self, data, ledger):
        """The store is sealed: close the journal, write the final snapshot, drop the journals.

        `data` and `ledger` are the store's, which no longer change once the
        journal is closed.  Waits for a checkpoint in progress, then for the
        journal's last round: once it is closed the dict holds exactly the
        writes that were acknowledged.  Returns the snapshot's size.  If
        nothing was written since the snapshot was saved, it is not
        rewritten.  Raises OSError, its text saying what is kept, if the
        snapshot cannot be written: the previous snapshot and the journals
        are then left as they were, so the next start still recovers
        everything; or, if the data directory is no longer this server's
        (removed or replaced), without writing anything anywhere.
        """
        store = self._store
        journal = store.journal
        with self.lock:
            journal.close()             # what is queued reaches the disk, or fails
            try:
                store.check_directory()
            except OSError as e:        # e.strerror: what became of the directory
                raise OSError(errno.ENOENT, "nothing was saved: %s while the server ran, and "
                              "the %d keys in memory are lost with this process; the writes "
                              "acknowledged before that are in the files it had (deleted, or "
                              "moved with it), none after it was noticed"
                              % (e.strerror, len(data))) from None
            if self._unchanged(data):
                size = self._keep_snapshot()
            else:
                size = self._write_snapshot(data, ledger)
                store.last_checkpoint_time = time.time()
            persistence.remove_journals(store.directory, journal.generation)
        self._log("Journal: %d records, %d fsyncs since start (--fsync %s)"
                  % (journal.records, journal.fsyncs, journal.policy))
        return size

    def _unchanged(self, data):
        """True if the snapshot on disk holds `data`: no record since, in any journal."""
        directory = self._store.directory
        return (self._store.journal.records == 0
                and (not data or os.path.exists(persistence.snapshot_path(directory)))
                and all(persistence.journal_is_empty(persistence.journal_path(directory, g))
                        for g in persistence.journal_generations(directory)))

    def _keep_snapshot(self):
        path = persistence.snapshot_path(self._store.directory)
        self._log("Snapshot %s unchanged: nothing was written since it was saved" % path)
        return os.path.getsize(path) if os.path.exists(path) else 0

    def _write_snapshot(self, data, ledger):
        """The final snapshot; OSError, saying what the journal still holds, if it fails."""
        journal = self._store.journal
        try:
            return persistence.write_snapshot(self._store.directory, data, ledger,
                                              journal.generation)
        except OSError as e:
            vanished = journal.vanished
            kept = ("but %s while the server ran: the writes it held are lost" % vanished
                    if vanished else "the journal still holds every acknowledged write: "
                    "the next start recovers them")
            raise OSError(e.errno, "%s; %s" % (e.strerror or e, kept)) from e

    def _check_room(self):
        """Raise NoRoom unless the file system has room for a new snapshot (as far as it says).

        The estimate is low (the values, and a few bytes a key): a
        checkpoint that is sure to fail makes no journal file and starts no
        child, and does not fill the disk that the journal writes to.
        """
        store = self._store
        needed = store.value_bytes + 8 * len(store)
        free = persistence.free_bytes(store.directory)
        if free is not None and free < needed:
            raise NoRoom(errno.ENOSPC, "a new snapshot needs about %d bytes, %d are free"
                         % (needed, free))

    def _loop(self):
        pause = self.ROOM_RETRY
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._store.sealed:
                return
            try:
                self.checkpoint()
            except OSError as e:
                self.failures += 1
                if e.errno not in persistence.STORAGE_FULL:
                    self._log("Checkpoint failed, journal kept: %s" % e)
                    continue                    # again when the next journal is full
                self._no_room(e)
                time.sleep(pause)
                if not isinstance(e, NoRoom):
                    pause = min(2 * pause, self.ROOM_RETRY_MAX)
                self._wanted.set()              # try again, writes or not: /health waits
            else:
                pause = self.ROOM_RETRY
                if self.room_problem and not self._store.journal.failed:
                    self.room_problem = None
                    self._log("Checkpoints have room again")

    def _no_room(self, error):
        """A checkpoint failed for lack of room: say so once (log, /health), until one succeeds."""
        if self.room_problem is None:
            self._log("Checkpoint failed, journal kept: %s; the journals keep every write, but "
                      "until there is room a stop cannot save either" % error)
        self.room_problem = ("no room for a checkpoint (%s): the journals grow, and a stop "
                             "cannot save" % (error.strerror or error))


def now_ms():
    """Wall-clock time in milliseconds since the epoch: the unit of a key's deadline."""
    return int(time.time() * 1000)


class Expiry:
    """The keys' deadlines, and which have passed: reads hide them, the sweep journals them.

    `deadlines` is the ledger's {key: ms}, changed only as records are
    applied.  The heap holds (ms, key) for each deadline set; an entry is
    stale (skipped when popped) once the key's deadline is another.  Not
    thread-safe: the store's lock guards it.
    """

    def __init__(self, deadlines):
        self.deadlines = deadlines
        self._heap = [(ms, key) for key, ms in deadlines.items()]
        heapq.heapify(self._heap)
        self.expired = 0                # keys expired since start, for /metrics

    def passed(self, key, now=None):
        """True if `key` has a deadline and it has passed: it is gone for every request."""
        ms = self.deadlines.get(key)
        return ms is not None and ms <= (now_ms() if now is None else now)

    def unexpired(self, keys):
        """`keys` less those whose deadline has passed (`keys` itself if no key has one)."""
        if not self.deadlines:
            return keys
        now = now_ms()
        return [key for key in keys if not self.passed(key, now)]

    def noted(self, key, ms):
        """A record applied gave `key` the deadline `ms` (persistence.apply put it in
        `deadlines`): the sweep looks at the key then."""
        heapq.heappush(self._heap, (ms, key))

    def cleared(self):
        """A CLEAR applied (persistence.apply emptied `deadlines`): nothing is due."""
        self._heap = []

    def due(self, now, limit, queued):
        """Up to `limit` keys whose deadline has passed, taken off the heap.

        A stale entry (the key's deadline is another now) is dropped, and
        so is a key in `queued` (the store's queued writes): the write
        changes its deadline, or pushes it back (again) if it fails.
        """
        heap, keys = self._heap, {}
        while heap and heap[0][0] <= now and len(keys) < limit:
            ms, key = heapq.heappop(heap)
            if self.deadlines.get(key) == ms and key not in queued:
                keys[key] = ms
        return list(keys)

    def again(self, key):
        """A write of `key` that failed (its round did): its deadline, if any, stands again."""
        ms = self.deadlines.get(key)
        if ms is not None:
            heapq.heappush(self._heap, (ms, key))


class History:
    """The last changes applied, by revision: what a watch since revision R asks about.

    Each entry is (revision, key), or (revision, None) for a CLEAR.  Only
    the last MAX entries are kept; `floor` is the revision before which
    changes are no longer known (at start: the revision loaded).
    """

    MAX = 10000

    def __init__(self, revision):
        self.entries = collections.deque()
        self.floor = revision

    def add(self, revision, key):
        if len(self.entries) >= self.MAX:
            self.floor = self.entries.popleft()[0]
        self.entries.append((revision, key))

    def changed_since(self, prefix, since):
        """True if a key under `prefix` changed after revision `since`, or it is not known."""
        if since < self.floor:
            return True
        for revision, key in reversed(self.entries):
            if revision <= since:
                return False
            if key is None or key.startswith(prefix):
                return True
        return False


class Contents:
    """The dict as the durable writes leave it, and what is kept beside it; apply() changes them.

    The values (`data`), their deadlines (`expiry`), the keys in order once
    a listing asks (`keys`), the bytes of the values (`value_bytes`), the
    revision and the deadlines saved with them (`ledger`), and the last
    changes (`history`).  Not thread-safe: the store's lock guards it.
    """

    def __init__(self, data, ledger, lock):
        self.data, self.ledger = data, ledger
        self.expiry = Expiry(ledger.deadlines)
        self.keys = KeyIndex(data, lock)
        self.history = History(ledger.revision)
        self.value_bytes = sum(map(len, data.values()))     # for /metrics

    def visible(self, key):
        """The value of `key`, None if absent or expired."""
        return self.read(key)[0]

    def read(self, key):
        """(value, deadline, revision) of `key`; value None if absent or expired (Store.read).

        The path of every GET: one dict lookup when no key expires."""
        value, deadlines = self.data.get(key), self.expiry.deadlines
        deadline = deadlines.get(key) if deadlines else None
        if deadline is not None and deadline <= now_ms():
            value = None
        return value, deadline, self.ledger.revision

    def cut(self):
        """(data, deadlines, revision): shallow copies of the dict and deadlines (Store.cut)."""
        return dict(self.data), dict(self.expiry.deadlines), self.ledger.revision

    def apply(self, records):
        """A durable round's `records`, in journal order.  Returns (keys changed, cleared?)."""
        changed, everything = [], False
        ledger, history = self.ledger, self.history
        for record in records:
            ledger.revision += 1
            if record[0] == BATCH:
                for part in record[3]:
                    self._apply(part)
                    history.add(ledger.revision, part[1])
                    changed.append(part[1])
            elif record[0] == CLEAR:
                self._apply(record)
                history.add(ledger.revision, None)
                everything = True
            else:
                self._apply(record)
                history.add(ledger.revision, record[1])
                changed.append(record[1])
        return changed, everything

    def _apply(self, record):
        """One record (or a batch's part) to the dict, the index, the deadlines and the counts."""
        op, key, value, extra = record
        data = self.data
        if op == CLEAR:
            self.value_bytes = 0
            self.expiry.cleared()
        else:
            old = data.get(key)
            self.value_bytes += len(value) - (len(old) if old is not None else 0)
            if op == PUT and extra is not None:
                self.expiry.noted(key, extra)
            elif op == EXPIRE:
                self.expiry.expired += 1
        self.keys.note(op, key)
        persistence.apply(data, op, key, value, extra, self.ledger)     # and its deadline


class QueuedWrites:
    """The writes queued in the journal but not yet applied: the overlay that conditions see.

    The dict holds only the writes applied (durable), but a conditional
    write must be checked against every write queued before it, durable or
    not yet (latest).  So each queued record, or batch part, is kept by key
    until it is applied, and the newest queued CLEAR until it is.  When a
    round fails, it and everything queued after it fail together, and the
    overlay is dropped (drop): no write checked against a failed one
    survives it.  Not thread-safe: the store's lock guards it.
    """

    def __init__(self, revision, visible):
        self._records = {}          # key -> its newest queued record or batch part
        self.clear_record = None    # the newest queued CLEAR record
        self.revision = revision    # the revision of the newest queued record
        self._visible = visible     # key -> its value in the dict, None if absent or expired

    def __contains__(self, key):
        """True if a queued write changes `key` (a queued CLEAR aside)."""
        return key in self._records

    def present_under(self, prefix, data, indexed=None):
        """The keys under `prefix`, in order, present once the queued writes are applied.

        `indexed`: the dict's keys under `prefix` (KeyIndex.under), or None:
        then `data`, the dict, is scanned (about 60 ms a million keys).
        """
        keys = set(indexed) if indexed is not None else {
            key for key in data if key.startswith(prefix)}
        keys.update(key for key in self._records if key.startswith(prefix))
        return [key for key in sorted(keys) if self.latest(key) is not None]

    def latest(self, key):
        """The value of `key` once every write queued so far is applied (None: absent).

        The newest queued record of the key wins (absent if it deletes it,
        or sets a deadline that has passed); else a queued CLEAR means
        absent; else the dict.
        """
        record = self._records.get(key)
        if record is not None:
            if record[0] != PUT or (record[3] is not None and record[3] <= now_ms()):
                return None
            return record[2]
        if self.clear_record is not None:
            return None
        return self._visible(key)

    def add(self, record):
        """`record` was queued in the journal; returns the revision it will have once applied."""
        op = record[0]
        if op == CLEAR:
            self._records.clear()
            self.clear_record = record
        elif op == BATCH:
            for part in record[3]:
                self._records[part[1]] = part
        else:
            self._records[record[1]] = record
        self.revision += 1
        return self.revision

    def applied(self, records):
        """A round's `records` are in the dict: no longer queued, but for the keys queued since."""
        for record in records:
            for part in record[3] if record[0] == BATCH else (record,):
                if part[0] == CLEAR:
                    if self.clear_record is part:
                        self.clear_record = None
                elif self._records.get(part[1]) is part:
                    del self._records[part[1]]

    def drop(self, revision):
        """A round failed: forget every queued write; the newest revision is the dict's again.

        Returns the keys they changed: their deadlines must be looked at again.
        """
        keys = list(self._records)
        self._records.clear()
        self.clear_record = None
        self.revision = revision
        return keys


class Tags:
    """The tags of the keys' values (value_tag), and the conditions on them.

    The tags of large values are kept beside them (TAG_CACHE_MIN_BYTES), so
    that reading one does not hash it again; they are not saved.  A value
    is hashed outside the store's lock wherever it can be (seen, tag): a
    large value takes ~0.6 ms a MiB, and readers and writers would wait.
    Every other method is called with the lock held.  `latest` is the
    key's value once the queued writes are applied (QueuedWrites.latest).
    """

    def __init__(self, lock, latest):
        self._lock, self._latest = lock, latest
        self._kept = {}         # key -> (value, its tag), for values of >= TAG_CACHE_MIN_BYTES

    def kept(self, key):
        """Under the lock: (value, tag) kept for `key`, or None; for tag(), outside it."""
        return self._kept.get(key)

    def tag(self, key, value, kept):
        """The tag of `value`, read from `key` with `kept` its kept tag; hashed outside the lock."""
        if kept is not None and kept[0] is value:
            return kept[1]
        tag = value_tag(value)
        if len(value) >= TAG_CACHE_MIN_BYTES:
            with self._lock:
                if self._latest(key) is value:  # else a newer write keeps its own tag
                    self._kept[key] = (value, tag)
        return tag

    def seen(self, key):
        """(value, tag) of the key's latest value, (None, None) if absent: for check().

        The value is read under the lock, and hashed outside it.
        """
        with self._lock:
            value = self._latest(key)
            kept = self._kept.get(key)
        if value is None:
            return None, None
        return value, self.tag(key, value, kept)

    def check(self, key, condition, seen):
        """Under the lock: raise ConditionFailed unless condition(tag of the key's latest value).

        `seen` is (value, tag) as read just before the lock was taken
        (seen()), so that the hashing is done outside it.  If another write
        has changed the key since, the new value's tag is the one that
        write kept, or is hashed here: a small value (a few us), or a large
        one written without its tag (the server always passes it).
        """
        value = self._latest(key)
        tag = seen[1] if value is seen[0] else self._current(key, value)
        if not condition(tag):
            raise ConditionFailed()

    def check_parts(self, parts, conditions):
        """Under the lock: raise ConditionFailed(index) at the first part whose condition fails.

        Each is checked against the key as the queued writes and the parts
        before it leave it.  Hashed under the lock: batches with conditions
        are rare, and their values small.
        """
        seen = {}
        for index, (part, condition) in enumerate(zip(parts, conditions)):
            op, key, value = part[0], part[1], part[2]
            if condition is not None:
                latest = seen[key] if key in seen else self._latest(key)
                if not condition(self._current(key, latest)):
                    raise ConditionFailed(index)
            seen[key] = value if op == PUT else None

    def _current(self, key, value):
        """Under the lock: the tag of `value` (None: absent) in `key`: kept, or hashed here."""
        if value is None:
            return None
        kept = self._kept.get(key)
        return kept[1] if kept is not None and kept[0] is value else value_tag(value)

    def keep(self, record, tag):
        """Under the lock: `record` queued; keep the tag of a large new value, forget the old's.

        `tag`: value_tag of a PUT's value, if the writer has it; else None.
        """
        op, key, value = record[0], record[1], record[2]
        if op == CLEAR:
            self._kept.clear()
        elif tag is not None and len(value) >= TAG_CACHE_MIN_BYTES:
            self._kept[key] = (value, tag)
        elif self._kept:
            for part in record[3] if op == BATCH else (record,):
                self._kept.pop(part[1], None)

    def clear(self):
        """Under the lock: the queued writes failed, and the tags kept may be of their values."""
        self._kept.clear()


class Store:
    """The dict, its one lock, and the order of its changes: see the module docstring."""

    def __init__(self, data, journal, checkpoint_bytes, log, ledger=None):
        self._journal = journal
        ledger = persistence.Ledger() if ledger is None else ledger
        self._lock = threading.Lock()   # guards _contents, _queued, _tags, _sealed, journal.append
        self._contents = contents = Contents(data, ledger, self._lock)
        self._queued = QueuedWrites(ledger.revision, contents.visible)
        self._tags = Tags(self._lock, self._queued.latest)
        self._listeners = []
        self._sealed = False
        self._log = log
        self.directory = journal.directory
        self.last_checkpoint_time = None    # time.time() of this run's last snapshot written
        self.fatal = threading.Event()  # set when the journal fails for good: shut down
        self._identity = persistence.directory_identity(self.directory)
        journal.attach(self, log)       # apply_round, fail_queued, journal_failed
        self.checkpointer = Checkpointer(self, checkpoint_bytes, log)

    def __len__(self):
        return len(self._contents.data)

    @property
    def journal(self):
        """The open journal, for its counters (size, records, fsyncs): read them, nothing more."""
        return self._journal

    @property
    def revision(self):
        """The revision of the dict: mutations applied (durable) since the store began."""
        return self._contents.ledger.revision

    @property
    def value_bytes(self):
        """Bytes of all the values in the dict (for /metrics)."""
        return self._contents.value_bytes

    @property
    def expiring(self):
        """Keys that have a deadline (for /metrics)."""
        return len(self._contents.expiry.deadlines)

    @property
    def expired(self):
        """Keys expired since start (for /metrics)."""
        return self._contents.expiry.expired

    def listen(self, changed):
        """Call changed(keys, everything), on the journal's loop, after each round applied.

        `keys`: the keys the round changed; `everything`: True if it
        cleared the store.  It must not block, nor raise.
        """
        self._listeners.append(changed)

    def write_problem(self):
        """None while the storage is sound, else why not (for /health and metrics).

        Why writes fail (a full disk, a failed journal), or why checkpoints
        do: no room for a new snapshot, so that a stop could not save
        either, and the journals grow until there is room.
        """
        return self._journal.problem or self.checkpointer.room_problem

    def storage_failure(self):
        """None, or why the storage failed for good: a stop then exits 1, saved or not.

        An fsync error, a dead journal writer, the data directory or a
        journal file removed or replaced under the server.
        """
        return self._journal.problem if self._journal.failed else None

    # -- reads --------------------------------------------------------------

    def get(self, key):
        """The value of `key`, or None."""
        with self._lock:
            return self._contents.visible(key)

    def read(self, key):
        """(value, tag, deadline, revision) of `key`: (None, None, None, revision) if absent.

        `deadline`: when it expires (ms since the epoch), None if never;
        `revision`: the store's, as of this read.
        """
        tags = self._tags
        with self._lock:
            value, deadline, revision = self._contents.read(key)
            kept = tags.kept(key)
        if value is None:
            return None, None, None, revision
        return value, tags.tag(key, value, kept), deadline, revision

    def cut(self):
        """(data, deadlines, revision) at one instant: every write applied, and so durable.

        Shallow copies, made under the lock: the values are shared, and
        never change, since writes replace them.  Keys whose deadline has
        passed are in them (their expiry is not applied yet): the caller
        drops them, by their deadline.
        """
        with self._lock:
            return self._contents.cut()

    def copy(self):
        """(data, ledger) at one instant, for a backup: see cut()."""
        data, deadlines, revision = self.cut()
        return data, persistence.Ledger(revision, deadlines)

    def get_tagged(self, key):
        """(value, value_tag(value)) of `key`, or (None, None)."""
        return self.read(key)[:2]

    def keys_page(self, prefix="", after="", limit=1000):
        """(keys, more): up to `limit` keys in order, each > `after` and starting with `prefix`.

        `more` is True if other such keys follow.  Expired keys are left
        out.  Raises KeyIndexBuilding while a large store's first listing
        builds the index.
        """
        with self._lock:
            return self._contents.keys.listing(prefix, after, limit,
                                               self._contents.expiry.unexpired)

    def changed_since(self, prefix, since):
        """True if a key under `prefix` changed after revision `since` (or it is not known)."""
        with self._lock:
            return self._contents.history.changed_since(prefix, since)

    # -- writes: each returns the revision the mutation will have once applied.

    def put(self, key, value, on_durable=None, tag=None, condition=None, deadline=None):
        """Set `key`, until `deadline` (ms since the epoch; None: for good).

        `tag`: value_tag(value), if the caller has it.  `condition`: see _mutate.
        """
        return self._mutate((PUT, key, value, deadline), on_durable, tag, condition)

    def delete(self, key, on_durable=None, condition=None):
        return self._mutate((DELETE, key, b"", None), on_durable, None, condition)

    def clear(self, on_durable=None):
        return self._mutate((CLEAR, "", b"", None), on_durable)

    def _mutate(self, record, on_durable, tag=None, condition=None):
        """Queue a change; it is applied once durable.  Raises Sealed, ConditionFailed, or OSError.

        Without `on_durable`, returns once the change is durable and applied
        (raises OSError if it cannot be made durable).  With it, returns at
        once, and the journal calls on_durable(None), on its loop, once
        the change is durable and applied, or on_durable(error) if it never
        will be.  With `condition`, the change is made only if
        condition(tag) is true, `tag` being the tag of the key's latest
        value (None: the key is absent); else ConditionFailed.  OSError at
        once: the journal has failed for good.
        """
        key = record[1]
        seen = self._tags.seen(key) if condition is not None else None
        with self._lock:
            if self._sealed:
                raise Sealed()
            if condition is not None:
                self._tags.check(key, condition, seen)
            revision = self._queue(record, on_durable, tag)
        self._after_queue(on_durable)
        return revision

    def batch(self, parts, conditions, on_durable=None):
        """Queue `parts` (records of PUTs and DELETEs) as one mutation: all or none, in order.

        `conditions`: for each part, None or condition(tag) as in _mutate,
        checked against the key as the parts before it leave it.  Raises
        ConditionFailed(index of the first that fails), Sealed or OSError,
        having queued nothing.
        """
        with self._lock:
            if self._sealed:
                raise Sealed()
            self._tags.check_parts(parts, conditions)
            revision = self._queue((BATCH, "", b"", tuple(parts)), on_durable)
        self._after_queue(on_durable)
        return revision

    def delete_prefix(self, prefix, on_durable=None):
        """Delete every key under `prefix` as one mutation.  Returns (keys deleted, revision).

        The keys are those the writes queued so far leave, found under the
        lock in the key index (KeyIndex.under), or while it is being built
        by a scan of the dict (QueuedWrites.present_under).  With
        none, nothing is queued: on_durable is called once what is queued
        already is durable.
        """
        with self._lock:
            if self._sealed:
                raise Sealed()
            contents = self._contents
            parts = [(DELETE, key, b"", None) for key in self._queued.present_under(
                prefix, contents.data, contents.keys.under(prefix))]
            revision = self._queued.revision
            if parts:
                revision = self._queue((BATCH, "", b"", tuple(parts)), on_durable)
        if not parts and on_durable is not None:
            self._journal.when_durable(on_durable)
        self._after_queue(on_durable)
        return len(parts), revision

    def expire_due(self, limit):
        """Journal the expiry of up to `limit` keys whose deadline has passed; returns how many.

        Called by the server, on the loop, a few times a second and again
        at once while more are due: the cost per call is bounded.  A key
        that a queued write changes is left to that write.
        """
        now = now_ms()
        with self._lock:
            if self._sealed or self._queued.clear_record is not None:
                return 0
            keys = self._contents.expiry.due(now, limit, self._queued)
            for key in keys:
                self._queue((EXPIRE, key, b"", None), None)
        if keys:
            self._journal.when_durable(lambda error: None)     # a round now, not at the next write
        return len(keys)

    def _queue(self, record, on_durable, tag=None):
        """Under the lock: hand `record` to the journal, then to the queued writes and the tags.

        `tag`: a PUT's value's, if the writer has it (Tags.keep).
        """
        self._journal.append(record, on_durable)
        self._tags.keep(record, tag)
        return self._queued.add(record)

    def _after_queue(self, on_durable):
        """After a write is queued, without the lock: a checkpoint if the journal is full; wait."""
        self.checkpointer.request_if_due()
        if on_durable is None:
            self._journal.commit()      # from a thread other than the journal's loop

    # -- the journal's owner interface (Journal.attach) -----------------------

    def apply_round(self, records):
        """The journal, on its loop, once `records` are durable: apply them, in order."""
        with self._lock:
            changed, everything = self._contents.apply(records)
            self._queued.applied(records)
        for listener in self._listeners:
            listener(changed, everything)

    def journal_failed(self, error):
        """The journal, on the loop: it has failed for good (an fsync error): shut down."""
        self.fatal.set()

    def fail_queued(self):
        """The journal, on its loop, after a failed round: fail every queued write too.

        Returns their callbacks.  A write queued after the failed ones may
        have been checked against them (QueuedWrites.latest), so it cannot
        stand.  A failed expiry is tried again by the sweep.
        """
        with self._lock:
            for key in self._queued.drop(self._contents.ledger.revision):
                self._contents.expiry.again(key)
            self._tags.clear()          # may hold tags of values never applied
            return self._journal.drop_queued()

    # -- checkpoints and shutdown --------------------------------------------

    def switch_journal(self, generation):
        """Checkpoint step b, under the lock: new writes go to journal `generation`."""
        with self._lock:
            return self._journal.switch(generation)

    @property
    def sealed(self):
        return self._sealed

    def check_directory(self):
        """Raise OSError if the data directory is no longer this server's: write nothing there."""
        gone = persistence.directory_replaced(self.directory, self._identity)
        if gone:
            raise OSError(errno.ENOENT, gone)

    def seal(self):
        """Refuse every write from now on; the dict is frozen."""
        with self._lock:
            self._sealed = True

    def save_and_close(self):
        """After seal(): close the journal, write the final snapshot, then drop the journals.

        Returns the snapshot's size; raises OSError, saying what is kept, if
        it cannot be written (Checkpointer.save_final).
        """
        assert self._sealed
        return self.checkpointer.save_final(self._contents.data, self._contents.ledger)
