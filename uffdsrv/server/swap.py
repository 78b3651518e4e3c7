"""The swap file and the staging buffers that swap I/O goes through.

The file is created 0600 with O_NOFOLLOW and left sparse: a page is
written only when reclaimed, and all-zero pages are never written. The
staging buffers live in the ring's registered arena, split in two pools:
large buffers for reclaim batches, small ones for swap-ins."""
import asyncio
import os
import stat

from ..core.slots import Slots

PAGE = 4096


class SwapError(Exception):
    pass


class SwapFile:
    def __init__(self, path: str, size: int):
        if size < PAGE * 16:
            raise SwapError(f"swap size {size} is too small (at least {PAGE * 16} bytes)")
        # A new file is created 0600 with O_EXCL; an existing one (a restart
        # reuses it) must be ours and private. Never through a symlink.
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self.fd = os.open(path, flags)
        except OSError as e:
            raise SwapError(f"cannot open swap file {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                os.close(self.fd)
                raise SwapError(f"swap file {path} belongs to another user or is writable "
                                "by others")
            if st.st_mode & 0o077:
                os.fchmod(self.fd, 0o600)
            if st.st_size > size:
                size = st.st_size  # never cut off slots a journal may name
            os.ftruncate(self.fd, size)
        elif stat.S_ISBLK(st.st_mode):
            size = min(size, os.lseek(self.fd, 0, os.SEEK_END))
        else:
            os.close(self.fd)
            raise SwapError(f"swap path {path} is neither a regular file nor a block device")
        self.path = path
        self.size = size - size % PAGE
        self.slots = Slots(self.size // PAGE)

    def close(self):
        os.close(self.fd)


class Pool:
    """Fixed-size buffers carved out of the ring arena. The fault path takes
    one without waiting (try_acquire); reclaim waits for one (acquire)."""

    def __init__(self, base_addr: int, offset: int, pages_each: int, count: int):
        self.pages_each = pages_each
        self._free = [base_addr + offset + i * pages_each * PAGE for i in range(count)]
        self._waiters: list[asyncio.Future] = []

    async def acquire(self) -> int:
        while not self._free:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        return self._free.pop()

    def try_acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, addr: int) -> None:
        self._free.append(addr)
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                break
