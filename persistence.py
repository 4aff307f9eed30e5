r"""Bytes on disk: the snapshot, the write-ahead journal, and recovery.

This module knows the file formats and nothing about HTTP or locks over the
dict.  The store (store.py) decides *when* to write; this module decides
*how*, so that a crash at any instant leaves files that load() recovers.

Files in the data directory
---------------------------

    store.pickle          the snapshot: the whole dict {str: bytes}, pickled
                          with protocol 5, then a checksum trailer; replaced
                          atomically.
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

The snapshot
------------

    +--------------------------+---------------------------------------+
    | pickle (protocol 5)      | trailer: magic 8 | length u64 | crc u32 |
    +--------------------------+---------------------------------------+

The trailer (dump_snapshot) gives the pickle's length and its CRC32, so a
flipped bit anywhere is refused at start instead of served.  A file that
does not end in a trailer is a snapshot written before there were
checksums: it still loads, and the next save writes a trailer.  The same
bytes are what GET /snapshot streams, so a backup carries its checksum and
`python3 persistence.py verify FILE` checks one without a server
(check_snapshot).  The file stays a pickle: pickle.load() reads it and
ignores the trailer.

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

Journal files: a header, then rounds
------------------------------------

    | "kvjournal rounds" | marker | records ... | marker | records ... |
      16 bytes             \___ round _________/  \___ round _________/

A round on disk is what one group write of the writer appends to one file
(_write_group): one writev of a marker and the records of every request
round in the group.  The marker is a record (same framing, its own CRCs)
of op ROUND whose value is (offset, length, synced, crc): the file offset
the marker itself starts at, the length of the round's records, how many
bytes of the file were known fsynced when the round was written, and the
CRC32 of the round's records.  The header is written and fsynced alone
when the writer first opens the file, before any round: a power cut can
tear the first round but not the header, which says which rules apply.
A journal file without the header was written before there were rounds
(or is a header torn at creation): it is read record by record with the
old rules below.

Recovery rules (load())
-----------------------

1. Load the snapshot, if there is one.  It is unpickled with an Unpickler
   that refuses every global: a dict of str to bytes needs none, so a
   tampered file cannot make us import or call anything.  With a trailer,
   its checksum must match: else the start is refused.
2. Replay every journal on top of it, in generation order.  Replaying a
   journal that the snapshot already contains is harmless: every record
   *sets* a state (key=value, key absent, everything absent), so applying
   the same sequence twice gives the same dict as applying it once.  That
   is what makes a crash in the middle of a checkpoint safe (see below).
3. Each journal is checked on its own.  A power cut may tear every write
   that was not yet fsynced, in any order of its pages: any of them may be
   missing (zeros, or the blocks' old bytes) while later ones made it.
   With rounds: a round whose marker is damaged, whose records run past
   the end of the file, or whose checksum fails is damaged.  Damage is a
   torn tail, the normal trace of a crash, unless a valid round that
   follows it says the damaged bytes had been fsynced when it was written
   (its `synced` is past them).  A torn tail is logged and cut off, with
   every round after it; damage that a later round says was fsynced is
   corruption.  What that means for each policy:
     always    a round is written only after the one before it was
               fsynced, so only the last round can be torn, and damage
               followed by any valid round is corruption.  The last round
               was never acknowledged: its fsync had not returned.
     everysec  the rounds since the last fsync (about a second of them)
               may all be torn: damage in them is cut off, with the
               valid rounds after it, written but never fsynced (the
               "last second" that everysec may lose in a power cut).
     no        nothing of the open journal is known fsynced, so damage
               anywhere in it is a torn tail: a power cut under `no` may
               lose any part of the journal, and recovery keeps what
               comes before the first damage.
   A round whose checksum matches but whose records do not parse was
   written wrong, not torn: corruption too.
   Without rounds (the old rules, as in RocksDB, LevelDB, SQLite and
   PostgreSQL): a damaged record after which no valid record follows is a
   torn tail; damage followed by a valid record is corruption.  Damaged
   means: fewer than 12 bytes left (a torn header); the header checksum
   fails (its length is not trusted: the search for a valid record starts
   at the next byte); the record runs past the end of the file; the
   payload checksum fails (the search starts where the sound header says
   the record ends).  So a torn last write of several records whose first
   page was lost reads as corruption there: rounds were made for that.
   The search (find_valid_record) looks at every byte offset for a header
   and a payload whose checksums both match (a marker must also name the
   offset it is found at).  Corruption refuses to start (DataError names
   the file and the offset) and leaves every file untouched.  Neither rule
   can tell one case apart: a value that itself holds a journal, at the
   very offsets it had there, inside a torn round, reads as corruption.
4. Once every file was read and found sound: torn tails are cut off
   (fsynced), and journal files left without a record are removed, so
   that failed starts do not pile empty journals up.

The data directory under the server's feet
------------------------------------------

The writer checks, once a second, that the directory at the path is still
the one it opened (same device and inode) and that its journal files are
still there under their names; and, after every group write, that each
file it wrote still has a name (st_nlink).  If not, it answers GONE: the
journal refuses every write from then on (`failed`, `problem`), but reads
go on, and the store writes no snapshot into a directory that is no longer
its own (Store.save_and_close).

Checkpoints (Checkpointer.checkpoint() in store.py drives these steps)
----------------------------------------------------------------------

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
would rebuild it.  It runs as `python3 persistence.py checkpoint DIR N PID`,
a new interpreter (never a fork of this threaded process), so the server
neither copies its dict under the lock nor shares its GIL with the
unpickling and pickling: requests go on at their usual latency while it
runs (a copy and a pickling thread had taken PUT p99 at 64 connections
from 4.6 to 107 ms during 1,000,000-key checkpoints).  The price: the child
holds a second copy of the data while it runs, and reads the journals back.
The final save at shutdown writes the sealed dict directly (write_snapshot).

The children and the lock: both children (the checkpoint's, and the
journal's writer) inherit the directory's LOCK, so that no new server can
race one for store.pickle.tmp or a journal; and both die with the server
(_die_with_parent: Linux's parent-death signal, SIGKILL), so that a new
server started after a kill of the server alone gets the lock at once
instead of waiting for a long checkpoint to end.
"""

# No asyncio here, though the journal's link runs on an event loop
# (_WriterLink): the children (the journal's writer, a checkpoint) run this
# file as a script, and importing asyncio was half the CPU of a writer's
# start (58 ms with it, 30 without), at every start of the server.
import bisect
import collections
import errno
import fcntl
import os
import pickle
import re
import select
import signal
import socket
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
_CHUNK = 1 << 20                    # bytes read at once when only their checksum is wanted

PUT, DELETE, CLEAR = 1, 2, 3
ROUND = 4                           # a round's marker: not a mutation (see "Journal files")
PUT_EXPIRING = 5                    # on disk: a PUT whose value starts with its deadline
EXPIRE, BATCH = 6, 7                # a deadline passed; several mutations as one
MUTATIONS = (PUT, DELETE, CLEAR, PUT_EXPIRING, EXPIRE, BATCH)
_DEADLINE = struct.Struct("<q")     # milliseconds since the epoch
_BATCH_PART = struct.Struct("<BIIq")    # a batch's part: op, key length, value length, deadline
NO_DEADLINE = -1
_HEADER = struct.Struct("<III")     # payload length, payload crc32, header crc32
_LENGTH_CRC = struct.Struct("<II")  # the part of the header its crc covers
_OP_KEY = struct.Struct("<BI")      # op, key length
_LENGTH = struct.Struct("<I")       # a record's first field: its payload's length
JOURNAL_MAGIC = b"kvjournal rounds"  # a journal file's header: its records come in rounds
_MARKER = struct.Struct("<QQQI")    # a marker's value: its offset, the round's length,
                                    # bytes fsynced when written, the round's crc32
MARKER_SIZE = _HEADER.size + _OP_KEY.size + _MARKER.size
_MARKER_RECORD = struct.Struct("<IIIBIQQQI")    # a whole marker: _HEADER, _OP_KEY, _MARKER
_TRAILER = struct.Struct("<8sQI")   # a snapshot's last bytes: magic, pickle length, its crc32
_TRAILER_MAGIC = b"kvsnap\x00\x01"


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


def directory_identity(directory):
    """(device, inode) of `directory`: what tells it from another directory put at its path."""
    st = os.stat(directory)
    return st.st_dev, st.st_ino


def directory_replaced(directory, identity):
    """None while `directory` is the one whose directory_identity() was `identity`; else why."""
    try:
        if directory_identity(directory) == identity:
            return None
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return None                     # cannot tell (EACCES, say): not proof of a change
    return "the data directory %s was removed or replaced" % directory


