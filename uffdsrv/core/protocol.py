"""The agent protocol (native/include/uffdsrv_proto.h), packed and checked.

Every field is validated here, before the server acts on it: a message that
fails a check raises ProtocolError and the peer is dropped."""
import json
import struct

from .ranges import PAGE

MAGIC = 0x31444655
VERSION = 1
MAX_MSG = 65536
MAX_ZAP_RANGES = 1024

(HELLO, HELLO_OK, ZAP, ZAP_DONE, REGISTER, UNREGISTER, OK, ERROR, CTL, CTL_REPLY,
 RESTORE, DEVICE, FORK_PREPARE, FORK_DONE) = range(1, 15)
HELLO_FORKED, HELLO_RECONNECT, HELLO_AUTO_MAPS, HELLO_HELPER = 1, 2, 4, 8
ZAP_MADVISE = 1

HDR = struct.Struct("<IHHQ")
HELLO_BODY = struct.Struct("<IIQQQQ")
ZAP_HEAD = struct.Struct("<II")
ZAP_DONE_BODY = struct.Struct("<qIi")
REGION_BODY = struct.Struct("<QQ")
ERROR_HEAD = struct.Struct("<iI")
USER_TOP = 1 << 47  # x86-64 user addresses end here


class ProtocolError(Exception):
    pass


def header(buf: bytes) -> tuple[int, int]:
    """-> (type, seq)."""
    if len(buf) < HDR.size:
        raise ProtocolError(f"message of {len(buf)} bytes is shorter than a header")
    magic, version, mtype, seq = HDR.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not {VERSION}")
    return mtype, seq


def parse_bare(buf: bytes, name: str) -> None:
    """RESTORE, DEVICE, FORK_PREPARE and FORK_DONE are a header and nothing else."""
    if len(buf) != HDR.size:
        raise ProtocolError(f"{name} of {len(buf)} bytes")


def pack(mtype: int, seq: int, body: bytes = b"") -> bytes:
    return HDR.pack(MAGIC, VERSION, mtype, seq) + body


def parse_hello(buf: bytes) -> dict:
    if len(buf) != HDR.size + HELLO_BODY.size:
        raise ProtocolError(f"HELLO of {len(buf)} bytes")
    flags, _, features, pstart, plen, beacon = HELLO_BODY.unpack_from(buf, HDR.size)
    if flags & ~(HELLO_FORKED | HELLO_RECONNECT | HELLO_AUTO_MAPS | HELLO_HELPER):
        raise ProtocolError(f"unknown HELLO flags {flags:#x}")
    for name, v in (("private_start", pstart), ("beacon_addr", beacon)):
        if v % PAGE or v >= USER_TOP:
            raise ProtocolError(f"{name} {v:#x} is not a user page address")
    if plen % PAGE or pstart + plen > USER_TOP:
        raise ProtocolError(f"private mapping length {plen:#x}")
    return {"flags": flags, "features": features, "private": (pstart, pstart + plen),
            "beacon": beacon}


def pack_hello(flags: int, features: int, private: tuple[int, int], beacon: int) -> bytes:
    return pack(HELLO, 0, HELLO_BODY.pack(flags, 0, features, private[0],
                                          private[1] - private[0], beacon))


def pack_zap(seq: int, starts, lengths, flags: int = 0) -> bytes:
    n = len(starts)
    if not 1 <= n <= MAX_ZAP_RANGES:
        raise ValueError(f"{n} ranges in one ZAP")
    body = ZAP_HEAD.pack(n, flags) + b"".join(
        REGION_BODY.pack(int(s), int(n_)) for s, n_ in zip(starts, lengths))
    return pack(ZAP, seq, body)


def parse_zap_done(buf: bytes) -> tuple[int, int, int]:
    """-> (result, ranges_done, error)."""
    if len(buf) != HDR.size + ZAP_DONE_BODY.size:
        raise ProtocolError(f"ZAP_DONE of {len(buf)} bytes")
    result, done, error = ZAP_DONE_BODY.unpack_from(buf, HDR.size)
    if done > MAX_ZAP_RANGES or error < 0:
        raise ProtocolError(f"ZAP_DONE claims {done} ranges, error {error}")
    return result, done, error


def parse_region(buf: bytes) -> tuple[int, int]:
    if len(buf) != HDR.size + REGION_BODY.size:
        raise ProtocolError(f"region message of {len(buf)} bytes")
    start, length = REGION_BODY.unpack_from(buf, HDR.size)
    if start % PAGE or length % PAGE or not length or start + length > USER_TOP:
        raise ProtocolError(f"range {start:#x}+{length:#x} is not page-aligned user memory")
    return start, start + length


def pack_error(seq: int, err: int, text: str) -> bytes:
    t = text.encode()[:4000]
    return pack(ERROR, seq, ERROR_HEAD.pack(err, len(t)) + t)


def parse_error(buf: bytes) -> tuple[int, str]:
    if len(buf) < HDR.size + ERROR_HEAD.size:
        raise ProtocolError(f"ERROR of {len(buf)} bytes")
    err, n = ERROR_HEAD.unpack_from(buf, HDR.size)
    return err, buf[HDR.size + ERROR_HEAD.size:HDR.size + ERROR_HEAD.size + n].decode(
        errors="replace")


def pack_ctl(mtype: int, seq: int, obj) -> bytes:
    data = json.dumps(obj).encode()
    if len(data) + HDR.size > MAX_MSG:
        raise ValueError("control message too large")
    return pack(mtype, seq, data)


def parse_ctl(buf: bytes) -> dict:
    try:
        obj = json.loads(buf[HDR.size:].decode())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, 4300-digit ints, nesting
        raise ProtocolError(f"control message is not usable JSON: {str(e)[:100]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message is not a JSON object")
    return obj
