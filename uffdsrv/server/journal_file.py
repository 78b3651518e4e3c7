"""The journal on disk: the append-only file in the state directory that
core/journal.py's records go to.

The journal is appended with plain write(2) calls, batched per loop turn
and always flushed before a zap is sent: the SWAP records of a batch are
in the file before any of its pages can disappear from the program.
Compaction rewrites it from the live state (into a new file, then
rename) when it has grown and no reclaim batch is in flight.
"""
import logging
import os

from ..core import journal

log = logging.getLogger("uffdsrv.state")
COMPACT_BYTES = 16 << 20


def open_private(path: str, flags: int) -> int:
    """0600, never through a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class JournalFile:
    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "journal")
        self.fd = open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        self.size = os.fstat(self.fd).st_size
        self._pending: list[bytes] = []
        self.next_cid = 1
        self.failing = False

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0) if self.size else b""

    def new_cid(self) -> int:
        cid = self.next_cid
        self.next_cid += 1
        return cid

    def add(self, op: int, cid: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        self._pending.append(journal.pack(op, cid, a, b, c))

    def extend(self, records: list[bytes]) -> None:
        self._pending.extend(records)

    def flush(self, strict: bool = False) -> None:
        """Write what is pending. A failure (a full disk) keeps the records
        for the next flush and is logged; with strict (before a zap) it
        raises, so the zap is not sent."""
        self._write(b"".join(self._pending), strict)

    def commit(self, records: list[bytes]) -> None:
        """Write everything pending and `records` now, or raise with none of
        `records` in the file (a zap that cannot be journaled is not sent)."""
        self._write(b"".join(self._pending), strict=True, then=b"".join(records))

    def _write(self, data: bytes, strict: bool, then: bytes = b"") -> None:
        """Append data + then. The file only ever ends on a record boundary:
        a torn write is cut back, and the rest stays pending. If `then` cannot
        be written whole, the file is cut back to before it."""
        if not data and not then:
            return
        whole = data + then
        written = 0
        try:
            while written < len(whole):
                written += os.write(self.fd, memoryview(whole)[written:])
        except OSError as e:
            keep = min(written - written % journal.REC.size, len(data))
            if keep != written:
                os.ftruncate(self.fd, self.size + keep)
            self.size += keep
            self._pending = [data[keep:]] if keep < len(data) else []
            if not self.failing:
                log.error("cannot write the journal %s: %s; reclaim waits until it can",
                          self.path, e.strerror)
            self.failing = True
            if strict:
                raise
            return
        self.size += written
        self._pending = []
        self.failing = False

    def rewrite(self, data: bytes) -> None:
        """Replace the whole journal with `data` (a snapshot)."""
        self.flush()
        tmp = self.path + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
        self.size = len(data)

    def close(self) -> None:
        self.flush()
        os.close(self.fd)

