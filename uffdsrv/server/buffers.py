"""Staging buffers for reclaim: fixed-size pieces of the ring's arena (the
region io_uring reads and writes), so a batch's pages are copied out of the
program once and written to the swap file from the same memory."""
import asyncio

from ..core.pages import PAGE


class Pool:
    """Fixed-size buffers carved out of the ring arena. The fault path takes
    one without waiting (try_acquire); reclaim waits for one (acquire).
    `discard(addr, nbytes)`, if given, hands a buffer's pages back to the
    kernel when it is released with nobody waiting: reclaim's 16 MiB
    staging buffers would otherwise stay resident in the server between
    reclaims (touching them again costs ~1 ms against a batch's ~16 ms
    write)."""

    def __init__(self, base_addr: int, offset: int, pages_each: int, count: int,
                 discard=None):
        self.pages_each = pages_each
        self._discard = discard
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
        if self._discard is not None and not self._waiters:
            self._discard(addr, self.pages_each * PAGE)
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                break
