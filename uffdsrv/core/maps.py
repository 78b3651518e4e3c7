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


def locked(smaps: str) -> list[tuple[int, int]]:
    """(start, end) of the mappings in /proc/PID/smaps text whose VmFlags
    hold `lo` (VM_LOCKED: mlock, mlockall, MAP_LOCKED). The kernel refuses
    MADV_DONTNEED on them (EINVAL, before any REMOVE is raised), so their
    pages cannot be reclaimed: each would be written to swap for nothing.
    mlock splits a mapping at its bounds, so each locked part is a mapping
    of its own."""
    out, cur = [], None
    for line in smaps.splitlines():
        head = line.split(None, 1)
        if not head:
            continue
        if head[0] == "VmFlags:":
            if cur is not None and "lo" in line.split()[1:]:
                if out and out[-1][1] == cur[0]:
                    out[-1] = (out[-1][0], cur[1])
                else:
                    out.append(cur)
            cur = None
        elif "-" in head[0] and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            try:
                cur = (int(lo, 16), int(hi, 16))
            except ValueError:
                cur = None
    return out


def overlap(ranges, other) -> list[tuple[int, int]]:
    """The parts of the sorted, disjoint (start, end) `ranges` that the
    sorted, disjoint `other` cover."""
    out, j = [], 0
    other = list(other)
    for s, e in ranges:
        while j < len(other) and other[j][1] <= s:
            j += 1
        k = j
        while k < len(other) and other[k][0] < e:
            out.append((max(s, other[k][0]), min(e, other[k][1])))
            k += 1
    return out
