"""The swap file and the staging buffers that swap I/O goes through.

Swap I/O bypasses the page cache (how the kernel caches, and the ways out
of it, are in system/swapdev.py), so the memory a reclaim frees is free on
the machine when reclaim returns, and a fault-in reads the device. The
mode, in order of preference:

* "direct": the file or block device is opened O_DIRECT; every read and
  write is whole 4 KiB slots from the page-aligned ring arena;
* "dontcache": the filesystem refuses direct I/O, and every read and write
  carries RWF_DONTCACHE (Linux 6.14+): the kernel drops what it read and
  starts writeback at once; written() waits for that writeback and drops
  the pages (here an overwrite's pages stayed cached without that);
* "buffered": neither; written() waits for writeback of what was written
  and drops it, was_read() drops what was read.

`io_mode` names it, `rw_flags` are the flags every ring read and write of
the file carries, and whoever completes a swap read or write calls
`was_read` / `written` for the range: no-ops in "direct" mode; when
`needs_sync` is true, `written` waits on the device, so call it off the
loop; `drops_reads` says whether `was_read` does anything.

A new file is created 0600 with O_EXCL and O_NOFOLLOW; an existing one must
be ours and private, and is never shrunk (a journal may name its slots).
Its blocks are allocated at start (fallocate, as swapon demands), so a fresh
file is as fast as a reused one; where the filesystem cannot, the new part
is written with zeros once. A file on tmpfs or ramfs is memory itself: it
gets no preallocation and a warning. The staging buffers live in the ring's
registered arena, split in two pools: large buffers for reclaim batches,
small ones for swap-ins.

The RAM tier (`tier`, system/tier.py) is a compressed cache of the file,
keyed by slot. Reclaim writes every page to its slot before the SWAP
record and the zap, and only then stores it in the pool: no page lives
only in the server's memory, so a kill -9 loses nothing and a stop has
nothing to write back; a full pool drops its oldest entries for free. An
entry is valid only if stored after the last write of its slot: a store
drops its slots first, and a slot whose count goes to 0 loses its entry
(the engine drops what it frees, TierSlots what Python frees), else a
reused slot whose new page is not stored would serve the old bytes."""
import errno
import logging
import os
import stat
import time

import numpy as np

from ..core.pages import PAGE
from ..core.slots import Slots
from ..system import swapdev

log = logging.getLogger("uffdsrv.swap")
IO_MODES = ("direct", "dontcache", "buffered")
ZERO_CHUNK = 1 << 20  # bytes per write when zero-filling a file without fallocate
TIER_CODECS = ("lz4", "zstd")
TIER_MIN = 64 << 10  # smallest pool cap worth having (16 pages)
TIER_MAX_STORED = 3 * PAGE // 4  # a page compressing to more goes to the file only


class SwapError(Exception):
    pass


def ram_tier_size(text) -> int:
    """The pool cap (`--ram-tier`, the config's ram_tier): a size ("256M"),
    0 for none, or a share of the machine's memory ("25%", as zswap's
    max_pool_percent: managed memory comes and goes, a cap set at start
    cannot follow it). ValueError says why not."""
    from ..core.budgets import parse_size
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    t = text.strip() if isinstance(text, str) else text
    if isinstance(t, str) and t.endswith("%"):
        try:
            share = float(t[:-1])
        except ValueError:
            raise ValueError(f"not a size or a share: {text!r}") from None
        if not 0 <= share < 100:
            raise ValueError(f"a share of memory is 0% to 100% (not {text!r})")
        cap = int(total * share / 100)
    else:
        cap = parse_size(t)
    if 0 < cap < TIER_MIN:
        raise ValueError(f"ram tier {text!r} is too small (at least {TIER_MIN >> 10}K, or 0)")
    if cap >= total:
        raise ValueError(f"ram tier {text!r} is not below the machine's memory "
                         f"({total >> 20} MiB)")
    return cap - cap % PAGE


