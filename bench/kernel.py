"""The kernel's own swap, as the baseline: a swap file, a memory cgroup to
push pages out to it, and what the running kernel grants.

How the kernel behaves here (Linux 6.18, cgroup v1 memory controller at
/sys/fs/cgroup/memory):

* MADV_PAGEOUT writes the pages to swap and unmaps them, but without
  memory pressure each written folio stays in the swap cache: the next
  access is a minor fault that finds it there, no device read. That is the
  kernel's best case ("kernel-swap-cached").
* Lowering a v1 cgroup's `memory.limit_in_bytes` below its usage makes the
  write itself reclaim the group until it fits: anonymous pages go to swap.
  Swap-cache folios stay charged to the group, but a 1 MiB limit still
  leaves a few hundred of them (and SwapCached with them); writing
  `memory.force_empty` then reclaims all the group can, tasks and all,
  which takes the buffer's pages to "swapped, not cached" and SwapCached
  to ~0. Then the limit is raised again and every access is a swap-in from
  the device, with the kernel's VMA-based readahead ("kernel-swap"). The
  limit write fails with EBUSY where the group cannot get under the limit
  (it then holds only unreclaimable pages); the caller tries a higher one.
* Charges are made when a page is first allocated and do not move with a
  process (move_charge_at_immigrate is gone), so the faulter must start
  inside the group: `Faulter(cgroup=...)` writes its own pid to
  cgroup.procs before it execs.
* A cgroup directory can be removed only when no task is left in it;
  swap entries it still owns are handed to the parent.
"""
import contextlib
import ctypes
import errno
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uffdsrv.core.pages import PAGE

from . import procs
from .procs import MIB, BenchError

MEMCG_V1 = Path("/sys/fs/cgroup/memory")


def swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:] if line.strip()]


def run(argv) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