def free_bytes(directory):
    """Bytes this process may still write on `directory`'s file system; None if it does not say."""
    st = os.statvfs(directory)
    if not st.f_blocks:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


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


class Ledger:
    """What the files hold besides the dict: the revision, and the keys' deadlines.

    revision   mutations applied since the store began (a batch is one):
               the snapshot keeps it, and replay counts on from it.
    deadlines  {key: milliseconds since the epoch} of the keys that expire;
               wall-clock time, so that a restart honours them.
    through    the last journal generation the snapshot holds: load()
               replays only later ones, so that no mutation is counted twice.
    """

    __slots__ = ("revision", "deadlines", "through")

    def __init__(self, revision=0, deadlines=None, through=0):
        self.revision, self.through = revision, through
        self.deadlines = {} if deadlines is None else deadlines

    def saved(self, data, through):
        """The second pickle of a snapshot: plain types only, the deadlines of `data`'s keys."""
        deadlines = self.deadlines
        if len(deadlines) != sum(1 for key in deadlines if key in data):
            deadlines = {key: ms for key, ms in deadlines.items() if key in data}
        return {"revision": self.revision, "through": through, "deadlines": deadlines}


def apply(data, op, key, value, extra=None, ledger=None):
    """Apply one mutation to a dict (and its ledger's deadlines): the meaning of a record.

    The caller counts the revision (one a record).
    `extra`: a PUT's deadline (milliseconds since the epoch, or None: the
    key is permanent); a BATCH's parts, each (op, key, value, deadline).
    """
    if op == PUT:
        data[key] = value
        if ledger is not None:
            if extra is None:
                ledger.deadlines.pop(key, None)
            else:
                ledger.deadlines[key] = extra
    elif op == DELETE or op == EXPIRE:
        data.pop(key, None)
        if ledger is not None:
            ledger.deadlines.pop(key, None)
    elif op == BATCH:
        for part in extra:
            apply(data, *part, ledger=ledger)
    else:
        data.clear()
        if ledger is not None:
            ledger.deadlines.clear()


# --------------------------------------------------------------- snapshot --

class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global (class, function) is refused.

    Unpickling a global is how a pickle runs code (`os.system`, say); a dict
    of str to bytes never needs one, so refusing them all costs nothing.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError("refusing to load global %s.%s" % (module, name))


