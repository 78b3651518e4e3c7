"""Which mappings of a process the server manages, from /proc/PID/maps.

Managed: private, anonymous, readable and writable mappings of at least
min_bytes, including [heap]. Left alone: file mappings, shared memory,
[stack], [vdso]/[vvar], the agent's own mapping, and thread stacks (an
anonymous mapping directly above a one-page PROT_NONE guard), whose pages
every thread exit hands back with MADV_DONTNEED.
"""
from dataclasses import dataclass

from .ranges import PAGE


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    name: str

    @property
    def size(self) -> int:
        return self.end - self.start


def parse(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
                           int(parts[4]), parts[5].strip() if len(parts) > 5 else ""))
    return out


def eligible(maps: list[Mapping], min_bytes: int, exclude: list[tuple[int, int]] = (),
             skip_thread_stacks: bool = True,
             max_bytes: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of every mapping to manage. A mapping over max_bytes is
    left alone (see too_large)."""
    out = []
    prev = None
    for m in maps:
        guarded_stack = (prev is not None and prev.end == m.start and prev.perms.startswith("---")
                         and prev.size == PAGE and prev.inode == 0)
        prev = m
        if m.perms[:2] != "rw" or m.perms[3] != "p" or m.inode != 0:
            continue
        if m.name not in ("", "[heap]") or m.size < min_bytes:
            continue
        if max_bytes is not None and m.size > max_bytes:
            continue
        if guarded_stack and skip_thread_stacks:
            continue
        if any(s < m.end and m.start < e for s, e in exclude):
            continue
        out.append((m.start, m.end))
    return out


def too_large(maps: list[Mapping], min_bytes: int, max_bytes: int,
              exclude: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """The mappings eligible but for their size: reserved address space far
    larger than memory (a sanitizer's shadow is ~15 TiB, NORESERVE), whose
    page map alone would cost gigabytes."""
    every = eligible(maps, min_bytes, exclude)
    kept = set(eligible(maps, min_bytes, exclude, max_bytes=max_bytes))
    return [m for m in every if m not in kept]