class KernelSwap:
    """A swap file under tmp (same filesystem as the server's swap file),
    just big enough, enabled for the duration of a `with` block. Off and
    deleted on the way out, whatever happens; `procs.cleanup()` catches it
    too. Only the benchmark's own buffer is ever pushed out (MADV_PAGEOUT,
    or the limit of its own memory cgroup): nothing else on the machine is
    under memory pressure."""

    def __init__(self, tmp: Path, nbytes: int):
        self.dir = Path(tempfile.mkdtemp(prefix="kswap-", dir=tmp))
        self.path = self.dir / "swapfile"
        self.nbytes = (nbytes + 4 * MIB) // PAGE * PAGE  # + header and slack
        self.on = False

    def __enter__(self):
        existing = swaps()
        if existing:
            raise BenchError(f"swap is already enabled on this machine ({existing}); the "
                             "kernel-swap comparison needs to own the only swap")
        procs.RESOURCES.append(self)
        # swapon refuses files with holes: write every block
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            chunk = bytes(MIB)
            for _ in range(self.nbytes // MIB):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        run(["mkswap", str(self.path)])
        run(["swapon", str(self.path)])
        self.on = True
        return self

    def close(self) -> None:
        if self.on:
            r = subprocess.run(["swapoff", str(self.path)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"bench: swapoff {self.path} failed: {r.stderr.strip()}",
                      file=sys.stderr)
            else:
                self.on = False
        if not self.on:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.dir.rmdir()

    def __exit__(self, *exc):
        self.close()
        if self in procs.RESOURCES:
            procs.RESOURCES.remove(self)


class MemCgroup:
    """A child of the v1 memory controller, for the faulter alone. `procs`
    is the file a process writes its pid to, to enter."""

    def __init__(self, name: str):
        if not (MEMCG_V1 / "memory.limit_in_bytes").exists():
            raise BenchError("the kernel-swap baseline needs the cgroup v1 memory controller "
                             f"at {MEMCG_V1} (to push pages out of the swap cache)")
        self.path = MEMCG_V1 / f"uffdsrv-bench-{os.getpid()}-{name}"
        self.procs = str(self.path / "cgroup.procs")

    def __enter__(self):
        self.path.mkdir()
        procs.RESOURCES.append(self)
        # Reclaim the group's anonymous pages as readily as anything else.
        with contextlib.suppress(OSError):
            (self.path / "memory.swappiness").write_text("100")
        return self

    def _limit(self, value: str) -> None:
        (self.path / "memory.limit_in_bytes").write_text(value)

    def unlimit(self) -> None:
        self._limit("-1")

    def limit(self, nbytes: int, steps: int = 16) -> None:
        """The level the group is held at from now on. The write reclaims
        the group down to nbytes before it returns, or fails with EBUSY
        when a few rounds of reclaim did not get there (seen with zswap on:
        128 MiB down to 32 at once failed); then the limit comes down in
        steps from the usage, each a reclaim of its own."""
        nbytes = int(nbytes)
        try:
            self._limit(str(nbytes))
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise BenchError(f"write {self.path}/memory.limit_in_bytes: {e}") from None
        top = self.usage()
        for k in range(1, steps + 1):
            level = max(nbytes, top - (top - nbytes) * k // steps)
            for _ in range(5):
                try:
                    self._limit(str(level))
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise BenchError(f"write {self.path}/memory.limit_in_bytes: {e}") \
                            from None
                    time.sleep(0.02)
            else:
                raise BenchError(f"{self.path}: the kernel could not reclaim the group to "
                                 f"{level >> 20} MiB (EBUSY; usage {self.usage() >> 20} MiB)")

    def usage(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def stat(self) -> dict[str, int]:
        """memory.stat: its own counters (pgmajfault, swap, rss, cache, ...)."""
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
        return out

    def push_out(self, swapstat, tries: int = 6) -> dict:
        """Reclaims the group down to a few MiB, so that its pages go to
        the swap device and leave the swap cache; `swapstat()` says where
        the buffer's pages are ((swapped, in swap cache, present)). Ends
        with the limit raised again: the fault-in that follows is timed
        without pressure."""
        t0 = time.perf_counter()
        limit = None
        for mib in (1, 2, 4, 8, 16, 32):
            try:
                self._limit(str(mib * MIB))
                limit = mib * MIB
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise BenchError(f"write {self.path}/memory.limit_in_bytes: {e}") from None
        if limit is None:
            raise BenchError(f"{self.path}: could not get the faulter under 32 MiB")
        # memory.force_empty (v1) reclaims the whole group, tasks and all,
        # as far as it can: what the limit left resident and the swap-cache
        # folios whose write-back has finished since.
        swapped, cached, present = swapstat()
        for _ in range(tries):
            if cached == 0 and present == 0:
                break
            try:
                (self.path / "memory.force_empty").write_text("0")
            except OSError:
                time.sleep(0.02)  # EBUSY: folios still under write-back
            swapped, cached, present = swapstat()
        self.unlimit()
        return {"push_out_s": time.perf_counter() - t0, "push_out_limit_bytes": limit,
                "swapped_pages": swapped, "still_in_swap_cache": cached,
                "present_before": present}

    def close(self) -> None:
        # Only after the faulter has exited: a group with tasks stays.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"bench: could not remove {self.path}", file=sys.stderr)

    def __exit__(self, *exc):
        self.close()
        if self in procs.RESOURCES:
            procs.RESOURCES.remove(self)


def cached_bytes(path) -> int | None:
    """Bytes of the file now in the page cache (what fincore tells, through
    uffdsrv.system.swapdev: mincore over a mapping never touched). The swap
    file's own share of a page-cache growth, free of the noise in the
    machine-wide Cached; None where it cannot be read."""
    try:
        from uffdsrv.system import swapdev
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ImportError):
        return None
    try:
        return swapdev.cached_pages(fd) * PAGE
    except OSError:
        return None
    finally:
        os.close(fd)


def pcp_free_bytes() -> int:
    """Pages on the per-CPU free lists (`count:` of each pageset in
    /proc/zoneinfo). Since Linux 6.7 the kernel grows those lists after a
    burst of frees (to ~188 MiB per CPU here) and drains them into the buddy
    allocator, all that MemFree counts, at a few MiB/s: pages a reclaim
    freed sit there, free, for longer than 5 s."""
    n = 0
    with contextlib.suppress(OSError), open("/proc/zoneinfo") as f:
        for line in f:
            line = line.strip()
            if line.startswith("count:"):
                n += int(line.split()[1])
    return n * PAGE


def major_faults(pid: int) -> int:
    """Field 12 of /proc/PID/stat: faults that had to read from a device."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[9])


ZSWAP = Path("/sys/module/zswap/parameters")
DEBUGFS = Path("/sys/kernel/debug")


class Zswap:
    """zswap on, with the given compressor, for the duration of a `with`
    block; every parameter it changes is written back on the way out (also
    through procs.cleanup()), and debugfs unmounted again if it mounted it.

    How zswap behaves here (6.18): a page on its way to a swap device is
    compressed into a zsmalloc pool instead (the zpool parameter is gone;
    zsmalloc is the only backend) unless it compresses to a page or more,
    then it goes to the device as it is. A swap-in from the pool is a
    decompression, still counted as a major fault. The pool's size and
    what it holds are in debugfs only: zswap/pool_total_size (bytes of the
    pool) and zswap/stored_pages. Turning zswap off leaves stored pages
    where they are; they leave when swapped in or freed."""

    def __init__(self, compressor: str = "lzo-rle"):
        if not (ZSWAP / "enabled").exists():
            raise BenchError("zswap is not built into this kernel (/sys/module/zswap)")
        self.compressor = compressor
        self.saved: dict[str, str] = {}
        self.mounted = False

    def _set(self, name: str, value: str) -> None:
        f = ZSWAP / name
        if name not in self.saved:
            self.saved[name] = f.read_text().strip()
        try:
            f.write_text(value)
        except OSError as e:
            raise BenchError(f"write {f} {value}: {e}") from None

    def __enter__(self):
        if (ZSWAP / "enabled").read_text().strip() == "Y":
            raise BenchError("zswap is already on: it is global, and the kernel-zswap rows "
                             "need to own it (another benchmark running?)")
        procs.RESOURCES.append(self)
        if not (DEBUGFS / "zswap").exists():
            if not os.path.ismount(DEBUGFS):
                run(["mount", "-t", "debugfs", "none", str(DEBUGFS)])
                self.mounted = True
        # the compressor first: pages stored from now on use it
        self._set("compressor", self.compressor)
        self._set("enabled", "Y")
        got = (ZSWAP / "compressor").read_text().strip()
        if got != self.compressor:
            raise BenchError(f"zswap took compressor {got!r}, not {self.compressor!r}")
        return self

    def stats(self) -> dict[str, int]:
        """Every counter of /sys/kernel/debug/zswap (stored_pages,
        pool_total_size, written_back_pages, reject_*); {} if unreadable."""
        out = {}
        with contextlib.suppress(OSError):
            for f in (DEBUGFS / "zswap").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    out[f.name] = int(f.read_text().split()[0])
        return out

    @staticmethod
    def params() -> dict[str, str]:
        """Every zswap parameter as it is now."""
        return {f.name: f.read_text().strip() for f in ZSWAP.iterdir()}

    def close(self) -> None:
        # off first, so nothing more is stored with a compressor being changed
        for name in sorted(self.saved, key=lambda n: n != "enabled"):
            try:
                (ZSWAP / name).write_text(self.saved[name])
            except OSError as e:
                print(f"bench: could not restore zswap {name}={self.saved[name]}: {e}",
                      file=sys.stderr)
        self.saved.clear()
        if self.mounted:
            r = subprocess.run(["umount", str(DEBUGFS)], capture_output=True, text=True)
            if r.returncode == 0:
                self.mounted = False

    def __exit__(self, *exc):
        self.close()
        if self in procs.RESOURCES:
            procs.RESOURCES.remove(self)


# ---- what the running kernel grants ----------------------------------------------------

UFFD_FEATURES = {  # uapi/linux/userfaultfd.h, Linux 6.18
    1 << 0: "PAGEFAULT_FLAG_WP", 1 << 1: "EVENT_FORK", 1 << 2: "EVENT_REMAP",
    1 << 3: "EVENT_REMOVE", 1 << 4: "MISSING_HUGETLBFS", 1 << 5: "MISSING_SHMEM",
    1 << 6: "EVENT_UNMAP", 1 << 7: "SIGBUS", 1 << 8: "THREAD_ID", 1 << 9: "MINOR_HUGETLBFS",
    1 << 10: "MINOR_SHMEM", 1 << 11: "EXACT_ADDRESS", 1 << 12: "WP_HUGETLBFS_SHMEM",
    1 << 13: "WP_UNPOPULATED", 1 << 14: "POISON", 1 << 15: "WP_ASYNC", 1 << 16: "MOVE",
}
SYS_PROCESS_MADVISE = 440  # x86-64
PIDFD_SELF = -10000
MADV_DONTNEED = 4


def uffd_features() -> str:
    """The features UFFDIO_API reports as available (asked for none, the
    kernel answers with all it has)."""
    try:
        from uffdsrv.system import uffd
        fd = uffd.open_uffd()
        try:
            granted, _ = uffd.api(fd, 0)
        finally:
            os.close(fd)
    except (OSError, ImportError) as e:
        return f"unknown ({e})"
    names = [n for bit, n in sorted(UFFD_FEATURES.items()) if granted & bit]
    rest = granted & ~sum(UFFD_FEATURES)
    return " ".join(names) + (f" +{rest:#x}" if rest else "")


def pidfd_self_dontneed() -> str:
    """Whether process_madvise(PIDFD_SELF, MADV_DONTNEED) zaps our own page
    (Linux 6.13 for DONTNEED on our own mm, 6.15 for PIDFD_SELF)."""
    libc = ctypes.CDLL(None, use_errno=True)
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0:1] = b"x"
        buf = ctypes.c_char.from_buffer(m)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), PAGE)
        del buf
        r = libc.syscall(SYS_PROCESS_MADVISE, PIDFD_SELF, iov, 1, MADV_DONTNEED, 0)
        if r < 0:
            return f"no ({errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())})"
        return "yes" if m[0:1] == b"\0" else "no (the page kept its data)"
    finally:
        m.close()


def features() -> str:
    z = "unknown"
    with contextlib.suppress(OSError):
        z = "on" if Path("/sys/module/zswap/parameters/enabled").read_text().strip() == "Y" \
            else "off"
    return (f"uffd features: {uffd_features()}; process_madvise(PIDFD_SELF, MADV_DONTNEED): "
            f"{pidfd_self_dontneed()}; zswap {z}; memory cgroup v1: "
            f"{'yes' if (MEMCG_V1 / 'memory.limit_in_bytes').exists() else 'no'}")
