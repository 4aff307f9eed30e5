r"""Bytes on disk: the snapshot, the write-ahead journal, and recovery.

This module knows the file formats and nothing about HTTP or locks over the
dict.  The store (store.py) decides *when* to write; this module decides
*how*, so that a crash at any instant leaves files that load() recovers.

Files in the data directory
---------------------------

    store.pickle          the snapshot: the whole dict {str: bytes}, pickled
                          with protocol 5, replaced atomically.
    store.pickle.tmp      a snapshot being written; ignored by load(),
                          removed (unlink) and created anew (O_EXCL) by the
                          next save.
    journal-00000007.log  a journal: the mutations made after some snapshot,
                          in the order they were applied.  The number is the
                          journal's generation; a new one starts at every
                          checkpoint and at every start of the server.
    LOCK                  held (flock) by the running server, so that two
                          servers never share one directory.

Every file here is opened with O_NOFOLLOW and must be a regular file
(open_data_file): a symbolic link or a device planted in the directory is
refused, never followed.  Files are created 0600.

A snapshot is written atomically: a temporary file in the same directory,
flush, fsync, os.replace() over the old one, fsync of the directory.  After
a crash there is either the old snapshot or the new one, never half of one.

Journal records
---------------

    +------------+-----------+-------------+----+------------+-----+-------+
    | length u32 | crc32 u32 | hdr crc u32 | op | key len u32| key | value |
    +------------+-----------+-------------+----+------------+-----+-------+
    \____________ header, 12 bytes _________/\_______ payload, `length` ____/

All integers are little-endian.  `crc32` covers the payload; `hdr crc` covers
the first 8 bytes, so that a damaged length is recognised as damage instead
of being trusted to say where the next record starts.  op is PUT, DELETE or
CLEAR; DELETE has an empty value, CLEAR an empty key and value.

Recovery rules (load())
-----------------------

1. Load the snapshot, if there is one.  It is unpickled with an Unpickler
   that refuses every global: a dict of str to bytes needs none, so a
   tampered file cannot make us import or call anything.
2. Replay every journal on top of it, in generation order.  Replaying a
   journal that the snapshot already contains is harmless: every record
   *sets* a state (key=value, key absent, everything absent), so applying
   the same sequence twice gives the same dict as applying it once.  That
   is what makes a crash in the middle of a checkpoint safe (see below).
3. Each journal is checked on its own.  A power cut may tear the last
   write out of page order: any of its pages may be missing (zeros, or the
   blocks' old bytes) while later ones made it.  The rule, as in RocksDB,
   LevelDB, SQLite and PostgreSQL: a damaged record after which no valid
   record follows is a torn tail, the normal trace of a crash: it is logged
   and the file is truncated there.  Damage followed by a valid record is
   corruption.  Damaged means:
     - fewer than 12 bytes left                      (a torn header)
     - the header checksum fails                     (its length is not
                                                      trusted: the search
                                                      for a valid record
                                                      starts at the next byte)
     - the record runs past the end of the file      (cut short)
     - the payload checksum fails                    (the search starts where
                                                      the sound header says
                                                      the record ends)
   The search (find_valid_record) looks at every byte offset for a header
   and a payload whose checksums both match.  A record whose checksums
   match but whose op or key length is impossible was written wrong, not
   torn: corruption too.  Corruption refuses to start (DataError names the
   file and the offset) and leaves every file untouched.  The rule cannot
   tell one case apart: a value that itself holds journal records, whose
   record lost its header to a power cut, reads as corruption (a sound
   header is trusted, so a record merely cut short never does).

Checkpoints (Store.checkpoint() drives these steps)
---------------------------------------------------

    a. create journal N+1 and fsync the directory     (Journal.prepare_next)
    b. under the store lock: send new records to
       journal N+1                                    (Journal.switch)
       then wait until journal N is complete: its
       last records written (any that failed cut
       off), fsynced, and the file closed             (Journal.sync)
    c. in a child process: old snapshot + journals
       <= N -> the new snapshot, written atomically   (snapshot_in_child,
                                                       build_snapshot)
    d. delete journals <= N                           (remove_journals)

A crash after a: journal N+1 is empty; old snapshot + N + N+1 = everything.
After b: the same, with records in N+1.  During c: the old snapshot is still
in place (os.replace is atomic).  After c: the new snapshot already holds N,
and replaying N again changes nothing (rule 2).  After d: the clean state.

Step c builds the snapshot from the files, not from the live dict: the old
snapshot plus journals <= N is exactly the state at the switch, as load()
would rebuild it.  It runs as `python3 persistence.py checkpoint DIR N`, a
new interpreter (never a fork of this threaded process), so the server
neither copies its dict under the lock nor shares its GIL with the
unpickling and pickling: requests go on at their usual latency while it
runs (a copy and a pickling thread had taken PUT p99 at 64 connections
from 4.6 to 107 ms during 1,000,000-key checkpoints).  The price: the child
holds a second copy of the data while it runs, and reads the journals back.
The child inherits the directory's LOCK, so that if the server is killed
alone, a new one waits for the orphan to finish rather than race it for
store.pickle.tmp.  The final save at shutdown writes the sealed dict
directly (write_snapshot).
"""