class TierSlots(Slots):
    """Slots whose last release drops the slot's entry from the RAM tier:
    every free that happens in Python goes through release (the engine
    drops those it frees itself)."""

    tier = None

    @classmethod
    def adopt(cls, slots: Slots, tier) -> "TierSlots":
        """The same counts (the same arrays: the engine holds pointers
        into them), with drops."""
        out = cls.__new__(cls)
        out.__dict__.update(slots.__dict__)
        out.tier = tier
        return out

    def release(self, slots) -> None:
        super().release(slots)
        if isinstance(slots, int):
            if slots >= 0 and self.refs[slots] == 0:
                self.tier.drop(np.array([slots], dtype=np.int64))
            return
        s = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        s = s[s >= 0]
        freed = s[self.refs[s] == 0]
        if len(freed):
            self.tier.drop(freed)


class SwapFile:
    def __init__(self, path: str, size: int, io_mode: str | None = None,
                 ram_tier: int = 0, ram_tier_codec: str = "lz4"):
        """io_mode None takes the best the file allows; a mode named forces
        it (SwapError if the file cannot do it). ram_tier: the compressed
        pool's cap in bytes (0: none), its codec lz4 or zstd."""
        if io_mode is not None and io_mode not in IO_MODES:
            raise SwapError(f"unknown swap io mode {io_mode!r} (one of {', '.join(IO_MODES)})")
        if size < PAGE * 16:
            raise SwapError(f"swap size {size} is too small (at least {PAGE * 16} bytes)")
        if ram_tier_codec not in TIER_CODECS:
            raise SwapError(f"unknown ram tier codec {ram_tier_codec!r} "
                            f"(one of {', '.join(TIER_CODECS)})")
        self.path = path
        self.tier, self.tier_codec = None, ram_tier_codec
        self.io_mode, self.rw_flags, self.preallocated = "buffered", 0, False
        # what the fallbacks do after each I/O: sync and drop a write, drop a read
        self._sync_writes = self._drop_reads = False
        self._scratch = swapdev.AlignedBuffer(ZERO_CHUNK)
        self.fd = self._open(path, io_mode in (None, "direct"))
        try:
            self._setup(size, io_mode)
            if ram_tier:
                self._new_tier(ram_tier, ram_tier_codec)
        except BaseException:
            os.close(self.fd)
            self._scratch.close()
            raise

    def _new_tier(self, cap: int, codec: str) -> None:
        from ..system.tier import RamTier  # only a server with a tier needs the codecs
        try:
            self.tier = RamTier(cap, self.slots.nslots, codec, TIER_MAX_STORED)
        except OSError as e:  # EINVAL: the cap does not even hold the slot index
            raise SwapError(f"cannot make a ram tier of {cap >> 10} KiB ({codec}) for "
                            f"{self.slots.nslots} swap slots: {e.strerror or e} (its index "
                            "takes ~28 bytes a slot off the cap)") from None
        self.slots = self._slots  # from now on a free drops the slot's entry

    @property
    def slots(self) -> Slots:
        return self._slots

    @slots.setter
    def slots(self, slots: Slots) -> None:
        # a journal replay hands over a Slots of its own
        if self.tier is not None and not isinstance(slots, TierSlots):
            slots = TierSlots.adopt(slots, self.tier)
        self._slots = slots

    def tier_status(self) -> dict | None:
        """The pool's figures (system/tier.py's stats, plus the codec and
        the compression ratio), or None without a tier."""
        if self.tier is None:
            return None
        st = self.tier.stats()
        stored = st["stored_pages"] * PAGE
        st["codec"] = self.tier_codec
        st["compression_ratio"] = stored / st["stored_bytes"] if st["stored_bytes"] else None
        return st

    @staticmethod
    def _open(path: str, direct: bool) -> int:
        # A new file is created 0600 with O_EXCL; an existing one (a restart
        # reuses it) is checked below. Never through a symlink. A filesystem
        # without direct I/O refuses O_DIRECT with EINVAL (possibly after
        # creating the file, which the second try then opens).
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        for extra in ((swapdev.O_DIRECT, 0) if direct else (0,)):
            try:
                try:
                    return os.open(path, flags | extra | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    return os.open(path, flags | extra)
            except OSError as e:
                if extra and e.errno == errno.EINVAL:
                    continue
                raise SwapError(f"cannot open swap file {path}: {e.strerror}") from None
        raise AssertionError("unreachable")

    def _setup(self, size: int, io_mode: str | None) -> None:
        st = os.fstat(self.fd)
        memfs, zero_from = None, None
        if stat.S_ISREG(st.st_mode):
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise SwapError(f"swap file {self.path} belongs to another user or is writable "
                                "by others")
            if st.st_mode & 0o077:
                os.fchmod(self.fd, 0o600)
            size = max(size - size % PAGE, st.st_size)  # never cut off slots a journal may name
            memfs = swapdev.memory_fs(self.fd)
            zero_from = self._allocate(st.st_size, size, memfs)
        elif stat.S_ISBLK(st.st_mode):
            size = min(size, os.lseek(self.fd, 0, os.SEEK_END))
        else:
            raise SwapError(f"swap path {self.path} is neither a regular file nor a block device")
        self.size = size - size % PAGE
        self.slots = Slots(self.size // PAGE)
        self._choose_mode(io_mode, memfs)
        if zero_from is not None and zero_from < self.size:
            self._zero_fill(zero_from, self.size)

    def _allocate(self, old: int, size: int, memfs: str | None) -> int | None:
        """Allocate the file's blocks; returns where zero-filling must
        start when the filesystem cannot (else None)."""
        if memfs:
            os.ftruncate(self.fd, size)
            log.warning("swap file %s is on %s: its pages stay in memory, so reclaim to it "
                        "frees none; put it on a disk", self.path, memfs)
            return None
        try:
            swapdev.allocate(self.fd, 0, size)
            self.preallocated = True
            return None
        except OSError as e:
            os.ftruncate(self.fd, size)
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return old
            if e.errno == errno.ENOSPC:
                log.warning("swap file %s: cannot allocate %d MiB (%s): it stays sparse, first "
                            "writes are slower, and reclaim stops where the filesystem fills",
                            self.path, size >> 20, e.strerror)
                return None
            raise SwapError(f"swap file {self.path}: {e}") from None

    def _choose_mode(self, io_mode: str | None, memfs: str | None) -> None:
        fd, probe = self.fd, self._scratch.addr
        swapdev.no_readahead(fd)  # we do our own readahead, by address
        direct = swapdev.has_direct(fd)
        if direct and memfs and io_mode != "direct":
            swapdev.set_direct(fd, False)  # tmpfs's "direct" I/O is its page cache anyway
            direct = False
        if direct:
            # some filesystems take O_DIRECT at open and refuse the I/O
            err = swapdev.probe(fd, probe, 0)
            if err == -errno.EINVAL and io_mode is None:
                swapdev.set_direct(fd, False)
                direct = False
                log.warning("swap file %s: direct reads are refused (EINVAL); falling back",
                            self.path)
            elif err == -errno.EINVAL:
                raise SwapError(f"swap file {self.path}: direct read: {os.strerror(-err)}")
            elif err:  # a bad slot, not a mode: refusing would hang every program taken over
                log.warning("swap file %s: slot 0 cannot be read: %s", self.path, os.strerror(-err))
        if direct:
            self.io_mode, self.rw_flags = "direct", 0
        elif io_mode == "direct":
            raise SwapError(f"swap file {self.path}: the filesystem refuses direct I/O")
        elif io_mode != "buffered" and swapdev.probe(fd, probe, swapdev.RWF_DONTCACHE) == 0:
            self.io_mode, self.rw_flags = "dontcache", swapdev.RWF_DONTCACHE
            # its overwrites stay cached (system/swapdev.py): sync and drop them
            self._sync_writes = memfs is None
        elif io_mode == "dontcache":
            raise SwapError(f"swap file {self.path}: RWF_DONTCACHE is not supported here")
        else:
            self.io_mode, self.rw_flags = "buffered", 0
            # on tmpfs the cached pages are the file: nothing to drop
            self._sync_writes = self._drop_reads = memfs is None
        if not memfs:
            # what an earlier buffered run left in the cache goes now
            # (direct I/O keeps the cache coherent, but never frees it)
            swapdev.sync_range(fd, 0, self.size)
            swapdev.drop_cache(fd, 0, self.size)
        if not direct and not memfs:
            log.warning("swap file %s: no direct I/O; using %s I/O, which drops what it "
                        "caches", self.path, self.io_mode)

    def _zero_fill(self, lo: int, hi: int) -> None:
        """What fallocate would have done: write each block once, so first
        writes by reclaim are overwrites."""
        t0 = time.monotonic()
        log.warning("swap file %s: the filesystem cannot fallocate; writing %d MiB of zeros "
                    "once", self.path, (hi - lo) >> 20)
        buf = self._scratch
        buf.map[:] = bytes(buf.nbytes)  # the mode probes read into it
        for off in range(lo - lo % PAGE, hi, ZERO_CHUNK):
            n = min(ZERO_CHUNK, hi - off)
            if swapdev.pwrite(self.fd, buf.addr, n, off, self.rw_flags) != n:
                raise SwapError(f"swap file {self.path}: short write while zero-filling")
            self.written(off, n)
        self.preallocated = True
        log.info("swap file %s: zero-filled in %.1f s", self.path, time.monotonic() - t0)

    # --- the I/O hooks -------------------------------------------------------------
    @property
    def needs_sync(self) -> bool:
        """written() waits for the device: call it off the event loop."""
        return self._sync_writes

    # (a length of 0 would mean "to the end of the file" to both calls)
    @property
    def drops_reads(self) -> bool:
        """was_read() does something: worth telling it about reads."""
        return self._drop_reads

    def written(self, offset: int, length: int) -> None:
        """A write of [offset, offset + length) has completed."""
        if self._sync_writes and length > 0:
            swapdev.sync_range(self.fd, offset, length)
            swapdev.drop_cache(self.fd, offset, length)

    def was_read(self, offset: int, length: int) -> None:
        """A read of [offset, offset + length) has completed."""
        if self._drop_reads and length > 0:
            swapdev.drop_cache(self.fd, offset, length)

    # --- synchronous I/O, for paths off the ring -----------------------------------
    def pread(self, buf, offset: int) -> int:
        """Read len(buf) bytes at offset into any writable buffer; offset
        and length whole slots. A buffer that is not page-aligned goes
        through an aligned one (direct I/O would refuse it)."""
        return self._io(buf, offset, write=False)

    def pwrite(self, buf, offset: int) -> int:
        return self._io(buf, offset, write=True)

    def _io(self, buf, offset: int, write: bool) -> int:
        view = memoryview(buf).cast("B")
        length = len(view)
        call = "swap pwrite" if write else "swap pread"
        swapdev.check_aligned(0, length, offset, call)
        done = 0
        while done < length:
            n = min(length - done, self._scratch.nbytes)
            addr = swapdev.address(view[done:done + n])
            bounce = addr % PAGE != 0
            if bounce:
                addr = self._scratch.addr
                if write:
                    self._scratch.map[:n] = view[done:done + n]
            if write:
                got = swapdev.pwrite(self.fd, addr, n, offset + done, self.rw_flags)
                self.written(offset + done, got)
            else:
                got = swapdev.pread(self.fd, addr, n, offset + done, self.rw_flags)
                self.was_read(offset + done, got)
                if bounce:
                    view[done:done + got] = self._scratch.map[:got]
            done += got
            if got < n:
                break
        return done

    def close(self):
        """Also frees the tier: the fault engine must have let go of it
        (Engine.set_tier(None)) first."""
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        os.close(self.fd)
        self._scratch.close()

