"""What being managed costs with no reclaim running, and whether reclaim
makes progress on a program that never stops.

`manage` rows: each stressor (stress-ng --malloc, --fork, --mmap, one
instance, a fixed --timeout) plain, then under `uffdsrv run` against a
server of our own; `ops_ratio` = managed / plain bogo-ops/s (real time).
The server's CPU time over the managed run is in the row, and so is proof
that the agent did connect: the stress-ng processes the server managed,
and their managed bytes at the peak.

`busy-reclaim` row: `stress-ng --malloc 2` running managed; once both
workers are clients with resident pages, `uffdsrv reclaim` of each while
they keep allocating and freeing. A busy program is where
UFFDIO_WRITEPROTECT meets pending events (EAGAIN): a reclaim that drops the
batch then reclaims nothing. `reclaimed_ratio` = bytes reclaimed / bytes
managed just before (the target), and over resident bytes for reference.
"""
import time
from pathlib import Path

from .procs import MIB, BenchError, Server, cpu_seconds
from .stress import StressNg, watch

STRESSORS = ("malloc", "fork", "mmap")
BUSY_WORKERS = 2


def steps() -> int:
    return len(STRESSORS) + 1


def manage(plan, tmp: Path, step):
    # room for all a busy program can have resident when it is reclaimed
    with Server(tmp, 1024 * MIB) as srv:
        for stressor in STRESSORS:
            step(f"manage: stress-ng --{stressor} 1, plain, then managed")
            plain = StressNg(stressor, 1, plan.stress_s, tmp).wait()
            c0 = cpu_seconds(srv.pid)
            with StressNg(stressor, 1, plan.stress_s, tmp, socket=srv.socket) as st:
                seen = watch(srv, st)
                managed = st.wait()
            cpu = cpu_seconds(srv.pid) - c0
            if not seen["clients_seen"]:
                raise BenchError(f"stress-ng --{stressor} under uffdsrv run: no stress-ng "
                                 "process ever became a client of the server")
            yield {"bench": "manage", "method": stressor, "threads": 1, "instances": 1,
                   "seconds": plan.stress_s,
                   "plain_ops_per_s": plain["ops_per_s"],
                   "managed_ops_per_s": managed["ops_per_s"],
                   "ops_ratio": (managed["ops_per_s"] / plain["ops_per_s"]
                                 if plain["ops_per_s"] > 0 else float("nan")),
                   "plain_bogo_ops": plain["bogo_ops"], "managed_bogo_ops": managed["bogo_ops"],
                   "plain_sys_s": plain["sys_s"], "managed_sys_s": managed["sys_s"],
                   "server_cpu_s": cpu, **seen}
        step(f"busy-reclaim: uffdsrv reclaim of stress-ng --malloc {BUSY_WORKERS}, running")
        yield busy_reclaim(srv, plan, tmp)


def _workers(srv, parent: int) -> list[dict]:
    return [c for c in srv.status()["clients"]
            if c["comm"].startswith("stress-ng") and c["pid"] != parent]


def busy_reclaim(srv, plan, tmp: Path) -> dict:
    """Each malloc instance is two processes (stress-ng runs the stressor in
    a child it can restart after an OOM kill): every stress-ng client but
    the parent is reclaimed."""
    # long enough to outlast the reclaims; stopped as soon as they return
    with StressNg("malloc", BUSY_WORKERS, 600, tmp, socket=srv.socket) as st:
        deadline = time.monotonic() + 30
        while True:
            ws = _workers(srv, st.pid)
            if sum(c["resident_bytes"] > 0 for c in ws) >= BUSY_WORKERS:
                break
            if not st.running():
                raise BenchError("stress-ng --malloc under uffdsrv run exited early: "
                                 + st.out.read_text(errors="replace")[-1500:])
            if time.monotonic() > deadline:
                raise BenchError(f"stress-ng --malloc {BUSY_WORKERS}: its workers were not "
                                 f"managed with resident pages within 30 s: {ws}")
            time.sleep(0.1)
        time.sleep(plan.busy_settle_s)
        ws = _workers(srv, st.pid)
        managed = resident = reclaimed = 0
        errors, secs = [], 0.0
        for w in ws:
            c = next((c for c in srv.status()["clients"] if c["pid"] == w["pid"]), None)
            if c is None:
                errors.append(f"pid {w['pid']} left")
                continue
            managed += c["managed_bytes"]
            resident += c["resident_bytes"]
            s0 = time.perf_counter()
            try:
                reclaimed += srv.reclaim(c["pid"], timeout=120)
            except BenchError as e:
                errors.append(f"pid {c['pid']}: {e}")
            secs += time.perf_counter() - s0
        still = st.running()
        st.kill()
    return {"bench": "busy-reclaim", "method": f"stress-ng --malloc {BUSY_WORKERS}",
            "threads": BUSY_WORKERS, "processes": len(ws), "managed_bytes": managed,
            "resident_bytes": resident, "reclaimed_bytes": reclaimed,
            "reclaimed_ratio": reclaimed / managed if managed else float("nan"),
            "reclaimed_per_resident": reclaimed / resident if resident else float("nan"),
            "seconds": secs, "still_running": still, "errors": errors}
