"""The uffdsrv command line.

    uffdsrv serve   --socket PATH --swap PATH [--swap-size BYTES] [--metrics-addr HOST:PORT]
    uffdsrv run     --socket PATH -- CMD [ARGS...]
    uffdsrv status  --socket PATH [--json] [--pid PID]
    uffdsrv reclaim --socket PATH --pid PID [--keep-bytes N]
    uffdsrv restore --socket PATH --pid PID
    uffdsrv limit   --socket PATH --pid PID --bytes N|none
    uffdsrv top     --socket PATH [--metrics-url URL] [--interval S] [--once]

A user's mistake gets one line on stderr and a non-zero exit, never a
traceback.
"""
import argparse
import json
import logging
import os
import sys

from . import ctl
from .core import budgets
from .core.access import parse_ids

DEFAULT_SOCKET = "/run/uffdsrv/uffdsrv.sock"
AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin", "libuffdsrv_agent.so")


class UsageError(Exception):
    pass


def parse_size(text: str) -> int:
    try:
        return budgets.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_tier(text: str) -> int:
    from .server.swap import ram_tier_size
    try:
        return ram_tier_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def server_keys(text: str, path: str) -> tuple[str, dict]:
    """The config's own keys (ram_tier, ram_tier_codec) out of its text:
    the rest is the budgets' (core/budgets.py refuses keys it does not know)."""
    import re
    import tomllib
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: config is not valid TOML: {e}") from None
    got = {k: doc.pop(k) for k in ("ram_tier", "ram_tier_codec") if k in doc}
    rest = re.sub(r"(?m)^[ \t]*(ram_tier|ram_tier_codec)[ \t]*=.*$", "", text)
    try:
        ok = tomllib.loads(rest) == doc
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise UsageError(f"{path}: put ram_tier and ram_tier_codec each on one line, at the top")
    try:
        if "ram_tier" in got:
            got["ram_tier"] = parse_tier(str(got["ram_tier"]))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{path}: ram_tier: {e}") from None
    if got.get("ram_tier_codec", "lz4") not in ("lz4", "zstd"):
        raise UsageError(f"{path}: ram_tier_codec must be lz4 or zstd")
    return rest, got


def parse_budget(text: str) -> int | None:
    return None if text.strip().lower() == "none" else parse_size(text)


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host or "127.0.0.1", int(port)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="uffdsrv", description="a user-space memory manager over userfaultfd")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--socket", default=DEFAULT_SOCKET)
    s.add_argument("--swap", required=True, help="swap file (created 0600) or block device")
    s.add_argument("--swap-size", type=parse_size, default=1 << 30)
    s.add_argument("--state-dir", default=None,
                   help="where the journal lives (default: the swap file's directory); "
                        "a server restarted with the same one takes over every program")
    s.add_argument("--metrics-addr", type=parse_addr, default=None)
    s.add_argument("--allow-uid", type=parse_ids, default=frozenset(), metavar="UID[,UID...]",
                   help="uids besides root and the server's that may use the socket")
    s.add_argument("--allow-gid", type=parse_ids, default=frozenset(), metavar="GID[,GID...]",
                   help="groups whose members may use the socket")
    s.add_argument("--min-region", type=parse_size, default=256 << 10,
                   help="smallest anonymous mapping managed automatically")
    s.add_argument("--max-region", type=parse_size, default=None,
                   help="largest mapping managed (default: twice the machine's memory); "
                        "larger ones are reserved address space and left alone")
    s.add_argument("--zap-mode", choices=("process_madvise", "madvise"),
                   default="process_madvise",
                   help="how agents zap: one vectored call per batch (default), or one "
                        "madvise per range (for comparison)")
    s.add_argument("--policy", choices=("coldest", "fifo", "random", "address"),
                   default="coldest", help="which pages go first (default: coldest)")
    s.add_argument("--budget", type=parse_size, default=None,
                   help="default budget of resident managed memory per program")
    s.add_argument("--ram-tier", type=parse_tier, default=None, metavar="SIZE|N%",
                   help="compressed RAM tier in front of the swap file: a cap (256M, 1G) or "
                        "a share of the machine's memory (25%%); 0 or absent: none")
    s.add_argument("--ram-tier-codec", choices=("lz4", "zstd"), default=None,
                   help="the RAM tier's compressor (default lz4)")
    s.add_argument("--config", default=None,
                   help="TOML file with budgets per program (and ram_tier, ram_tier_codec)")
    s.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    r = sub.add_parser("run", help="run a command with the agent loaded")
    r.add_argument("--socket", default=DEFAULT_SOCKET)
    r.add_argument("command", nargs=argparse.REMAINDER)
    st = sub.add_parser("status", help="what the server manages")
    st.add_argument("--socket", default=DEFAULT_SOCKET)
    st.add_argument("--json", action="store_true")
    st.add_argument("--pid", type=positive_int, default=None, help="only this program")
    rc = sub.add_parser("reclaim", help="reclaim a client's memory now")
    rc.add_argument("--socket", default=DEFAULT_SOCKET)
    rc.add_argument("--pid", type=positive_int, required=True)
    rc.add_argument("--keep-bytes", type=parse_size, default=0)
    rs = sub.add_parser("restore", help="bring every page of a program back and stop "
                                        "managing it (before a debugger or a core dump)")
    rs.add_argument("--socket", default=DEFAULT_SOCKET)
    rs.add_argument("--pid", type=positive_int, required=True)
    lm = sub.add_parser("limit", help="set a program's budget of resident managed memory")
    lm.add_argument("--socket", default=DEFAULT_SOCKET)
    lm.add_argument("--pid", type=positive_int, required=True)
    lm.add_argument("--bytes", type=parse_budget, required=True,
                    help="the budget (64M, 1G, ...), or 'none' for no budget")
    tp = sub.add_parser("top", help="a live view of the server's figures")
    tp.add_argument("--socket", default=DEFAULT_SOCKET)
    tp.add_argument("--metrics-url", default=None,
                    help="the server's /metrics (http://HOST:PORT/metrics or HOST:PORT)")
    tp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    tp.add_argument("--once", action="store_true", help="print one view and exit")
    return p