import errno
import fcntl
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

SNAPSHOT_NAME = "store.pickle"
PICKLE_PROTOCOL = 5
_JOURNAL_NAME = re.compile(r"journal-(\d{8,})\.log\Z")
_NONZERO = re.compile(rb"[^\0]")

PUT, DELETE, CLEAR = 1, 2, 3
_HEADER = struct.Struct("<III")     # payload length, payload crc32, header crc32
_LENGTH_CRC = struct.Struct("<II")  # the part of the header its crc covers
_OP_KEY = struct.Struct("<BI")      # op, key length


class DataError(Exception):
    """A data file cannot be used.  str() names the file and the reason."""


# ---------------------------------------------------------------- helpers --

def snapshot_path(directory):
    return os.path.join(directory, SNAPSHOT_NAME)


def journal_path(directory, generation):
    return os.path.join(directory, "journal-%08d.log" % generation)


def journal_generations(directory):
    """The generations of the journals in `directory`, oldest first."""
    found = (_JOURNAL_NAME.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def open_data_file(path, flags, mode=0o600):
    """os.open() for a file inside the data directory: never a symlink, only a regular file.

    O_NOFOLLOW makes the open fail if `path` is a symbolic link (a link
    planted at store.pickle.tmp would otherwise have its target overwritten;
    a journal linked to /dev/zero would be read forever); O_NONBLOCK keeps a
    FIFO from blocking the open.  Raises OSError, whose strerror says why.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "is a symbolic link, not followed", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_directory(directory):
    """Make renames, creations and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryInUse(DataError):
    """Another process holds the data directory's lock (it may be exiting)."""


def make_data_directory(directory):
    """Create `directory` (and its parents) if missing: mode 0700, whatever the umask.

    An existing directory keeps its mode: its owner chose it.
    """
    if os.path.isdir(directory):
        return
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return                          # another process made it just now
    os.chmod(directory, 0o700)          # mkdir's mode is masked by the umask


def lock_directory(directory):
    """Take the directory's LOCK file; return its fd (keep it open while serving).

    The kernel drops the lock when the process dies, however it dies.
    """
    path = os.path.join(directory, "LOCK")
    try:
        fd = open_data_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise DataError("%s: cannot open the lock file: %s" % (path, e.strerror))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse("%s: the data directory is in use by another server" % directory)
    return fd


def apply(data, op, key, value):
    """Apply one mutation to a dict: the meaning of a journal record."""
    if op == PUT:
        data[key] = value
    elif op == DELETE:
        data.pop(key, None)
    else:
        data.clear()


# --------------------------------------------------------------- snapshot --

class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global (class, function) is refused.

    Unpickling a global is how a pickle runs code (`os.system`, say); a dict
    of str to bytes never needs one, so refusing them all costs nothing.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError("refusing to load global %s.%s" % (module, name))


def load_snapshot(path):
    """The dict stored at `path`, or {} if there is no snapshot.  Raises DataError."""
    try:
        f = open(open_data_file(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DataError("%s: cannot read snapshot: %s" % (path, e.strerror))
    with f:
        try:
            data = _NoGlobalsUnpickler(f).load()
            trailing = f.read(1)
        except Exception as e:      # any damage surfaces as some exception
            raise DataError("%s: snapshot is corrupt: %s" % (path, e or type(e).__name__))
    if trailing:
        raise DataError("%s: snapshot is corrupt: unexpected data after the end" % path)
    if type(data) is not dict or not all(
            type(k) is str and type(v) is bytes for k, v in data.items()):
        raise DataError("%s: snapshot is not a dict of str to bytes" % path)
    return data


def write_snapshot(directory, data):
    """Atomically replace the snapshot with `data`.  Returns the file's size.

    Guarantees: when it returns, the new snapshot is durable; if it raises
    (disk full, I/O error), the previous snapshot is intact.  It does not
    lock `data`: the caller passes a dict that nobody changes meanwhile.
    """
    path = snapshot_path(directory)
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)          # a crash's leftover; unlink removes a link, not its target
    except FileNotFoundError:
        pass
    fd = open_data_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            pickle.dump(data, f, protocol=PICKLE_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)
    return size


def remove_journals(directory, through):
    """Delete the journals of generation <= `through` (a snapshot now holds them)."""
    for generation in journal_generations(directory):
        if generation <= through:
            os.unlink(journal_path(directory, generation))
    fsync_directory(directory)


# ---------------------------------------------------------------- records --

def encode_record(op, key, value):
    """The bytes of one journal record, as a list of buffers for os.writev."""
    key_bytes = key.encode("utf-8")
    op_key = _OP_KEY.pack(op, len(key_bytes)) + key_bytes
    length = len(op_key) + len(value)
    length_crc = _LENGTH_CRC.pack(length, zlib.crc32(value, zlib.crc32(op_key)))
    header = length_crc + struct.pack("<I", zlib.crc32(length_crc))
    return [header, op_key, value] if value else [header + op_key]


def scan_journal(buf, data, path):
    """Apply every record of the journal bytes `buf` to `data`.

    Returns (records applied, end offset of the last valid record).  If the
    end offset is less than len(buf), what follows is a torn tail.  Raises
    DataError for corruption: a damaged record that a valid one follows
    (see the recovery rules above).
    This loop is the replay speed: keep it free of calls it does not need.
    """
    view = memoryview(buf)
    size = len(buf)
    crc32 = zlib.crc32
    unpack_header = _HEADER.unpack_from
    unpack_op_key = _OP_KEY.unpack_from
    offset = count = 0
    while offset < size:
        if size - offset < _HEADER.size:
            break                                         # torn: partial header
        length, payload_crc, header_crc = unpack_header(buf, offset)
        if crc32(view[offset:offset + 8]) != header_crc:
            _check_torn(buf, offset, offset + 1, path, "corrupt record header")
            break
        start = offset + _HEADER.size
        end = start + length
        if end > size:
            break                                         # torn: record cut short
        if crc32(view[start:end]) != payload_crc:
            # The header is sound, so its length says where the next record starts.
            _check_torn(buf, offset, end, path, "checksum mismatch in record")
            break
        op, key_length = unpack_op_key(buf, start)
        key_start = start + _OP_KEY.size
        value_start = key_start + key_length
        if op not in (PUT, DELETE, CLEAR) or value_start > end:
            raise DataError("%s: malformed record at offset %d" % (path, offset))
        apply(data, op, buf[key_start:value_start].decode("utf-8"), buf[value_start:end])
        count += 1
        offset = end
    return count, offset


def _check_torn(buf, damaged, search_from, path, what):
    """Damage at `damaged`: return if no valid record follows (a torn tail), else raise DataError."""
    found = find_valid_record(buf, search_from)
    if found is not None:
        raise DataError("%s: %s at offset %d, and a valid record follows at offset %d: "
                        "the journal is corrupt, not torn" % (path, what, damaged, found))


def find_valid_record(buf, start):
    """The offset of the first valid record at or after `start`, at any byte; None if none.

    Valid: the header's checksum and the payload's both match (a chance of
    one in 2**64 for random bytes).  Only offsets whose length field could
    describe a record that fits in `buf` get checksummed: the regular
    expressions find them (the length's high byte is small; runs of zeros,
    the blocks a power cut left unwritten, have length 0), which keeps a
    scan of a large damaged tail to well under a second per 10 MB.
    """
    view = memoryview(buf)
    size = len(buf)
    crc32 = zlib.crc32
    unpack_header = _HEADER.unpack_from
    last = size - _HEADER.size - _OP_KEY.size      # the last offset a record fits at
    high = re.compile(b"[\\x00-" + re.escape(bytes([min(size >> 24, 255)])) + b"]")
    offset = start
    while offset <= last:
        found = high.search(buf, offset + 3, last + 4)     # the length's high byte
        if not found:
            return None
        offset = found.start() - 3
        if not any(view[offset:offset + 4]):
            nonzero = _NONZERO.search(buf, offset, last + 1)
            offset = max(offset + 1, (nonzero.start() if nonzero else last + 1) - 3)
            continue
        length, payload_crc, header_crc = unpack_header(buf, offset)
        end = offset + _HEADER.size + length
        if (_OP_KEY.size <= length and end <= size
                and crc32(view[offset:offset + 8]) == header_crc
                and crc32(view[offset + _HEADER.size:end]) == payload_crc):
            return offset
        offset += 1
    return None


def read_journal(path):
    try:
        with open(open_data_file(path, os.O_RDONLY), "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError("%s: cannot read journal: %s" % (path, e.strerror))


def truncate_journal(path, end):
    """Cut a torn tail off a journal, durably."""
    try:
        with open(open_data_file(path, os.O_RDWR), "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    except OSError as e:
        raise DataError("%s: cannot truncate torn tail: %s" % (path, e.strerror))


def load(directory, log):
    """Recover the dict from `directory`: the snapshot, then every journal.

    Returns (data, next journal generation, replayed record count).  Raises
    DataError, having modified nothing, if a file is unreadable or corrupt.
    Torn tails are truncated only once every file has been read and found
    sound: that is recovery, and it never happens on a refusal to start.
    """
    path = snapshot_path(directory)
    started = time.monotonic()
    data = load_snapshot(path)
    log("Loaded %d keys from %s in %.2f s" % (len(data), path, time.monotonic() - started))
    generations = journal_generations(directory)
    replayed, torn = 0, []
    started = time.monotonic()
    for generation in generations:
        journal = journal_path(directory, generation)
        buf = read_journal(journal)
        count, end = scan_journal(buf, data, journal)
        replayed += count
        if end < len(buf):
            torn.append((journal, end, len(buf) - end))
    for journal, end, size in torn:
        log("Journal %s: incomplete record at offset %d (%d bytes, the trace of a crash); "
            "truncating it" % (journal, end, size))
        truncate_journal(journal, end)
    if generations:
        seconds = time.monotonic() - started
        log("Replayed %d journal records from %d file(s) in %.2f s (%d records/s); %d keys"
            % (replayed, len(generations), seconds, replayed / max(seconds, 1e-9), len(data)))
    next_generation = generations[-1] + 1 if generations else 1
    return data, next_generation, replayed


# ------------------------------------------------------------- checkpoints --

def build_snapshot(directory, through):
    """Checkpoint step c, in the child: snapshot + journals <= `through` -> new snapshot.

    Reads only; writes nothing but the new snapshot (write_snapshot).  A
    torn tail is left alone (the server's own load() cut every tail before
    it started, and its journal cuts off what a failed write left): the
    records before it are the ones the server applied.  Returns (keys, bytes).
    """
    data = load_snapshot(snapshot_path(directory))
    for generation in journal_generations(directory):
        if generation <= through:
            journal = journal_path(directory, generation)
            scan_journal(read_journal(journal), data, journal)
    return len(data), write_snapshot(directory, data)


def snapshot_in_child(directory, through, pass_fds=()):
    """Run build_snapshot() in a new Python process; wait for it.  Returns (keys, bytes).

    A child of its own, started afresh (never a fork of this threaded
    process): the live dict is never copied, and the unpickling and
    pickling do not compete with the request threads for the GIL.
    `pass_fds`: the directory's LOCK, so that a server started while an
    orphaned child still writes (after a kill of this process alone)
    waits for it.  Raises OSError if the child fails.
    """
    child = subprocess.run(
        [sys.executable, "-I", os.path.abspath(__file__), "checkpoint", directory, str(through)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=pass_fds)
    if child.returncode != 0:
        reason = child.stderr.decode("utf-8", "replace").strip().splitlines() or [
            "exit status %d" % child.returncode]
        raise OSError("checkpoint process failed: %s" % reason[-1])
    keys, size = child.stdout.split()
    return int(keys), int(size)


def _checkpoint_main(directory, through):
    """The child's entry point (python3 persistence.py checkpoint DIR N): exit 0, or 1 and a line."""
    try:
        # The parent may be pinned to one CPU (--cpu): this work belongs on another.
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    try:
        keys, size = build_snapshot(directory, int(through))
    except (DataError, OSError) as e:
        sys.stderr.write("%s\n" % e)
        return 1
    sys.stdout.write("%d %d\n" % (keys, size))
    return 0


# ---------------------------------------------------------------- journal --

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # out of room: retried


class Journal:
    """The open journal: records queued in order, then written and fsynced in groups.

    append() must be called with the store lock held: that is what makes the
    order of records the order of changes to the dict.  It only queues the
    encoded record in memory, and makes no system call: a thread that made
    one while holding the store lock would give up the GIL, and then need it
    back from the other threads before it could let go of the lock; every
    other writer would queue behind that wait (a lock convoy).

    One thread of the journal's own, the writer, does all the I/O.  Each
    round it takes every record queued so far, writes them with one writev
    and, as the policy says, fsyncs:

      always    an fsync every round.  This is group commit: the records
                that arrive while one round's fsync runs share the next one.
      everysec  an fsync at most once a second (a power loss may lose the
                last second); writes still go to the OS every round.
      no        no fsync; the OS writes to disk when it likes.

    Then it hands the round's records to `apply_round` (the store applies
    them to the dict: readers see only what is durable), and runs the
    callbacks of that round: append(..., callback) and when_durable(callback)
    ask for callback(None) once the record (every record appended so far)
    is written, so it survives a killed process, and fsynced as above, so it
    survives a power loss; or callback(error) if that failed.  The server
    hands its 200 to its worker from there, so no thread sleeps through the
    fsync.

    When a round fails, its records and every record queued after them fail
    too (`fail_queued`: a write queued later may have been checked against
    one that failed), and what the round wrote is truncated away, so that
    no failed record is ever replayed:
      - a write that fails for lack of room (ENOSPC, EDQUOT, EFBIG) is
        retried with the next records: `problem` says why meanwhile, and
        once a second the writer probes (posix_fallocate) whether there is
        room again;
      - any other failed write, or a failed truncation, and every failed
        fsync, is fatal (`failed`): the journal refuses every later record.
        After an fsync error Linux may have dropped the dirty pages and
        marked them clean, so a second fsync would report success for data
        that is not on disk (PostgreSQL's "fsyncgate", 2018): it is never
        retried.  `on_fatal` is called once, from the writer thread.
    """

    POLICIES = ("always", "everysec", "no")
    PROBE_INTERVAL = 1.0        # seconds between probes for room after a full disk

    def __init__(self, directory, generation, policy):
        assert policy in self.POLICIES
        self.directory = directory
        self.policy = policy
        self.generation = generation
        self.size = 0                   # bytes appended to the current file
        self.records = 0                # appended since this object was opened
        self.failed = None              # the OSError that broke the journal for good, if any
        self.problem = None             # why writes fail for now (a full disk), if they do
        self.fsyncs = 0                 # fsync rounds done (each may cover many records)
        self.fsync_seconds = 0.0        # time spent in those rounds, writes included
        self.apply_round = None         # apply_round(records) after a round is durable
        self.fail_queued = self.drop_queued     # on failure: every queued callback, dropped
        self.on_fatal = None            # on_fatal(error), once, when `failed` is set
        self.log = lambda message: None
        self._fd = self._create(generation)
        self._written = {self._fd: 0}   # fd -> bytes written to it by complete rounds
        self._queue = []                # buffers of records not yet written
        self._records = []              # (op, key, value) of those records, in order
        self._retired = []              # (fd, queue) of older files, for the next round
        self._callbacks = []            # callbacks for the next round
        self._sync_wanted = False       # the next round fsyncs, whatever the policy
        self._closing = False
        self._writer_idle = False       # the writer waits for work: wake it
        self._lock = threading.Lock()   # guards all of the above
        self._work = threading.Condition(self._lock)
        self._writer = threading.Thread(target=self._write_rounds, name="journal-writer",
                                        daemon=True)
        self._writer.start()

    def _create(self, generation):
        """Create the file of a new generation and make its name durable.

        If the directory's fsync fails, the new file is closed and removed
        again: a file left behind would make the next checkpoint's create
        fail with "File exists", and every one after it.
        """
        path = journal_path(self.directory, generation)
        fd = open_data_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        try:
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return fd

    # -- store lock held ------------------------------------------------------

    def append(self, record, callback=None):
        """Queue one record (op, key, value), and its callback.  Caller holds the store lock."""
        if self.failed:
            raise OSError("journal unusable since an earlier error: %s" % self.failed)
        buffers = encode_record(*record)
        with self._lock:
            self._queue.extend(buffers)
            self._records.append(record)
            self.size += sum(map(len, buffers))
            self.records += 1
            if callback is not None:
                self._callbacks.append(callback)
                if self._writer_idle:
                    self._writer_idle = False
                    self._work.notify()

    def drop_queued(self):
        """Forget every record not yet taken by a round; return their callbacks.

        Called (with the store lock held, by the store) when a round fails.
        """
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
            self._queue, self._records = [], []
            self._retired = [(fd, []) for fd, _ in self._retired]
            self.size = self._written.get(self._fd, 0)
        return callbacks

    def switch(self, prepared):
        """Checkpoint step b: new records go to the prepared file.  Caller holds the store lock.

        Returns the generation of the file left behind.  Its queued records
        and its last fsync are left to the next round: none is lost, and no
        writer waits for the switch.
        """
        old = self.generation
        with self._lock:
            self._retired.append((self._fd, self._queue))
            self.generation, self._fd = prepared
            self._written[self._fd] = 0
            self._queue = []
            self.size = 0
        return old

    # -- store lock NOT held --------------------------------------------------

    def prepare_next(self):
        """Checkpoint step a: create the next journal file."""
        return self.generation + 1, self._create(self.generation + 1)

    def when_durable(self, callback):
        """Call callback(None), from the writer thread, once every record appended so far is durable.

        Durable means written, and fsynced as the policy says; if that
        fails, the callback gets the OSError instead.  Either way it is
        called exactly once.  It must not block, nor raise: the replies of
        every other writer in its round wait behind it.
        """
        with self._lock:
            self._callbacks.append(callback)
            if self._writer_idle:       # else it finds the callback when its round ends
                self._writer_idle = False
                self._work.notify()

    def commit(self):
        """Return once every record appended so far is durable.  Raises OSError."""
        waiter = Waiter()
        self.when_durable(waiter)
        waiter.wait()

    def sync(self):
        """Write and fsync every record appended so far, whatever the policy."""
        with self._lock:
            self._sync_wanted = True
        self.commit()

    # -- the writer thread ----------------------------------------------------

    def _write_rounds(self):
        fsync_due = None        # "everysec": when the oldest unsynced write must be fsynced
        probe_due = None        # after a full disk: when to look for room again

        def fsync_owed():
            return fsync_due is not None and time.monotonic() >= fsync_due

        while True:
            with self._work:
                while not (self._callbacks or self._sync_wanted or self._closing
                           or fsync_owed()):
                    if probe_due is not None and time.monotonic() >= probe_due:
                        break
                    self._writer_idle = True
                    due = min(t for t in (fsync_due, probe_due, float("inf")) if t is not None)
                    self._work.wait(None if due == float("inf") else due - time.monotonic())
                self._writer_idle = False
                if self._closing and not (self._callbacks or self._sync_wanted):
                    return
                files, records = [], []
                if not self.failed:     # else close() closes the files
                    files = self._retired + [(self._fd, self._queue)]
                    records = self._records
                    self._retired, self._queue, self._records = [], [], []
                fsync = self.policy == "always" or self._sync_wanted or fsync_owed()
                work = (records or self._callbacks or self._sync_wanted or fsync_owed()
                        or len(files) > 1)
                self._sync_wanted = False
                callbacks, self._callbacks = self._callbacks, []
            error = None
            if files and work:
                started = time.monotonic()
                error = self._write(files, fsync)
                if error is None:
                    if fsync:
                        self.fsyncs += 1
                        self.fsync_seconds += time.monotonic() - started
                        fsync_due = None
                    elif self.policy == "everysec" and fsync_due is None:
                        fsync_due = time.monotonic() + 1.0
                    if records and self.problem:
                        self._room_again()
                else:
                    fsync_due = None
            if (error is None and self.problem and not self.failed and probe_due is not None
                    and time.monotonic() >= probe_due and self._probe()):
                self._room_again()
            if error is None:
                if records and self.apply_round:
                    self.apply_round(records)
            else:
                callbacks += self.fail_queued()
            probe_due = (time.monotonic() + self.PROBE_INTERVAL
                         if self.problem and not self.failed else None)
            for callback in callbacks:
                try:
                    callback(error or self.failed)
                except Exception:
                    # A caller's bug: report it, but do not let it cost the
                    # other callers their replies, or stop the journal.
                    sys.excepthook(*sys.exc_info())
            if error is not None and self.failed is error and self.on_fatal:
                self.on_fatal(error)

    def _write(self, files, fsync):
        """One round's I/O: every file's records, the fsyncs; returns the OSError, if any.

        On an error, every file is cut back to where the round found it, so
        that none of the round's records can be replayed.  Sets `problem`
        (out of room: the next round tries again) or `failed` (for good).
        """
        phase = "write"
        try:
            for fd, buffers in files:
                _write_all(fd, buffers)
            phase = "fsync"
            for fd, _ in files if fsync else files[:-1]:
                os.fsync(fd)            # a retired file always gets its last fsync
        except OSError as e:
            self._cut_back(files, e, phase)
            return e
        for fd, buffers in files:
            self._written[fd] += sum(map(len, buffers))
        for fd, _ in files[:-1]:
            os.close(fd)
            del self._written[fd]
        return None

    def _cut_back(self, files, error, phase):
        """Truncate the round's files to where it found them; close the retired ones."""
        fatal = phase == "fsync" or error.errno not in STORAGE_FULL
        try:
            for fd, _ in files:
                os.ftruncate(fd, self._written[fd])
            if not fatal:
                for fd, _ in files:
                    os.fsync(fd)        # the cut is durable before the next write
        except OSError as e:
            fatal = True
            self.log("Journal %s: cannot cut off a failed write: %s"
                     % (journal_path(self.directory, self.generation), e))
        for fd, _ in files[:-1]:
            os.close(fd)
            del self._written[fd]
        if fatal:
            self.failed = error
            self.problem = "journal %s failed: %s" % (phase, error.strerror or error)
            self.log("Journal %s: %s; no more writes are taken"
                     % (journal_path(self.directory, self.generation), self.problem))
        elif self.problem is None:
            self.problem = "disk full: %s" % (error.strerror or error)
            self.log("Journal %s: %s; writes get 507 until there is room"
                     % (journal_path(self.directory, self.generation), self.problem))

    def _probe(self):
        """After a full disk: is there room for a page of records again?"""
        fd, end = self._fd, self._written[self._fd]
        try:
            os.posix_fallocate(fd, end, 1 << 16)
        except OSError as e:
            return e.errno not in STORAGE_FULL      # unsupported here: the writes will tell
        finally:
            try:
                os.ftruncate(fd, end)   # a crash before this leaves zeros: a torn tail
            except OSError:
                pass
        return True

    def _room_again(self):
        self.problem = None
        self.log("Journal %s: writable again" % journal_path(self.directory, self.generation))

    def discard(self):
        """Close and delete the file of a journal that never received a record."""
        assert self.records == 0
        self._stop()
        os.close(self._fd)
        os.unlink(journal_path(self.directory, self.generation))

    def close(self):
        """Write and fsync everything, run every callback, close the files.  No append may follow.

        Does not raise: if the journal fails (or had failed), the callbacks
        are told so.
        """
        try:
            self.sync()
        except OSError:
            pass
        self._stop()
        for fd in self._written:
            os.close(fd)
        self._written = {}

    def _stop(self):
        with self._lock:
            self._closing = True
            self._work.notify()
        self._writer.join()


class Waiter:
    """A callback for the journal that a thread can wait on: wait() returns or raises its error."""

    def __init__(self):
        self._done = threading.Lock()
        self._done.acquire()
        self._error = None

    def __call__(self, error):
        self._error = error
        self._done.release()

    def wait(self):
        self._done.acquire()
        if self._error is not None:
            raise OSError(self._error.errno, "journal write failed: %s"
                          % (self._error.strerror or self._error))


def _write_all(fd, buffers):
    """Write `buffers` to `fd`: one writev when the OS takes it all (the usual case).

    If a write fails, the journal cuts what it wrote off again (Journal._cut_back).
    """
    for i in range(0, len(buffers), 1024):          # IOV_MAX is 1024 on Linux
        batch = buffers[i:i + 1024]
        written = os.writev(fd, batch)
        if written < sum(map(len, batch)):          # short: disk full or a signal
            data = memoryview(b"".join(batch))[written:]
            while data:
                data = data[os.write(fd, data):]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "checkpoint":
        sys.exit("usage: python3 persistence.py checkpoint DIRECTORY THROUGH_GENERATION")
    sys.exit(_checkpoint_main(sys.argv[2], sys.argv[3]))
