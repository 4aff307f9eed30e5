"""The thread-safe dict, and the order in which its changes reach the disk.

`Store` is a dict {str: bytes} behind one lock.  Every mutation, in one
critical section, (1) appends a record to the journal's queue and (2)
applies it to the dict.  Because both happen under the same lock, the
journal's order is exactly the order of changes to the dict, under any
concurrency.  Then, *outside* the lock, (3) the record is made durable:
the journal's writer thread writes it to the OS and, as the policy says,
fsyncs it, together with every other record queued by then (group
commit).  No system call is made under the lock, so one slow fsync never
blocks readers or other writers.  The caller either waits for (3)
(Journal.commit) or, as the server does, passes `on_durable` and is called
back from the writer thread (Journal.when_durable).

Guarantees
----------
- A mutation that returned normally (or whose on_durable got None) is in
  the journal, as durable as the fsync policy promises, and in the dict.
- After seal(), every mutation raises Sealed, and the dict no longer changes:
  a snapshot taken after seal() holds every mutation that ever returned.
- Reads see a write as soon as it is applied, which may be before its
  record has reached the OS or the disk (as in Redis).  A reader can
  therefore see a value that a crash in the next millisecond takes back;
  but that write was never acknowledged, and a write that was is kept.

Checkpoints
-----------
When the journal passes `checkpoint_bytes`, a background thread writes a new
snapshot and drops the old journal, following the steps (and the crash
analysis) in persistence.py.  The lock is held only to switch journal files
and copy the dict, never while pickling or writing.
"""

import threading
import time

import persistence
from persistence import CLEAR, DELETE, PUT


class Sealed(Exception):
    """The store is shutting down and accepts no more writes."""


class Store:

    def __init__(self, data, journal, checkpoint_bytes, log):
        self._data = data
        self._journal = journal
        self._lock = threading.Lock()           # guards _data, _sealed, journal appends
        self._sealed = False
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_lock = threading.Lock()  # one checkpoint at a time
        self._checkpoint_wanted = threading.Event()
        self._log = log
        self.directory = journal.directory
        self.value_bytes = sum(map(len, data.values()))     # kept under _lock, for /metrics
        self.checkpoints = 0            # written since start, for /metrics
        self.checkpoint_failures = 0
        threading.Thread(target=self._checkpoint_loop, name="checkpointer",
                         daemon=True).start()

    def __len__(self):
        return len(self._data)

    @property
    def journal(self):
        """The open journal, for its counters (size, records, fsyncs): read them, nothing more."""
        return self._journal

    def write_problem(self):
        """None when writes can be served, else a short reason."""
        return "journal failed: %s" % self._journal.failed if self._journal.failed else None

    # -- reads --------------------------------------------------------------

    def get(self, key):
        """The value of `key`, or None."""
        with self._lock:
            return self._data.get(key)

    # -- writes -------------------------------------------------------------

    def put(self, key, value, on_durable=None):
        self._mutate(PUT, key, value, on_durable)

    def delete(self, key, on_durable=None):
        self._mutate(DELETE, key, b"", on_durable)

    def clear(self, on_durable=None):
        self._mutate(CLEAR, "", b"", on_durable)

    def _mutate(self, op, key, value, on_durable):
        """Journal and apply a change.  Raises Sealed, or OSError if the journal has failed.

        Without `on_durable`, returns once the change is durable (raises
        OSError if it cannot be made so).  With it, returns at once, and the
        journal's writer thread calls on_durable(None) once the change is
        durable, or on_durable(error).
        """
        with self._lock:
            if self._sealed:
                raise Sealed()
            self._journal.append(op, key, value)            # 1. the record, queued
            self.value_bytes += self._value_bytes_change(op, key, value)
            persistence.apply(self._data, op, key, value)   # 2. the dict: same order
            journal_full = self._journal.size >= self._checkpoint_bytes
        if journal_full:
            self._checkpoint_wanted.set()
        if on_durable:                  # 3. without the lock: written (and fsynced)
            self._journal.when_durable(on_durable)
        else:
            self._journal.commit()

    def _value_bytes_change(self, op, key, value):
        """How a mutation, about to be applied, changes value_bytes.  Caller holds the lock."""
        if op == CLEAR:
            return -self.value_bytes
        old = self._data.get(key)
        return len(value) - (len(old) if old is not None else 0)

    # -- checkpoints and shutdown --------------------------------------------

    def request_checkpoint(self):
        """Ask the background thread for a checkpoint (e.g. after replaying journals)."""
        self._checkpoint_wanted.set()

    def checkpoint(self):
        """Write a snapshot of the current state and drop the journals it holds.

        Requests go on while it runs: the store lock is held only for step b.
        Raises OSError if the snapshot cannot be written; the journals then
        stay, so nothing is lost.
        """
        with self._checkpoint_lock:
            if self._sealed:
                return
            prepared = self._journal.prepare_next()               # a.
            with self._lock:
                covered = self._journal.switch(prepared)          # b. new writes -> new file
                snapshot = dict(self._data)                       #    copy holds all before
            self._journal.sync()          # the old file's last records, then it is closed
            started = time.monotonic()
            size = persistence.write_snapshot(self.directory, snapshot)   # c.
            persistence.remove_journals(self.directory, covered)          # d.
            self.checkpoints += 1
            self._log("Checkpoint: %d keys, %d bytes written in %.2f s; journals <= %d removed"
                      % (len(snapshot), size, time.monotonic() - started, covered))

    def _checkpoint_loop(self):
        while True:
            self._checkpoint_wanted.wait()
            self._checkpoint_wanted.clear()
            if self._sealed:
                return
            try:
                self.checkpoint()
            except OSError as e:
                self.checkpoint_failures += 1
                self._log("Checkpoint failed, journal kept: %s" % e)

    def abandon(self):
        """Give up before serving (the port was taken): leave the files as they were."""
        self.seal()
        self._journal.discard()

    def seal(self):
        """Refuse every write from now on; the dict is frozen."""
        with self._lock:
            self._sealed = True

    def save_and_close(self):
        """After seal(): write the final snapshot, then drop the journals.

        Waits for a checkpoint in progress.  Returns the snapshot's size.
        If writing fails (OSError), the previous snapshot and the journals
        are left as they were, so the next start still recovers everything.
        """
        assert self._sealed
        with self._checkpoint_lock:
            try:
                size = persistence.write_snapshot(self.directory, self._data)
            finally:
                self._journal.close()       # what is queued reaches the disk regardless
            persistence.remove_journals(self.directory, self._journal.generation)
        self._log("Journal: %d records, %d fsyncs since start (--fsync %s)"
                  % (self._journal.records, self._journal.fsyncs, self._journal.policy))
        return size