def _say(e: "ctl.ControlError") -> str:
    return str(e) if isinstance(e, ctl.Unreachable) else f"server: {e}"


def cmd_serve(a) -> int:

    import uvloop

    from .server.daemon import Server
    from .server.swap import SwapError
    from .system import kernel
    why = kernel.current(os.path.dirname(os.path.abspath(a.swap))).refusal()
    if why:
        raise UsageError(f"uffdsrv serve: {why}")
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        logging.getLogger("uffdsrv").warning("not running as root: process_vm_readv and "
                                             "pidfd_getfd need CAP_SYS_PTRACE")
    try:
        rules, conf = budgets.Budgets(), {}
        if a.config:
            try:
                with open(a.config) as f:
                    text, conf = server_keys(f.read(), a.config)
                    rules = budgets.load(text)
            except OSError as e:
                raise UsageError(f"cannot read config {a.config}: {e.strerror}") from None
            except ValueError as e:
                raise UsageError(f"{a.config}: {e}") from None
        if a.budget is not None:
            rules.default = a.budget
        server = Server(a.socket, a.swap, a.swap_size, a.metrics_addr, a.min_region,
                        a.zap_mode, state_dir=a.state_dir, policy=a.policy, budgets=rules,
                        allow_uids=a.allow_uid or (), allow_gids=a.allow_gid or (),
                        max_region=a.max_region,
                        ram_tier=conf.get("ram_tier", 0) if a.ram_tier is None else a.ram_tier,
                        ram_tier_codec=a.ram_tier_codec or conf.get("ram_tier_codec", "lz4"))
    except SwapError as e:
        raise UsageError(str(e)) from None

    async def main():
        try:
            await server.run()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot start: {e}") from None
    uvloop.run(main())
    return 0


def cmd_run(a) -> int:
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        raise UsageError("uffdsrv run: no command given (uffdsrv run --socket PATH -- CMD ...)")
    if not os.path.exists(AGENT):
        raise UsageError(f"the agent library {AGENT} is not built (run make)")
    from .system import kernel
    env = dict(os.environ)
    why = kernel.current().refusal()
    if why:
        print(f"uffdsrv run: {why}; running {cmd[0]} unmanaged", file=sys.stderr)
    else:
        env["UFFDSRV_SOCKET"] = os.path.abspath(a.socket)
        env["LD_PRELOAD"] = " ".join(filter(None, [AGENT, env.get("LD_PRELOAD")]))
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        print(f"uffdsrv run: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"uffdsrv run: {cmd[0]}: permission denied", file=sys.stderr)
        return 126


def cmd_status(a) -> int:
    reply = ctl.request(a.socket, "status", **({} if a.pid is None else {"pid": a.pid}))
    if a.json:
        print(json.dumps(reply))
        return 0
    mib = 1 << 20
    heads = ("MANAGED", "RESIDENT", "SWAPPED", "FAULTS")
    print(f"{'PID':>8} {'COMM':<16} " + " ".join(f"{h:>10}" for h in heads))
    for c in reply["clients"]:
        print(f"{c['pid']:>8} {c['comm'][:16]:<16} {c['managed_bytes'] / mib:>8.1f}Mi "
              f"{c['resident_bytes'] / mib:>8.1f}Mi {c['swapped_bytes'] / mib:>8.1f}Mi "
              f"{c['faults_total']:>10}")
    s = reply["swap"]
    print(f"swap {s['path']}: {s['used_bytes'] / mib:.1f} of {s['size_bytes'] / mib:.0f} MiB used")
    return 0


def cmd_reclaim(a) -> int:
    # a reclaim of a large program takes a while: wait for it
    reply = ctl.request(a.socket, "reclaim", timeout=600, pid=a.pid, keep_bytes=a.keep_bytes)
    print(json.dumps({"reclaimed_bytes": reply["reclaimed_bytes"]}))
    return 0


def cmd_restore(a) -> int:
    # every reclaimed page is read back from swap: as long as a reclaim
    reply = ctl.request(a.socket, "restore", timeout=600, pid=a.pid)
    print(f"pid {reply['pid']}: {reply['restored_pages']} pages brought back; "
          "no longer managed")
    return 0


def cmd_limit(a) -> int:
    reply = ctl.request(a.socket, "limit", pid=a.pid, bytes=a.bytes)
    print(json.dumps(reply))
    return 0


def cmd_top(a) -> int:
    from .top import ScrapeError, run
    if not a.interval > 0:
        raise UsageError("uffdsrv top: --interval must be positive")
    try:
        return run(a.socket, a.metrics_url, a.interval, a.once)
    except ScrapeError as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        return {"serve": cmd_serve, "run": cmd_run, "status": cmd_status,
                "reclaim": cmd_reclaim, "restore": cmd_restore, "limit": cmd_limit,
                "top": cmd_top}[a.cmd](a)
    except ctl.ControlError as e:
        print(f"uffdsrv: {_say(e)}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(str(e) if str(e).startswith("uffdsrv") else f"uffdsrv: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
