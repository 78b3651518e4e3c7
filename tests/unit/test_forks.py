"""server/forks.py without a kernel: which DEVICE/FORK_* messages are
protocol errors, and when FORK_PREPARE answers and lets reclaim go on."""
import asyncio
import errno
import types

import pytest

from uffdsrv.core import protocol as p
from uffdsrv.core.pages import SWAPPED
from uffdsrv.core.protocol import ProtocolError
from uffdsrv.server import forks


class Conn:
    def __init__(self, kind=None, pid=42, forks_=None):
        self.kind, self.pid, self.closed = kind, pid, False
        self.sent: list[bytes] = []
        self.spawned = []
        self.control = types.SimpleNamespace(forks=forks_)

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def _spawn(self, coro) -> None:
        self.spawned.append(asyncio.ensure_future(coro))


class Pages:
    def __init__(self, swapped: int):
        self.swapped = swapped

    def count(self, state) -> int:
        return self.swapped if state == SWAPPED else 0


class Client:
    def __init__(self, pid: int, swapped: int):
        self.pid, self.forking = pid, 0
        self.pages = Pages(swapped)
        self.reclaim_lock = asyncio.Lock()


class Clients:
    def __init__(self, *clients):
        self.clients = clients

    def by_pid(self, pid):
        return next((c for c in self.clients if c.pid == pid), None)


@pytest.mark.parametrize("mtype, body, fds, kind, match", [
    (99, b"", [], None, "unexpected message type 99"),
    (p.DEVICE, b"\0", [], None, "DEVICE of 17 bytes"),
    (p.DEVICE, b"", [5], None, "DEVICE with fds"),
    (p.DEVICE, b"", [], "ctl", "DEVICE on a ctl connection"),
    (p.FORK_PREPARE, b"", [], "agent", "FORK_PREPARE on a agent connection"),
    (p.FORK_DONE, b"", [], None, "FORK_DONE without FORK_PREPARE"),
    (p.FORK_PREPARE, b"", [], None, "keeps no fork holds"),
])
def test_bad_messages_are_protocol_errors(mtype, body, fds, kind, match):
    with pytest.raises(ProtocolError, match=match):
        forks.dispatch(Conn(kind), mtype, 1, p.pack(mtype, 1, body), fds)


def run(coro):
    return asyncio.run(coro)


def test_prepare_holds_reclaim_until_fork_done_and_answers_once_the_pages_are_back():
    async def main():
        client = Client(42, swapped=3)
        seen = []

        async def restore(c):
            seen.append(c.forking)  # reclaim is held while the pages come back
            c.pages.swapped = 0
            return 3
        f = forks.Forks(Clients(client), restore)
        conn = Conn(forks_=f)
        forks.dispatch(conn, p.FORK_PREPARE, 7, p.pack(p.FORK_PREPARE, 7), [])
        assert conn.kind == "fork"
        for _ in range(50):
            await asyncio.sleep(0.01)
            if conn.sent:
                break
        assert seen == [1]
        assert conn.sent == [p.pack(p.OK, 7)]
        assert client.forking == 1  # still held: the fork is under way
        forks.dispatch(conn, p.FORK_DONE, 8, p.pack(p.FORK_DONE, 8), [])
        await asyncio.wait_for(conn.spawned[0], 2)
        assert client.forking == 0
    run(main())


def test_prepare_waits_for_the_batches_in_flight_and_says_error_if_pages_stay_out():
    async def main():
        client = Client(42, swapped=5)
        order = []

        async def restore(c):
            order.append("restore")
            return 0  # a disk that fails: the pages stay swapped
        f = forks.Forks(Clients(client), restore)
        conn = Conn(forks_=f)
        await client.reclaim_lock.acquire()  # a batch in flight
        forks.dispatch(conn, p.FORK_PREPARE, 3, p.pack(p.FORK_PREPARE, 3), [])
        await asyncio.sleep(0.05)
        assert order == [] and conn.sent == []
        order.append("settled")
        client.reclaim_lock.release()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if conn.sent:
                break
        assert order == ["settled", "restore"]
        assert p.header(conn.sent[0]) == (p.ERROR, 3)
        assert p.parse_error(conn.sent[0])[0] == errno.EIO
        conn.closed = True  # the agent hung up: the hold ends too
        await asyncio.wait_for(conn.spawned[0], 2)
        assert client.forking == 0
    run(main())


def test_prepare_of_a_pid_not_managed_is_ok_at_once():
    async def main():
        async def restore(c):
            raise AssertionError("nothing to restore")
        conn = Conn(pid=7, forks_=forks.Forks(Clients(), restore))
        forks.dispatch(conn, p.FORK_PREPARE, 9, p.pack(p.FORK_PREPARE, 9), [])
        await asyncio.wait_for(conn.spawned[0], 2)
        assert conn.sent == [p.pack(p.OK, 9)]
    run(main())
