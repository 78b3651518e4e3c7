"""Which mappings are managed, from realistic /proc/PID/maps text."""
import pytest

from uffdsrv.core.maps import PAGE, Mapping, eligible, parse

# A python3 process with two threads (glibc stacks: a one-page ---p guard right
# below an 8 MiB rw-p stack), a thread malloc arena (rw-p followed by a PROT_NONE
# reserve), a big anonymous mmap, a small one, shared memory and file mappings.
MAPS = """\
55d4c8a00000-55d4c8a3f000 r--p 00000000 08:01 1312345                    /usr/bin/python3.11
55d4c8a3f000-55d4c8d00000 r-xp 0003f000 08:01 1312345                    /usr/bin/python3.11
55d4c8f00000-55d4c8f40000 rw-p 00300000 08:01 1312345                    /usr/bin/python3.11
55d4c8f40000-55d4c8f80000 rw-p 00000000 00:00 0
55d4c9e00000-55d4ca200000 rw-p 00000000 00:00 0                          [heap]
7f1230000000-7f1230021000 rw-p 00000000 00:00 0
7f1230021000-7f1234000000 ---p 00000000 00:00 0
7f1235000000-7f1235001000 ---p 00000000 00:00 0
7f1235001000-7f1235801000 rw-p 00000000 00:00 0
7f1235801000-7f1235802000 ---p 00000000 00:00 0
7f1235802000-7f1236002000 rw-p 00000000 00:00 0
7f1236002000-7f1236003000 rw-p 00000000 00:00 0
7f1237000000-7f1237400000 rw-p 00000000 00:00 0
7f1237400000-7f1237800000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
7f1237800000-7f1237c00000 rw-s 00000000 00:19 77                         /dev/shm/ring
7f1237c00000-7f1238000000 rw-p 00000000 08:01 999                        /var/lib/data.bin
7f1238000000-7f1238100000 r--p 00000000 00:00 0
7f1238100000-7f1238500000 rwxp 00000000 00:00 0
7f1238500000-7f1238900000 rw-p 00000000 00:00 0                          [anon:jit]
7ffd5a100000-7ffd5a300000 rw-p 00000000 00:00 0                          [stack]
7ffd5a3f0000-7ffd5a3f4000 r--p 00000000 00:00 0                          [vvar]
7ffd5a3f4000-7ffd5a3f6000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_parse_fields():
    maps = parse(MAPS)
    assert len(maps) == 23
    assert maps[0] == Mapping(0x55D4C8A00000, 0x55D4C8A3F000, "r--p", 0, 1312345,
                              "/usr/bin/python3.11")
    assert maps[2].offset == 0x300000
    assert maps[3].name == "" and maps[3].inode == 0
    assert maps[4].name == "[heap]" and maps[4].size == 0x400000
    assert maps[13].name == "/dev/zero (deleted)"
    assert maps[-1].start == 0xFFFFFFFFFF600000


def test_parse_skips_short_lines():
    assert parse("\n  \ngarbage\n1000-2000 rw-p 0\n") == []


def test_eligible_realistic():
    got = eligible(parse(MAPS), min_bytes=64 * 1024)
    assert got == [
        (0x55D4C8F40000, 0x55D4C8F80000),  # bss after the data segment
        (0x55D4C9E00000, 0x55D4CA200000),  # [heap]
        (0x7F1230000000, 0x7F1230021000),  # thread arena (reserve is above it)
        (0x7F1237000000, 0x7F1237400000),  # big anonymous mmap
        (0x7F1238100000, 0x7F1238500000),  # rwx anonymous (JIT)
    ]


@pytest.mark.parametrize("min_bytes, has_small", [(PAGE, True), (PAGE + 1, False)])
def test_eligible_size_threshold(min_bytes, has_small):
    got = eligible(parse(MAPS), min_bytes=min_bytes)
    assert ((0x7F1236002000, 0x7F1236003000) in got) is has_small


def test_eligible_threshold_is_inclusive():
    got = eligible(parse(MAPS), min_bytes=0x400000)
    assert got == [(0x55D4C9E00000, 0x55D4CA200000), (0x7F1237000000, 0x7F1237400000),
                   (0x7F1238100000, 0x7F1238500000)]


@pytest.mark.parametrize("exclude, dropped", [
    ([(0x7F1237000000, 0x7F1237001000)], (0x7F1237000000, 0x7F1237400000)),   # overlaps start
    ([(0x7F12373FF000, 0x7F1237500000)], (0x7F1237000000, 0x7F1237400000)),   # overlaps end
    ([(0x55D4C9F00000, 0x55D4C9F01000)], (0x55D4C9E00000, 0x55D4CA200000)),   # inside
])
def test_eligible_exclude(exclude, dropped):
    full = eligible(parse(MAPS), min_bytes=64 * 1024)
    got = eligible(parse(MAPS), min_bytes=64 * 1024, exclude=exclude)
    assert got == [m for m in full if m != dropped]


def test_eligible_exclude_touching_is_kept():
    full = eligible(parse(MAPS), min_bytes=64 * 1024)
    got = eligible(parse(MAPS), min_bytes=64 * 1024,
                   exclude=[(0x7F1236FFF000, 0x7F1237000000), (0x7F1237400000, 0x7F1237401000)])
    assert got == full


@pytest.mark.parametrize("guard, managed", [
    ("7f0000000000-7f0000001000 ---p 00000000 00:00 0", False),     # thread stack
    ("7f0000000000-7f0000002000 ---p 00000000 00:00 0", True),      # two-page reserve
    ("7f0000000000-7f0000001000 r--p 00000000 00:00 0", True),      # not PROT_NONE
    ("7f0000000000-7f0000001000 ---p 00000000 08:01 12  /lib/x.so", True),  # file gap
    ("7effffff0000-7effffff1000 ---p 00000000 00:00 0", True),      # not adjacent
])
def test_eligible_thread_stack_guard(guard, managed):
    text = guard + "\n7f0000001000-7f0000801000 rw-p 00000000 00:00 0 \n"
    got = eligible(parse(text), min_bytes=PAGE)
    assert got == ([(0x7F0000001000, 0x7F0000801000)] if managed else [])