class _Checksummed:
    """A file wrapper that counts and checksums (CRC32) the bytes passing through it.

    pickle.dump's file when writing (write); the unpickler's when reading
    (read, readinto, readline), and then it reads at most `limit` bytes, so
    that the unpickler never sees the trailer.
    """

    def __init__(self, file, limit=0):
        self.file, self.crc, self.size, self.left = file, 0, 0, limit

    def _count(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.left -= len(data)

    def write(self, data):
        self._count(data)
        return self.file.write(data)

    def read(self, n=-1):
        data = self.file.read(self.left if n is None or n < 0 else min(n, self.left))
        self._count(data)
        return data

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")[:self.left]
        n = self.file.readinto(view) or 0
        self._count(view[:n])
        return n

    def readline(self, size=-1):
        line = self.file.readline(self.left if size is None or size < 0 else min(size, self.left))
        self._count(line)
        return line

    def drain(self):
        """Read (and checksum) what is left."""
        while self.read(_CHUNK):
            pass


def dump_snapshot(data, file, ledger=None, through=0):
    """Pickle `data` (protocol 5) into file.write, frame by frame, then the checksum trailer.

    The bytes of store.pickle, and of a backup (GET /snapshot streams them
    into its socket): a checked snapshot.  With a ledger, a second pickle
    follows the dict: Ledger.saved(); pickle.load() of the file still gives
    the dict.  Returns the number of bytes written.
    """
    out = _Checksummed(file)
    pickle.dump(data, out, protocol=PICKLE_PROTOCOL)
    if ledger is not None:
        pickle.dump(ledger.saved(data, through), out, protocol=PICKLE_PROTOCOL)
    file.write(_TRAILER.pack(_TRAILER_MAGIC, out.size, out.crc))
    return out.size + _TRAILER.size


def _read_trailer(f, size, path):
    """The CRC32 a snapshot's trailer gives, or None if it has none (written before checksums)."""
    if size < _TRAILER.size:
        return None
    f.seek(size - _TRAILER.size)
    magic, length, crc = _TRAILER.unpack(f.read(_TRAILER.size))
    f.seek(0)
    if magic != _TRAILER_MAGIC:
        return None
    if length != size - _TRAILER.size:
        raise DataError("%s: snapshot is damaged: its trailer says %d bytes of pickle, "
                        "the file holds %d" % (path, length, size - _TRAILER.size))
    return crc


def _read_snapshot(f, path):
    """(the dict in the open snapshot file `f`, its Ledger, whether a checksum vouched for it).

    DataError if it is damaged.  One pass: the checksum is computed as the
    unpickler reads.  If the unpickling fails, the rest is read too, so
    that a damaged file is reported as such (its checksum) rather than by
    the unpickler's symptom.
    """
    size = os.fstat(f.fileno()).st_size
    crc = _read_trailer(f, size, path)
    reader = _Checksummed(f, size if crc is None else size - _TRAILER.size)
    saved = None
    try:
        unpickler = _NoGlobalsUnpickler(reader)
        data = unpickler.load()
        if reader.left:
            saved = unpickler.load()
        error = "unexpected data after the end" if reader.left else None
    except Exception as e:          # any damage surfaces as some exception
        data, error = None, str(e) or type(e).__name__
    if crc is not None:
        reader.drain()
        if reader.crc != crc:
            raise DataError("%s: snapshot is damaged: its checksum does not match its content"
                            % path)
    if error:
        raise DataError("%s: snapshot is corrupt: %s" % (path, error))
    # The types as sets (map and set run in C): a generator's test of each
    # pair took a third as long as the unpickling itself.
    if type(data) is not dict or not (set(map(type, data)) <= {str}
                                      and set(map(type, data.values())) <= {bytes}):
        raise DataError("%s: snapshot is not a dict of str to bytes" % path)
    return data, _saved_ledger(saved, path), crc is not None


def _saved_ledger(saved, path):
    """The Ledger of a snapshot's second pickle (Ledger.saved); an empty one if there is none."""
    if saved is None:
        return Ledger()
    try:
        revision, through, deadlines = saved["revision"], saved["through"], saved["deadlines"]
        if (type(revision) is int and type(through) is int and type(deadlines) is dict
                and all(type(k) is str and type(v) is int for k, v in deadlines.items())):
            return Ledger(revision, deadlines, through)
    except (TypeError, KeyError):
        pass
    raise DataError("%s: snapshot is corrupt: its revision and deadlines are malformed" % path)


def load_snapshot(path, ledger=None):
    """The dict stored at `path`, or {} if there is no snapshot.  Raises DataError.

    `ledger`: a Ledger to fill with the snapshot's revision and deadlines.
    """
    try:
        f = open(open_data_file(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DataError("%s: cannot read snapshot: %s" % (path, e.strerror))
    with f:
        try:
            data, saved, _ = _read_snapshot(f, path)
        except OSError as e:
            raise DataError("%s: cannot read snapshot: %s" % (path, e.strerror))
    if ledger is not None:
        ledger.revision, ledger.deadlines, ledger.through = (
            saved.revision, saved.deadlines, saved.through)
    return data


def check_snapshot(path):
    """Check a snapshot or a backup without a server: (keys, bytes, checksummed); DataError.

    `checksummed` is False for a file written before snapshots carried a
    checksum: it loads, but damage that still unpickles cannot be ruled out.
    """
    try:
        with open(path, "rb") as f:
            data, _, checksummed = _read_snapshot(f, path)
            return len(data), os.fstat(f.fileno()).st_size, checksummed
    except OSError as e:
        raise DataError("%s: cannot read: %s" % (path, e.strerror or e))


def write_snapshot(directory, data, ledger=None, through=0):
    """Atomically replace the snapshot with `data` (and `ledger`, see dump_snapshot).

    Returns the file's size.  `through`: the last journal generation it
    holds.  Guarantees: when it returns, the new snapshot is durable; if it
    raises (disk full, I/O error), the previous snapshot is intact.  It
    does not lock `data`: the caller passes a dict that nobody changes
    meanwhile.
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
            size = dump_snapshot(data, f, ledger, through)
            f.flush()
            os.fsync(f.fileno())
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

def encode_record(op, key, value, extra=None):
    """The bytes of one journal record, as a list of buffers for os.writev.

    A PUT with a deadline (`extra`) is written as PUT_EXPIRING, its value
    preceded by the deadline; a BATCH's value is its parts, each a
    _BATCH_PART then its key then its value (decode_mutation reads them).
    """
    key_bytes = key.encode("utf-8")
    if op == BATCH:
        body = []
        for part_op, part_key, part_value, deadline in extra:
            part_key = part_key.encode("utf-8")
            body.append(_BATCH_PART.pack(part_op, len(part_key), len(part_value),
                                         NO_DEADLINE if deadline is None else deadline)
                        + part_key)
            # No empty buffer: Python 3.12.1's writelines() spins on one (its
            # _write_sendmsg never drops it from the buffer).
            if part_value:
                body.append(part_value)
    elif op == PUT and extra is not None:
        op, body = PUT_EXPIRING, [_DEADLINE.pack(extra)] + ([value] if value else [])
    else:
        body = [value] if value else []
    op_key = _OP_KEY.pack(op, len(key_bytes)) + key_bytes
    length, crc = len(op_key), zlib.crc32(op_key)
    for buffer in body:
        length += len(buffer)
        crc = zlib.crc32(buffer, crc)
    length_crc = _LENGTH_CRC.pack(length, crc)
    header = length_crc + struct.pack("<I", zlib.crc32(length_crc))
    return [header + op_key] + body


def decode_mutation(buf, op, key, start, end):
    """(op, key, value, extra) of a record whose value is buf[start:end], as apply() takes them.

    Raises ValueError (or struct.error, UnicodeDecodeError) if it does not parse.
    """
    if op == PUT:
        return PUT, key, buf[start:end], None
    if op == PUT_EXPIRING:
        return PUT, key, buf[start + _DEADLINE.size:end], _DEADLINE.unpack_from(buf, start)[0]
    if op != BATCH:
        return op, key, b"", None
    parts = []
    while start < end:
        part_op, key_length, value_length, deadline = _BATCH_PART.unpack_from(buf, start)
        key_start = start + _BATCH_PART.size
        value_start = key_start + key_length
        start = value_start + value_length
        if start > end or part_op not in (PUT, DELETE, EXPIRE):
            raise ValueError("malformed batch")
        parts.append((part_op, buf[key_start:value_start].decode("utf-8"),
                      buf[value_start:start], None if deadline == NO_DEADLINE else deadline))
    return BATCH, key, b"", tuple(parts)


def encode_round(offset, synced, buffers):
    """One round on disk, as buffers for os.writev: its marker, then `buffers` (the records).

    `offset`: where the marker will start in the file; `synced`: how many
    bytes of the file are known fsynced (see "Journal files" above).
    """
    crc = length = 0
    for buffer in buffers:
        crc = zlib.crc32(buffer, crc)
        length += len(buffer)
    marker = b"".join(encode_record(ROUND, "", _MARKER.pack(offset, length, synced, crc)))
    return [marker] + list(buffers)


def scan_journal(buf, data, path, ledger=None):
    """Apply every record of the journal bytes `buf` to `data` (and `ledger`).

    Returns (records applied, end offset of the last sound round, or record
    in a journal without rounds).  If the end offset is less than len(buf),
    what follows is a torn tail.  Raises DataError for corruption (see the
    recovery rules above).
    """
    if buf[:len(JOURNAL_MAGIC)] == JOURNAL_MAGIC:
        return _scan_rounds(buf, data, path, ledger)
    return _scan_records(buf, data, path, ledger)


def _scan_rounds(buf, data, path, ledger):
    """scan_journal() of a journal with rounds: each round is checked whole, then applied."""
    view = memoryview(buf)
    size = len(buf)
    offset, count = len(JOURNAL_MAGIC), 0
    while offset < size:
        marker = _read_marker(buf, offset)
        if marker is None:
            _check_torn_round(buf, offset, offset + 1, path, "damaged round marker")
            break
        length, _, crc = marker
        start = offset + MARKER_SIZE
        end = start + length
        if end > size:
            break               # torn: cut short, and no round can start before its end
        if zlib.crc32(view[start:end]) != crc:
            # The marker is sound, so its length says where the next round starts.
            _check_torn_round(buf, offset, end, path, "checksum mismatch in round")
            break
        count += _apply_records(buf, start, end, data, path, ledger)
        offset = end
    return count, offset


def _read_marker(buf, offset):
    """(length, synced, crc) of the round whose marker starts at `offset`; None if there is none.

    A marker is a valid record of op ROUND that names the offset it is at.
    """
    if len(buf) - offset < MARKER_SIZE:
        return None
    (length, payload_crc, header_crc, op, key_length,
     at, round_length, synced, crc) = _MARKER_RECORD.unpack_from(buf, offset)
    view = memoryview(buf)
    if (at != offset or length != MARKER_SIZE - _HEADER.size or op != ROUND or key_length
            or zlib.crc32(view[offset:offset + 8]) != header_crc
            or zlib.crc32(view[offset + _HEADER.size:offset + MARKER_SIZE]) != payload_crc):
        return None
    return round_length, synced, crc


def _apply_records(buf, start, end, data, path, ledger):
    """Apply the records of a round whose checksum matched; DataError if they do not parse.

    The round's CRC covers every byte of them, so theirs are not checked
    again.  This loop is the replay speed: keep it free of calls it does
    not need (a PUT, the common record, is applied here).
    """
    unpack_length = _LENGTH.unpack_from
    unpack_op_key = _OP_KEY.unpack_from
    deadlines = ledger.deadlines if ledger is not None else {}
    offset, count = start, 0
    try:
        while offset < end:
            record = offset + _HEADER.size
            if record + _OP_KEY.size > end:
                break
            record_end = record + unpack_length(buf, offset)[0]
            op, key_length = unpack_op_key(buf, record)
            key_start = record + _OP_KEY.size
            value_start = key_start + key_length
            if record_end > end or op not in MUTATIONS or value_start > record_end:
                break
            key = buf[key_start:value_start].decode("utf-8")
            if op == PUT:
                data[key] = buf[value_start:record_end]
                if deadlines:
                    deadlines.pop(key, None)
            else:
                apply(data, *decode_mutation(buf, op, key, value_start, record_end),
                      ledger=ledger)
            count += 1
            offset = record_end
    except (UnicodeDecodeError, ValueError, struct.error):
        pass
    if ledger is not None:
        ledger.revision += count
    if offset != end:
        raise DataError("%s: malformed record at offset %d, in a round whose checksum matches: "
                        "written wrong, not torn" % (path, offset))
    return count


def _check_torn_round(buf, damaged, search_from, path, what):
    """Damage at `damaged`: return if it is a torn tail, else raise DataError.

    Torn, unless a valid round after it says that the damaged bytes had
    been fsynced when it was written (its `synced` is past them).
    """
    for found, synced, _ in _later_rounds(buf, search_from):
        if synced > damaged:
            raise DataError("%s: %s at offset %d, and a valid round written after it was "
                            "fsynced follows at offset %d: the journal is corrupt, not torn"
                            % (path, what, damaged, found))


def _later_rounds(buf, start):
    """(offset, synced, whole) of each valid marker at or after `start`, found at any byte.

    `whole`: its round's checksum matches too; the search goes on after
    that round, or after any other valid record, so no byte is searched
    twice.
    """
    view = memoryview(buf)
    offset = start
    while True:
        found = find_valid_record(buf, offset)
        if found is None:
            return
        offset = found + _HEADER.size + _LENGTH.unpack_from(buf, found)[0]
        marker = _read_marker(buf, found)
        if marker is not None:
            length, synced, crc = marker
            whole = offset + length <= len(buf) and zlib.crc32(
                view[offset:offset + length]) == crc
            yield found, synced, whole
            if whole:
                offset += length


def _scan_records(buf, data, path, ledger):
    """scan_journal() of a journal without rounds (written before them): record by record."""
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
        apply(data, op, buf[key_start:value_start].decode("utf-8"), buf[value_start:end],
              ledger=ledger)
        count += 1
        offset = end
    if ledger is not None:
        ledger.revision += count
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


def describe_tail(buf, end):
    """What load() logs about the torn tail of the journal bytes `buf`, which starts at `end`."""
    size = len(buf) - end
    if buf[:len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        return "incomplete record at offset %d (%d bytes, the trace of a crash)" % (end, size)
    later = sum(whole for _, _, whole in _later_rounds(buf, end + 1))
    return ("torn round at offset %d (%d bytes to the end, never fsynced: the trace of a crash%s)"
            % (end, size, "; %d whole round(s) after it, written but not yet fsynced, go with it"
               % later if later else ""))


def load(directory, log, ledger=None):
    """Recover the dict from `directory`: the snapshot, then every journal it does not hold.

    Returns (data, next journal generation, replayed record count), and
    fills `ledger` (a Ledger) with the revision and deadlines.  Raises
    DataError, having modified nothing, if a file is unreadable or corrupt.
    Torn tails are truncated, and journals without a record removed, only
    once every file has been read and found sound: that is recovery, and it
    never happens on a refusal to start.  None of it needs free space.
    """
    path = snapshot_path(directory)
    ledger = Ledger() if ledger is None else ledger
    started = time.monotonic()
    data = load_snapshot(path, ledger)
    log("Loaded %d keys from %s in %.2f s" % (len(data), path, time.monotonic() - started))
    generations = journal_generations(directory)
    replayed, torn, empty = 0, [], []
    started = time.monotonic()
    for generation in generations:
        if generation <= ledger.through:
            continue            # a crash between a checkpoint's steps c and d: held already
        journal = journal_path(directory, generation)
        buf = read_journal(journal)
        count, end = scan_journal(buf, data, journal, ledger)
        replayed += count
        if end < len(buf):
            torn.append((journal, end, describe_tail(buf, end)))
        if count == 0:
            empty.append(journal)
    for journal, end, description in torn:
        log("Journal %s: %s; cutting it off" % (journal, description))
        if journal not in empty:
            truncate_journal(journal, end)
    _remove_empty(directory, empty, log)
    if generations:
        seconds = time.monotonic() - started
        log("Replayed %d journal records from %d file(s) in %.2f s (%d records/s); %d keys"
            % (replayed, len(generations), seconds, replayed / max(seconds, 1e-9), len(data)))
    next_generation = max(generations[-1] if generations else 0, ledger.through) + 1
    return data, next_generation, replayed


def _remove_empty(directory, journals, log):
    """Remove journal files that hold no record (each start that failed left one).

    Cleanup, not recovery: if it fails, the files stay, and the start goes on.
    """
    if not journals:
        return
    try:
        for journal in journals:
            os.unlink(journal)
        fsync_directory(directory)
    except OSError as e:
        log("Could not remove a journal that holds no record: %s" % e)
        return
    log("Removed %d journal file(s) that held no record" % len(journals))


def journal_is_empty(path):
    """True if the journal file at `path` holds no record (at most its header)."""
    return os.stat(path).st_size <= len(JOURNAL_MAGIC)


# ------------------------------------------------------------- checkpoints --

def build_snapshot(directory, through):
    """Checkpoint step c, in the child: snapshot + journals <= `through` -> new snapshot.

    Reads only; writes nothing but the new snapshot (write_snapshot).  A
    torn tail is left alone (the server's own load() cut every tail before
    it started, and its journal cuts off what a failed write left): the
    records before it are the ones the server applied.  Returns (keys, bytes).
    """
    ledger = Ledger()
    data = load_snapshot(snapshot_path(directory), ledger)
    for generation in journal_generations(directory):
        if ledger.through < generation <= through:
            journal = journal_path(directory, generation)
            scan_journal(read_journal(journal), data, journal, ledger)
    return len(data), write_snapshot(directory, data, ledger, through)


def snapshot_in_child(directory, through, pass_fds=()):
    """Run build_snapshot() in a new Python process; wait for it.  Returns (keys, bytes).

    A child of its own, started afresh (never a fork of this threaded
    process): the live dict is never copied, and the unpickling and
    pickling do not compete with the request threads for the GIL.
    `pass_fds`: the directory's LOCK, so that no server can start while the
    child writes; the child dies with this process (_die_with_parent).
    Call it from a thread that lives as long as the server.  Raises
    OSError, with the child's errno if it had one, if the child fails.
    """
    child = subprocess.run(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), "checkpoint", directory,
         str(through), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=pass_fds)
    out = child.stdout.split()
    if child.returncode != 0:
        reason = child.stderr.decode("utf-8", "replace").strip().splitlines() or [
            "exit status %d" % child.returncode]
        number = int(out[1]) if len(out) == 2 and out[0] == b"errno" else None
        raise OSError(number, "checkpoint process failed: %s" % reason[-1])
    keys, size = out
    return int(keys), int(size)


def _checkpoint_main(directory, through, parent):
    """The child's entry point (python3 persistence.py checkpoint DIR N PID): exit 0, or 1.

    On failure stdout says `errno N` (when there is one: the server tells a
    full disk from other failures by it), stderr why.
    """
    if not _die_with_parent(int(parent)):
        return 1
    try:
        # The parent may be pinned to one CPU (--cpu): this work belongs on another.
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    try:
        keys, size = build_snapshot(directory, int(through))
    except (DataError, OSError) as e:
        if getattr(e, "errno", None):
            sys.stdout.write("errno %d\n" % e.errno)
        sys.stderr.write("%s\n" % e)
        return 1
    sys.stdout.write("%d %d\n" % (keys, size))
    return 0


_PR_SET_PDEATHSIG = 1           # linux/prctl.h


def _die_with_parent(parent):
    """In a child: SIGKILL this process when the server dies.  False if it has died already.

    A child that outlived a server killed alone (kill -9 of its pid, the
    OOM killer) would hold the LOCK it inherited: the next start would
    wait for it, or give up "in use".  Linux sends the signal when the
    *thread* that started the child ends, so children are started only by
    threads that live as long as the server.  The getppid() check closes
    the race with a parent that died before the prctl() call.  Where there
    is no prctl, only that check is made.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes               # here: only the children need it
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0))
        except (ImportError, OSError, AttributeError):
            pass
    return os.getppid() == parent


# ---------------------------------------------------------------- journal --

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # out of room: retried

# The channel between a Journal and its writer: a socket pair.
#   to the writer:   _ROUND (fsync wanted, number of segments, round number,
#                    epoch), that many _SEGMENT (generation, length), then
#                    the segments' bytes
#   from the writer: _REPLY (kind, phase, errno, fsyncs so far, their
#                    seconds, round number, length of a detail), then the
#                    detail, UTF-8
_ROUND = struct.Struct("<BIQQ")
_SEGMENT = struct.Struct("<QQ")
_REPLY = struct.Struct("<BBiQdQI")
DONE, FULL, FAILED = 0, 1, 2        # replies to a round: its outcome
ROOM, SYNCED, BROKEN = 3, 4, 5      # news: room again; a late fsync done, or failed
GONE = 6                            # the directory or a journal file removed or replaced
_PHASES = ("write", "fsync")


def _create(directory, generation):
    """Create the file of a new generation and make its name durable.

    If the directory's fsync fails, the new file is removed again: a file
    left behind would make the next checkpoint's create fail with "File
    exists", and every one after it.
    """
    path = journal_path(directory, generation)
    os.close(open_data_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    try:
        fsync_directory(directory)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


class Journal:
    """The open journal: records queued in order, then written and fsynced in rounds.

    Two halves.  This object, in the server's process, queues the records
    and keeps the callbacks.  The writer (_write_rounds) does every write
    and fsync of the journal files, in a process of its own; the link to it
    (_WriterLink) starts it and carries the rounds to it and its replies
    back, on an asyncio event loop: the server's own (`loop`), or, for tools
    and tests, one the link runs on a thread of its own.  The rounds sent
    wait for the writer's replies in _RoundsInFlight, which applies and
    answers what is durable, fails what failed, and keeps what the replies
    tell: whether the journal still works, and the fsync counters.

    append() must be called with the store lock held: that is what makes the
    order of records the order of changes to the dict.  It only queues the
    encoded record in memory, and makes no system call: a thread that made
    one while holding the store lock would give up the GIL, and then need it
    back from the other threads before it could let go of the lock; every
    other writer would queue behind that wait (a lock convoy).

    Rounds are started and finished on the loop: the first record or
    callback queued in a loop turn asks for a pump() (call_soon), which
    runs after the turn's other callbacks, so that every write queued in the
    turn joins one round; the writer's replies come back through the link
    (_received).  Rounds do not wait for each other: the writer takes every
    round that has arrived while it was busy, writes them all, and, as the
    policy says, fsyncs once for them all (group commit):

      always    an fsync every round.
      everysec  an fsync at most once a second (a power loss may lose the
                last second); writes still go to the OS every round.
      no        no fsync; the OS writes to disk when it likes.

    Then the loop hands the round's records to its owner's apply_round
    (attach(): the store applies them to the dict, so that readers see only
    what is durable) and runs the callbacks of that round: append(...,
    callback) and when_durable(callback) ask for callback(None) once the
    record (every record appended so far) is written, so it survives a
    killed process, and fsynced as above, so it survives a power loss; or
    callback(error) if that failed.  That is the one way to wait for
    durability; commit() and sync() wait on it from another thread.

    When a round fails, its records and every record queued after them fail
    too, and none of them is ever replayed; a full disk is retried, any
    other failure is fatal (`failed`), and a data directory or journal file
    removed or replaced fails the journal for good, `vanished` saying why:
    see _RoundsInFlight.
    """

    POLICIES = ("always", "everysec", "no")
    PROBE_INTERVAL = 1.0        # seconds between probes for room after a full disk
    # The writer process: a new interpreter (never a fork of this threaded
    # process), told the channel's fd, the directory and the policy.  -S: it
    # needs nothing but the standard library, so no site-packages (nor their
    # .pth files, which run at every start of an interpreter that reads them).
    WRITER_COMMAND = [sys.executable, "-I", "-S", os.path.abspath(__file__), "journal-writer"]
    # The fsync latency histogram's buckets, in seconds (GET /metrics).
    FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self, directory, generation, policy, loop=None, pass_fds=()):
        assert policy in self.POLICIES
        self.directory = directory
        self.policy = policy
        self.generation = generation
        self.size = 0                   # bytes appended to the current file
        self.records = 0                # appended since this object was opened
        _create(directory, generation)
        self._segments = [[generation, []]]     # [generation, buffers] of records not yet sent
        self._records = []              # (op, key, value) of those records, in order
        self._callbacks = []            # callbacks for the next round
        self._sync_wanted = False       # the next round fsyncs, whatever the policy
        self._lock = threading.Lock()   # guards the queue: _segments, _records, _callbacks,
                                        # _sync_wanted, size, records
        self._pump_due = False          # a pump() is scheduled on the loop
        self._in_flight = _RoundsInFlight(self)     # sent, until the writer replies
        self._link = _WriterLink(self, self.WRITER_COMMAND, directory, policy, loop, pass_fds)
        self._link.connect()            # once self._link is set: the loop pumps once connected

    # What the writer's replies tell, kept by the rounds in flight: read them, nothing more.
    failed = property(lambda self: self._in_flight.failed)
    problem = property(lambda self: self._in_flight.problem)
    vanished = property(lambda self: self._in_flight.vanished)
    fsyncs = property(lambda self: self._in_flight.fsyncs)
    fsync_seconds = property(lambda self: self._in_flight.fsync_seconds)
    fsync_histogram = property(lambda self: self._in_flight.fsync_histogram)
    _process = property(lambda self: self._link.process)   # the writer (tests read its pid)

    def attach(self, owner, log):
        """Who hears of the rounds: `owner` has three methods, all called on the loop.

          apply_round(records)  a round is durable: its (op, key, value) records
          fail_queued()         a round failed: drop what is queued after it,
                                and return the callbacks of what was dropped
          journal_failed(error) the journal has failed for good (once)
        `log(message)` reports full disks, failures and recoveries.
        """
        self._in_flight.attach(owner, log)

    # -- store lock held ------------------------------------------------------

    def append(self, record, callback=None):
        """Queue one record (op, key, value), and its callback.  Caller holds the store lock."""
        if self.failed:
            raise OSError("journal unusable since an earlier error: %s" % self.failed)
        buffers = encode_record(*record)
        with self._lock:
            self._segments[-1][1].extend(buffers)
            self._records.append(record)
            self.size += sum(map(len, buffers))
            self.records += 1
            if callback is not None:
                self._callbacks.append(callback)
        if callback is not None:
            self._wake()

    def drop_queued(self):
        """Forget every record not yet sent to the writer; return their callbacks.

        Called (with the store lock held, by the store) when a round fails.
        """
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
            self._records = []
            self._segments = [[generation, []] for generation, _ in self._segments]
            self.size = self._in_flight.written.get(self.generation, 0)
        return callbacks

    def switch(self, generation):
        """Checkpoint step b: new records go to the prepared file.  Caller holds the store lock.

        Returns the generation of the file left behind.  Its queued records
        and its last fsync are left to the next round: none is lost, and no
        writer waits for the switch.
        """
        with self._lock:
            old, self.generation = self.generation, generation
            self._segments.append([generation, []])
            self.size = 0           # not _in_flight.written: the loop alone touches that
        return old

    # -- store lock NOT held --------------------------------------------------

    def prepare_next(self):
        """Checkpoint step a: create the next journal file; returns its generation, for switch()."""
        _create(self.directory, self.generation + 1)
        return self.generation + 1

    def when_durable(self, callback):
        """Call callback(None), on the loop, once every record appended so far is durable.

        Durable means written, and fsynced as the policy says; if that
        fails, the callback gets the OSError instead.  Either way it is
        called exactly once.  It must not block, nor raise: the replies of
        every other writer in its round wait behind it.
        """
        with self._lock:
            self._callbacks.append(callback)
        self._wake()

    def commit(self):
        """From a thread other than the loop's: return once every record appended so far is
        durable.  Raises OSError."""
        assert not self._link.on_loop(), "commit() would wait for itself"
        done, outcome = threading.Event(), []
        self.when_durable(lambda error: (outcome.append(error), done.set()))
        done.wait()
        if outcome[0] is not None:
            raise OSError(outcome[0].errno, "journal write failed: %s"
                          % (outcome[0].strerror or outcome[0]))

    def sync(self):
        """Write and fsync every record appended so far, whatever the policy."""
        with self._lock:
            self._sync_wanted = True
        self.commit()

    def discard(self):
        """Close and delete the file of a journal that never received a record."""
        assert self.records == 0
        self._link.stop()
        os.unlink(journal_path(self.directory, self.generation))

    def close(self):
        """Write and fsync everything, run every callback, stop the writer.  No append may follow.

        From a thread other than the loop's.  Does not raise: if the journal
        fails (or had failed), the callbacks are told so.
        """
        try:
            self.sync()
        except OSError:
            pass
        self._link.stop()

    # -- on the loop ------------------------------------------------------------

    def _wake(self):
        """Ask for a pump() after this loop turn: the turn's records share one round."""
        if self._pump_due:
            return
        self._pump_due = True
        self._link.call_soon(self.pump)

    def _queued(self):
        """Callbacks, a sync, a switch or records wait for a round."""
        segments = self._segments
        return bool(self._callbacks or self._sync_wanted or len(segments) > 1 or segments[0][1])

    def pump(self):
        """Send a round of what is queued, if anything is."""
        self._pump_due = False          # before the queue is read: a later wake pumps again
        if not self._link.connected():
            return                      # not connected yet: the link pumps once it is
        with self._lock:
            if not self._queued():
                return
            segments = self._segments
            if self.failed:
                callbacks, self._callbacks = self._callbacks, []
                self._sync_wanted = False
            elif self._link.closing():
                return                  # the writer has gone: _writer_gone fails the queue
            else:
                callbacks = None
                self._segments = [[self.generation, []]]
                records, self._records = self._records, []
                round_callbacks, self._callbacks = self._callbacks, []
                sync, self._sync_wanted = self._sync_wanted, False
        if callbacks is not None:       # failed for good: nothing is written any more
            return _run_callbacks(callbacks, self.failed)
        sizes = [(generation, sum(map(len, buffers))) for generation, buffers in segments]
        number, epoch = self._in_flight.add(records, round_callbacks, sizes)
        self._link.send_round(sync, number, epoch, segments, sizes)

    def _received(self, replies):
        """The writer's replies, decoded by the link; each ends rounds, or brings news."""
        for reply in replies:
            self._in_flight.reply(*reply)
        self.pump()

    def _writer_gone(self):
        """The link: the writer process exited, or the channel broke, before close(): fatal."""
        self._in_flight.fail(OSError(errno.EIO, "the journal writer process exited"),
                             "write", True, "")


class _RoundsInFlight:
    """A journal's rounds from their sending to the writer's reply, and what the replies tell.

    A round is numbered as it is sent (add).  The writer's reply ends it:
    DONE, its records go to the owner's apply_round and its callbacks get
    None; or it failed, and so did every round after it.  All on the loop.

    When a round fails, its records and every record queued after them fail
    too (the owner's fail_queued: a write queued later may have been
    checked against one that failed), and the writer truncates away what the round wrote,
    so that no failed record is ever replayed:
      - a write that fails for lack of room (ENOSPC, EDQUOT, EFBIG) is
        retried with the next records: `problem` says why meanwhile, and
        once a second the writer probes (posix_fallocate) whether there is
        room again;
      - any other failed write, or a failed truncation, and every failed
        fsync, is fatal (`failed`): the journal refuses every later record.
        After an fsync error Linux may have dropped the dirty pages and
        marked them clean, so a second fsync would report success for data
        that is not on disk (PostgreSQL's "fsyncgate", 2018): it is never
        retried.  The owner's journal_failed is called once, on the loop.
    A writer process that dies before the journal is closed is fatal too
    (Journal._writer_gone).  A writer that finds the data directory, or a
    journal file, removed or replaced (GONE) fails the journal for good
    too, `vanished` saying why, but journal_failed is not called: reads go
    on.  Every reply also brings the writer's fsync counters.
    """

    def __init__(self, journal):
        self._journal = journal         # its directory, its file now, its queue (drop_queued)
        self._owner = None              # apply_round, fail_queued, journal_failed (attach)
        self._log = lambda message: None
        self.failed = None              # the OSError that broke the journal for good, if any
        self.problem = None             # why writes fail for now (a full disk), if they do
        self.vanished = None            # why, if the files were removed or replaced under us
        self.fsyncs = 0                 # rounds fsynced (each may cover many records)
        self.fsync_seconds = 0.0        # time spent in those rounds, writes included
        self.fsync_histogram = [0] * (len(Journal.FSYNC_BUCKETS) + 1)   # the last: +Inf
        # Bytes made good in each file, by rounds done.  The loop's alone: the
        # checkpointer's switch() once added to it, and the loop, iterating
        # it to retire old files, could fail ("changed size during iteration").
        self.written = {journal.generation: 0}
        self._rounds = collections.deque()  # (number, records, callbacks, sizes) in flight
        self._numbered = 0              # rounds sent so far
        self._epoch = 0                 # rounds since the last failure (see fail)

    def attach(self, owner, log):
        """Journal.attach: who hears of the rounds, and where the news goes."""
        self._owner, self._log = owner, log

    def add(self, records, callbacks, sizes):
        """A round is sent, of `sizes` ((generation, length)): its number and epoch."""
        self._numbered += 1
        self._rounds.append((self._numbered, records, callbacks, sizes))
        return self._numbered, self._epoch

    def reply(self, kind, phase, error, fsyncs, seconds, last, detail):
        """One reply: DONE, rounds <= `last` are durable; FULL or FAILED, round `last` failed."""
        self._count_fsyncs(fsyncs, seconds)
        if kind == ROOM:
            if self.problem and not self.failed:
                self._room_again()
            return
        if kind == SYNCED:
            return                          # its news is in the counters
        if kind == BROKEN:                  # everysec: the late fsync of a round done
            return self.fail(error, phase, True, detail)
        if kind == GONE:
            return self._gone(error, detail)
        rounds = self._rounds
        if kind != DONE:
            if rounds and rounds[0][0] == last:     # else a round failed already
                self.fail(error, phase, kind == FAILED, detail)
            return
        while rounds and rounds[0][0] <= last:
            _, records, callbacks, sizes = rounds.popleft()
            for generation, size in sizes:
                self.written[generation] = self.written.get(generation, 0) + size
            if records and self.problem and not self.failed:
                self._room_again()
            if records and self._owner is not None:
                self._owner.apply_round(records)
            _run_callbacks(callbacks, None)
        for generation in [g for g in self.written if g < self._journal.generation]:
            del self.written[generation]        # retired: the writer has closed it

    def _count_fsyncs(self, fsyncs, seconds):
        """The writer's counters, and the fsync latency histogram: a reply covers one fsync at
        most under `always` (a group, one fsync), so the time it adds is that fsync's."""
        if fsyncs > self.fsyncs:
            each = (seconds - self.fsync_seconds) / (fsyncs - self.fsyncs)
            self.fsync_histogram[bisect.bisect_left(Journal.FSYNC_BUCKETS, each)] += \
                fsyncs - self.fsyncs
        self.fsyncs, self.fsync_seconds = fsyncs, seconds

    def fail(self, error, phase, fatal, detail):
        """The first round in flight failed, or the journal broke: fail every write not yet done.

        The rounds sent after the failed one fail with it (a write in them
        may have been checked against a failed one); so does everything
        queued.  The writer drops, unwritten, the rounds of the failed
        epoch that reach it after its failure; the rounds sent from now on
        belong to the next epoch.
        """
        if fatal and self.failed:
            fatal = False                   # already broken: told once
        elif fatal:
            self.failed = error
            self.problem = "journal %s failed: %s" % (phase, error.strerror or error)
            self._log("Journal %s: %s; no more writes are taken" % (self._path(), self.problem))
        elif self.problem is None:
            self.problem = "disk full: %s" % (error.strerror or error)
            self._log("Journal %s: %s; writes get 507 until there is room"
                     % (self._path(), self.problem))
        if detail:
            self._log("Journal %s: %s" % (self._path(), detail))
        callbacks = [callback for round in self._rounds for callback in round[2]]
        self._rounds.clear()
        self._epoch += 1
        owner = self._owner
        dropped = owner.fail_queued() if owner is not None else self._journal.drop_queued()
        _run_callbacks(callbacks + dropped, self.failed or error)
        if fatal and owner is not None:
            owner.journal_failed(error)

    def _gone(self, error, detail):
        """The writer found the directory, or a journal file, removed or replaced (`detail`).

        Failed for good, as after an fsync error, but reads go on:
        journal_failed is not called.  `vanished` tells the store why, so that it writes
        no snapshot into a directory that is no longer this server's.
        """
        if self.failed:
            return
        self.failed = error
        self.problem = self.vanished = detail
        self._log("%s; no more writes are taken, reads go on" % detail)
        self.fail(error, "write", False, "")

    def _room_again(self):
        self.problem = None
        self._log("Journal %s: writable again" % self._path())

    def _path(self):
        """The journal's file now, for the log."""
        return journal_path(self._journal.directory, self._journal.generation)


def _run_callbacks(callbacks, error):
    for callback in callbacks:
        try:
            callback(error)
        except Exception:
            # A caller's bug: report it, but do not let it cost the
            # other callers their replies, or stop the journal.
            sys.excepthook(*sys.exc_info())

class _WriterLink:
    """A journal's link to its writer process: the process, and the socket pair to it.

    The writer (_write_rounds) does every write and fsync of the journal
    files, in a process of its own (inheriting `pass_fds`: the directory's
    LOCK), so that it never needs the GIL of the thread serving requests.
    A writer thread did: after each fsync it waited for the GIL that the
    busy server held, and each such hand-off cost both threads wake-ups and
    waits (PUT at 64 connections: 0.34-0.38x the asyncio server with the
    thread, 0.41-0.45x with the process).  The two talk over a socket pair,
    which an asyncio event loop reads and writes as this protocol: the
    server's own loop (`loop`), or, for tools and tests, a loop the link
    runs on a thread of its own (journal-loop).  The code that drives the
    rounds is the same either way.

    The writer ignores the signals that stop the server, and exits when its
    end of the channel closes (stop(), when the journal is closed), after
    the round in hand; it dies with the server (_die_with_parent), so
    create the journal on a thread that lives as long as the server does.

    On the loop, the link calls the journal's pump() once connected, its
    _received(replies) with each whole reply the writer sent, and its
    _writer_gone() if the channel closes before stop().

    It is an asyncio protocol by its methods (asyncio calls no others), not
    by inheriting asyncio.Protocol: this file is also the writer's and the
    checkpoint's script, which have no use for asyncio (see the imports).
    """

    def __init__(self, journal, command, directory, policy, loop, pass_fds):
        """Start the writer process, `command` with the channel's fd, `directory` and `policy`."""
        self._journal = journal
        self._replies = b""             # received from the writer, not yet read
        self._stopping = False
        self._transport = None          # the channel, once the loop has it (_connect)
        self._own_loop = None           # the thread running a loop of our own, if any
        self.channel, writer_end = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                command + [str(writer_end.fileno()), directory, policy, str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(writer_end.fileno(),) + tuple(pass_fds),
                start_new_session=True)
        except BaseException:
            self.channel.close()
            raise
        finally:
            writer_end.close()
        if loop is None:
            import asyncio              # the server has it already; a tool pays for it here
            loop = asyncio.new_event_loop()
            self._own_loop = threading.Thread(target=loop.run_forever, name="journal-loop",
                                              daemon=True)
            self._own_loop.start()
        self._loop = loop
        self._loop_thread = None        # its thread's ident, once it runs our code

    def connect(self):
        """Have the loop take the channel, then pump the journal."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._connect()))

    async def _connect(self):
        self._loop_thread = threading.get_ident()
        self._transport, _ = await self._loop.connect_accepted_socket(lambda: self, self.channel)
        self._journal.pump()

    def connected(self):
        """The loop has the channel: rounds can be sent."""
        return self._transport is not None

    def closing(self):
        """The channel is closing (stop(), or the writer has gone): nothing more gets through."""
        return self._transport.is_closing()

    def on_loop(self):
        """This thread runs the loop."""
        return threading.get_ident() == self._loop_thread

    def call_soon(self, callback):
        """Run callback on the loop, after the callbacks already queued there.  From any thread."""
        if self.on_loop():
            self._loop.call_soon(callback)
        else:
            self._loop.call_soon_threadsafe(callback)     # the checkpointer, tools, tests

    def send_round(self, sync, number, epoch, segments, sizes):
        """On the loop: send round `number` of `epoch`, its segments ([generation, buffers]) of
        `sizes` ((generation, length)); the transport buffers what the channel does not take
        at once."""
        parts = [_ROUND.pack(sync, len(sizes), number, epoch)
                 + b"".join(_SEGMENT.pack(*size) for size in sizes)]
        for _, buffers in segments:
            parts.extend(buffers)
        self._transport.writelines(parts)

    def data_received(self, data):
        """The writer's replies: each whole one, decoded, to the journal."""
        buf = self._replies + data
        replies = []
        while len(buf) >= _REPLY.size:
            kind, phase, number, fsyncs, seconds, last, length = _REPLY.unpack_from(buf)
            end = _REPLY.size + length
            if len(buf) < end:
                break
            detail, buf = buf[_REPLY.size:end].decode("utf-8", "replace"), buf[end:]
            replies.append((kind, _PHASES[phase], OSError(number, os.strerror(number)),
                            fsyncs, seconds, last, detail))
        self._replies = buf
        self._journal._received(replies)

    def connection_made(self, transport):
        pass                        # _connect has the transport

    def pause_writing(self):
        pass                        # as asyncio.Protocol's: the server caps the journal's
                                    # backlog (Server.journal_has_room), not the link

    def resume_writing(self):
        pass

    def eof_received(self):
        return False                # the writer has gone: close our end too

    def connection_lost(self, exc):
        if not self._stopping:      # expected once the journal is closed, fatal before
            self._journal._writer_gone()

    def stop(self):
        """End the channel (the writer closes its files and exits), and our loop if we run one."""
        self._stopping = True
        done = threading.Event()

        def end_channel():
            if self._transport is not None:
                self._transport.close()         # what is buffered goes first
            else:
                self.channel.close()
            done.set()
        self._loop.call_soon_threadsafe(end_channel)
        done.wait()
        self.process.wait()
        if self._own_loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._own_loop.join()
            self._loop.close()


# ------------------------------------------------------------- the writer --

def _write_rounds(channel, directory, policy):
    """The writer: rounds into the journal files, and the fsyncs; a reply per group of rounds.

    Runs in a process of its own (_writer_main) or in a thread; it returns
    when the channel closes.  It takes every round that has arrived (a
    group), writes them in order (a round on disk per file: _write_group),
    fsyncs once for them all as the policy says, and replies DONE for the
    group's last round; or, if a write or an fsync failed, FULL or FAILED
    for its first round, after cutting every file back to where the group
    found it.  After a FULL, the rounds of the same epoch that follow are
    dropped unwritten (the journal has failed them already); after a
    FAILED, every later round gets FAILED.  Files are opened by generation
    as rounds name them; a file older than the newest is retired: fsynced
    and closed, whatever the policy.  If the directory or a file vanishes
    (see "The data directory under the server's feet"), it replies GONE,
    and FAILED to every later round.
    """
    _Writer(channel, directory, policy).run()


class _Writer:
    """The writer's state between groups of rounds, and its loop (_write_rounds)."""

    CHECK_INTERVAL = 1.0        # seconds between two checks that the files are still ours

    def __init__(self, channel, directory, policy):
        self.channel, self.directory, self.policy = channel, directory, policy
        try:
            self.identity = directory_identity(directory)
        except OSError:
            self.identity = None        # gone already: the first check says so
        self.files = {}                 # generation -> _JournalFile
        self.counters = [0, 0.0]        # fsyncs, their seconds
        self.fsync_due = None           # everysec: when the oldest unsynced write must be fsynced
        self.probe_due = None           # after a full disk: when to look for room again
        self.check_due = time.monotonic()   # when to check that the files are still ours
        self.broken = None              # (phase, errno) once the journal has failed for good
        self.void_epoch = None          # the epoch of the last FULL: its later rounds are dropped

    def run(self):
        self.channel.setblocking(True)
        try:
            while True:
                if not self.broken and time.monotonic() >= self.check_due:
                    self._check_files()
                if not select.select([self.channel], [], [], self._timeout())[0]:
                    self._timers()
                    continue
                group = self._take_group()
                if group is None:
                    return                      # the journal is closed
                if group:
                    self._write(group)
        except (ConnectionError, EOFError):
            return                              # the server is gone
        finally:
            for journal in self.files.values():
                os.close(journal.fd)
            self.channel.close()

    def reply(self, kind, phase="write", number=0, last=0, detail=""):
        detail = detail.encode("utf-8", "replace")
        self.channel.sendall(_REPLY.pack(kind, _PHASES.index(phase), number, self.counters[0],
                                         self.counters[1], last, len(detail)) + detail)

    def _timeout(self):
        """Seconds until the next timer is due; None if none is set."""
        dues = [due for due in (self.fsync_due, self.probe_due,
                                None if self.broken else self.check_due) if due is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _timers(self):
        """Nothing arrived before a timer was due: an fsync owed (everysec), a probe for room."""
        now = time.monotonic()
        if self.fsync_due is not None and now >= self.fsync_due:
            self.fsync_due = None
            error = _timed_fsync(self.files[max(self.files)], self.counters)
            if error is None:
                self.reply(SYNCED)
            else:
                self.broken = ("fsync", error.errno)
                self.reply(BROKEN, "fsync", error.errno)
        if self.probe_due is not None and now >= self.probe_due:
            if self.broken or not self.files or _probe(self.files[max(self.files)]):
                self.probe_due = None
                if not self.broken:
                    self.reply(ROOM)
            else:
                self.probe_due = now + Journal.PROBE_INTERVAL

    def _check_files(self):
        """Once a second: the directory is still the one opened, each open file still in it."""
        self.check_due = time.monotonic() + self.CHECK_INTERVAL
        gone = _vanished(self.directory, self.identity, self.files)
        if gone:
            self._gone(gone, 0)

    def _gone(self, detail, last):
        self.broken = ("write", errno.ENOENT)
        self.fsync_due = self.probe_due = None
        self.reply(GONE, "write", errno.ENOENT, last, detail)

    def _take_group(self):
        """The rounds that have arrived, less those to drop; None once the channel has closed."""
        group = []
        while True:
            round = _recv_round(self.channel)
            if round is None:
                return None
            sync, number, epoch, segments = round
            if self.broken:
                self.reply(FAILED, self.broken[0], self.broken[1], number)
            elif epoch != self.void_epoch:
                group.append(round)
            if not select.select([self.channel], [], [], 0)[0]:
                return group                    # no more rounds have arrived

    def _write(self, group):
        """Write a group of rounds, fsync as the policy says, and reply."""
        fsync = (self.policy == "always" or any(round[0] for round in group)
                 or (self.fsync_due is not None and time.monotonic() >= self.fsync_due))
        segments = [segment for round in group for segment in round[3]]
        kind, phase, number, detail = _write_group(self.directory, self.files, segments, fsync,
                                                   self.counters)
        if kind not in (DONE, GONE):        # a failure may be the sign of a vanished directory
            gone = _vanished(self.directory, self.identity, self.files)
            if gone:
                kind, detail = GONE, gone
        if kind == DONE:
            if fsync:
                self.fsync_due = None
            elif self.policy == "everysec" and self.fsync_due is None and any(
                    data for _, data in segments):
                self.fsync_due = time.monotonic() + 1.0
            self.probe_due = None
            return self.reply(DONE, last=group[-1][1])
        if kind == GONE:
            return self._gone(detail, group[0][1])
        if kind == FULL:
            self.probe_due = time.monotonic() + Journal.PROBE_INTERVAL
            self.void_epoch = group[0][2]
        else:
            self.broken = (phase, number)
            self.fsync_due = self.probe_due = None
        self.reply(kind, phase, number, group[0][1], detail)


class _JournalFile:
    """A journal file open in the writer: its fd, its size, and how much of it is known fsynced."""

    __slots__ = ("fd", "path", "size", "synced")

    def __init__(self, directory, generation):
        self.path = journal_path(directory, generation)
        self.fd = open_data_file(self.path, os.O_WRONLY | os.O_APPEND)
        # A new file, made empty by _create (which fsynced the directory).
        self.size = self.synced = os.fstat(self.fd).st_size

    def start(self):
        """Write the header, fsynced before any round: a torn first round cannot take it along."""
        _write_all(self.fd, [JOURNAL_MAGIC])
        self.size = len(JOURNAL_MAGIC)
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise _FsyncFailed(e.errno, e.strerror) from None
        self.synced = self.size

    def cut(self, end):
        """Truncate the file back to `end` (a failed write's bytes)."""
        os.ftruncate(self.fd, end)
        self.size, self.synced = end, min(self.synced, end)


def _vanished(directory, identity, files):
    """Why the journal's files are no longer where a restart reads them, or None.

    The directory at the path is another one (removed; moved and replaced),
    or an open journal file has lost its name there (removed, renamed over).
    """
    gone = directory_replaced(directory, identity)
    if gone:
        return gone
    for journal in files.values():
        try:
            named, opened = os.stat(journal.path), os.fstat(journal.fd)
        except (FileNotFoundError, NotADirectoryError):
            return "the journal file %s was removed or replaced" % journal.path
        except OSError:
            continue                            # cannot tell: not proof of a change
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            return "the journal file %s was removed or replaced" % journal.path
    return None


def _recv_round(channel):
    """(sync, number, epoch, [(generation, bytes)]) of the next round; None at the channel's end."""
    head = _recv_exactly(channel, _ROUND.size)
    if head is None:
        return None
    sync, count, number, epoch = _ROUND.unpack(head)
    table = _recv_exactly(channel, count * _SEGMENT.size) if count else b""
    segments = []
    for i in range(count):
        generation, length = _SEGMENT.unpack_from(table, i * _SEGMENT.size)
        segments.append((generation, _recv_exactly(channel, length) if length else b""))
    return sync, number, epoch, segments


def _write_group(directory, files, segments, fsync, counters):
    """One group's I/O; returns (reply kind, phase, errno, detail).

    The group's segments for one file become one round on disk, written
    with one writev (_append_rounds).  A file that lost its name meanwhile
    (st_nlink 0: removed) makes the group GONE: its writes are in no file
    that a restart will read.
    """
    started, error, phase = {}, None, "write"  # started: each file's size before the group
    began = time.monotonic()
    try:
        _append_rounds(directory, files, segments, started)
    except _FsyncFailed as e:
        error, phase = e, "fsync"
    except OSError as e:
        error = e
    newest = max(generation for generation, _ in segments)
    retired = sorted(generation for generation in files if generation < newest)
    if error is None:
        phase = "fsync"
        try:
            for generation in retired + ([newest] if fsync else []):
                os.fsync(files[generation].fd)  # a retired file always gets its last fsync
                files[generation].synced = files[generation].size
            if fsync:
                counters[0] += 1
                counters[1] += time.monotonic() - began
        except OSError as e:
            error = e
    if error is not None:
        kind, detail = _cut_failed(files, started, error, phase)
    else:
        detail = _unlinked(files, started)
        kind = GONE if detail else DONE
    for generation in retired:
        os.close(files.pop(generation).fd)
    if error is None:
        return kind, "write", errno.ENOENT if detail else 0, detail or ""
    return kind, phase, error.errno or errno.EIO, detail


class _FsyncFailed(OSError):
    """A failed fsync of a new file's header: fatal, as every failed fsync."""


def _append_rounds(directory, files, segments, started):
    """Append the group: a round on disk per file, its marker first; a new file's header before.

    `started` gets each file's size before the group, where a failure cuts
    it back to.  Raises OSError (_FsyncFailed for the header's fsync).
    """
    rounds = {}                                 # generation -> its segments' bytes, in order
    for generation, data in segments:
        rounds.setdefault(generation, [])
        if data:
            rounds[generation].append(data)
    for generation, buffers in rounds.items():
        journal = files.get(generation)
        if journal is None:
            journal = files[generation] = _JournalFile(directory, generation)
        started.setdefault(generation, journal.size)
        if journal.size == 0:
            journal.start()
        if buffers:
            round = encode_round(journal.size, journal.synced, buffers)
            _write_all(journal.fd, round)
            journal.size += sum(map(len, round))


def _cut_failed(files, started, error, phase):
    """Cut a failed group's bytes off every file it wrote: (FULL, or FAILED if fatal; detail).

    Fatal: a failed fsync, or a write that failed for another reason than
    a lack of room, or a cut that failed.
    """
    fatal = phase == "fsync" or error.errno not in STORAGE_FULL
    try:
        for generation, end in started.items():
            files[generation].cut(end)
        if not fatal:
            for generation in started:
                os.fsync(files[generation].fd)  # the cut is durable before the next write
    except OSError as e:
        return FAILED, "cannot cut off a failed write: %s" % e
    return (FAILED if fatal else FULL), ""


def _unlinked(files, generations):
    """Why a file the group wrote is gone (it has no name left), or None."""
    for generation in generations:
        if os.fstat(files[generation].fd).st_nlink == 0:
            return "the journal file %s was removed or replaced" % files[generation].path
    return None


def _timed_fsync(journal, counters):
    """everysec: the fsync a round left owed; returns the OSError, if any."""
    began = time.monotonic()
    try:
        os.fsync(journal.fd)
    except OSError as e:
        return e
    journal.synced = journal.size
    counters[0] += 1
    counters[1] += time.monotonic() - began
    return None


def _probe(journal):
    """After a full disk: is there room for a page of records again?"""
    try:
        os.posix_fallocate(journal.fd, journal.size, 1 << 16)
    except OSError as e:
        return e.errno not in STORAGE_FULL      # unsupported here: the writes will tell
    finally:
        try:
            os.ftruncate(journal.fd, journal.size)  # a crash before this leaves zeros: torn
        except OSError:
            pass
    return True


def _recv_exactly(channel, size):
    """`size` bytes from the channel; None at its end, before any; EOFError in the middle."""
    parts, got = [], 0
    while got < size:
        data = channel.recv(size - got)
        if not data:
            if got:
                raise EOFError()
            return None
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _write_all(fd, buffers):
    """Write `buffers` to `fd`: one writev when the OS takes it all (the usual case).

    If a write fails, the writer cuts what it wrote off again (_write_group).
    """
    for i in range(0, len(buffers), 1024):          # IOV_MAX is 1024 on Linux
        batch = buffers[i:i + 1024]
        written = os.writev(fd, batch)
        if written < sum(map(len, batch)):          # short: disk full or a signal
            data = memoryview(b"".join(batch))[written:]
            while data:
                data = data[os.write(fd, data):]


def _writer_main(fd, directory, policy, parent):
    """The writer process's entry point (python3 persistence.py journal-writer FD DIR POLICY PID).

    It dies with the server (PID: _die_with_parent).  It ignores the
    signals that stop the server (the server finishes its rounds first,
    then closes the channel), and SIGXFSZ, so that a write past
    RLIMIT_FSIZE fails with EFBIG, a full disk, instead of killing it.
    """
    channel = socket.socket(fileno=int(fd))
    if not _die_with_parent(int(parent)):
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_IGN)
    _write_rounds(channel, directory, policy)
    return 0


def _verify_main(path):
    """python3 persistence.py verify FILE: check a snapshot or a backup; exit 0, or 1 and why."""
    try:
        keys, size, checksummed = check_snapshot(path)
    except DataError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    if checksummed:
        print("%s: sound: %d keys, %d bytes, checksum matches" % (path, keys, size))
    else:
        print("%s: loads: %d keys, %d bytes; no checksum (written before snapshots had one), "
              "so damage that still unpickles cannot be ruled out" % (path, keys, size))
    return 0


USAGE = """usage: python3 persistence.py verify FILE
       python3 persistence.py checkpoint DIRECTORY THROUGH_GENERATION SERVER_PID
       python3 persistence.py journal-writer FD DIRECTORY POLICY SERVER_PID"""

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "verify":
        sys.exit(_verify_main(sys.argv[2]))
    if len(sys.argv) == 5 and sys.argv[1] == "checkpoint":
        sys.exit(_checkpoint_main(*sys.argv[2:]))
    if len(sys.argv) == 6 and sys.argv[1] == "journal-writer":
        sys.exit(_writer_main(*sys.argv[2:]))
    sys.exit(USAGE)
