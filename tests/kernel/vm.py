"""The end-to-end subset on a second kernel: Debian 12's own 6.1, booted
under QEMU with virtme-ng, the tests run inside it on a read-only view of
this machine's filesystem (so the very venv, build and tests of this tree).

    python -m tests.kernel.vm [--keep-going] [pytest node ids...]

How the pieces behave, as found on this machine:

* The kernel comes from Debian's archive with `apt-get download` (the
  newest linux-image-6.1.0-N-amd64; KERNEL_PKG= overrides) and is only
  unpacked under build/kernel/: it is never installed as the host's.
  The generic -amd64 flavour is needed: -cloud lacks the 9p modules the
  guest's root filesystem is mounted with.
* KVM here cannot run a stock guest, so QEMU runs with TCG (software
  emulation): 3-5x slower per instruction than the host on this kind of
  work. `clocksource=tsc tsc=reliable` stops the guest from declaring the
  TSC unstable under emulation, which otherwise stalls some boots. A boot
  that has not started the guest's script within BOOT_S is killed and
  tried again (at most BOOTS times).
* virtme-ng shares / read-only over 9p and puts a tmpfs overlay on /tmp,
  /etc, /var...; build/kernel/out is shared read-write. The guest writes
  its log, the probe's answer, a JUnit file and its exit code there, and
  this script reads them: that works whether or not virtme can find its
  virtio-serial ports (it needs udev in the guest for those).
* Reading files over 9p under TCG is slow: importing the server took 24 s
  in the guest (10 s of it system time, thousands of 9p round trips), so
  each `uffdsrv run` of a test would too. The Python that runs the tests
  (the interpreter's prefix without its site-packages, the venv, uffdsrv/
  and tests/) is therefore staged onto a scratch disk: hard links under
  build/kernel/stage, packed by `mkfs.ext4 -d` into a sparse image made
  afresh for each run (build/kernel/scratch.img), attached over virtio-blk
  and bind-mounted in the guest over the same paths. The page cache then
  works as on any disk.
* The guest's /tmp is a tmpfs overlay, where a swap file is memory and
  fallocate() of one answered EINTR on 6.1 here: the tests' temporary
  files go on the scratch disk too (TMPDIR), an ext4 that takes O_DIRECT.
  The guest script loads virtio_blk and ext4 itself, so it needs no udev.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "build" / "kernel"
OUT = BUILD / "out"
VNG = ROOT / "build" / "vng" / "bin" / "vng"
PY = ROOT / ".venv" / "bin" / "python"
BOOTS = 3
BOOT_S = 120  # from starting QEMU to the guest's first line
RUN_S = 480  # the whole subset, in the guest
MEMORY = "2G"
SCRATCH = "8G"

# The subset: existing tests, selected by node id, plus those written for
# the second kernel. Each is small (<= 64 MiB): TCG is slow.
SUBSET = [
    "tests/kernel/test_guest.py",
    "tests/system/test_kernel.py",
    "tests/e2e/test_workload.py::test_fork_child_sees_reclaimed_pages",
    "tests/e2e/test_workload.py::test_partial_reclaim_keeps_budget",
    "tests/e2e/test_workload.py::test_program_dontneed_reads_zeros_not_stale_swap",
    "tests/e2e/test_workload.py::test_fork_then_both_sides_reclaimed_and_written",
    "tests/e2e/test_workload.py::test_munmap_and_mremap_of_reclaimed_pages",
    "tests/e2e/test_crash.py::test_faults_wait_for_the_next_server_and_read_exact_bytes",
]

# What Debian's 6.1 lacks, as measured (issue 12): the guest's probe must
# find exactly these missing, and say so in status --json.
MISSING_ON_6_1 = ["process_madvise_self", "process_madvise_dontneed", "uffdio_poison",
                  "pagemap_scan", "rwf_dontcache", "uffd_wp_async", "uffd_move"]


def say(msg: str) -> None:
    print(f"test-kernel: {msg}", flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def kernel_package() -> str:
    if os.environ.get("KERNEL_PKG"):
        return os.environ["KERNEL_PKG"]
    pat = r"^linux-image-6\.1\.0-[0-9]+-amd64$"
    for attempt in range(2):
        names = run(["apt-cache", "search", "--names-only", pat]).stdout.split("\n")
        found = [n.split()[0] for n in names if n.strip()]
        if found:
            return max(found, key=lambda n: int(n.split("-")[3]))
        if attempt == 0:
            say("no linux-image-6.1 in the apt lists: apt-get update")
            run(["apt-get", "update", "-qq"])
    raise SystemExit("test-kernel: apt knows no linux-image-6.1.0-N-amd64 (not Debian 12?); "
                     "set KERNEL_PKG")


def fetch_kernel() -> tuple[Path, str]:
    """The kernel image, unpacked under build/kernel/<package>/."""
    pkg = kernel_package()
    root = BUILD / pkg
    images = sorted(root.glob("boot/vmlinuz-*"))
    if not images:
        debs = sorted(BUILD.glob(f"{pkg}_*.deb"))
        if not debs:
            say(f"apt-get download {pkg}")
            r = run(["apt-get", "download", pkg], cwd=BUILD)
            debs = sorted(BUILD.glob(f"{pkg}_*.deb"))
            if not debs:
                raise SystemExit(f"test-kernel: apt-get download {pkg} failed: "
                                 f"{r.stderr.strip()}")
        tmp = root.with_suffix(".part")
        shutil.rmtree(tmp, ignore_errors=True)
        r = run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)])
        if r.returncode:
            raise SystemExit(f"test-kernel: dpkg-deb -x {debs[-1].name}: {r.stderr.strip()}")
        tmp.rename(root)
        images = sorted(root.glob("boot/vmlinuz-*"))
    return images[-1], pkg


def _link_tree(src: Path, dst: Path, skip=()) -> None:
    """dst mirrors src with hard links (copies across filesystems)."""
    for dirpath, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not (Path(dirpath) == src and d in skip)]
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            s, d = Path(dirpath) / f, dst / rel / f
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
                continue
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


def stage() -> list[str]:
    """What the guest runs, linked under build/kernel/stage/<absolute path>;
    returns the absolute paths the guest binds over."""
    st = BUILD / "stage"
    shutil.rmtree(st, ignore_errors=True)
    cfg = dict(line.split(" = ", 1) for line in
               (ROOT / ".venv" / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    prefix = Path(cfg["home"]).parent
    ver = "python" + cfg["version"].rsplit(".", 1)[0]
    _link_tree(prefix / "bin", st / prefix.relative_to("/") / "bin")
    lib = prefix / "lib"
    for so in lib.glob("libpython*"):
        _link_tree(so.parent, st / lib.relative_to("/"), skip=[p.name for p in lib.iterdir()
                                                               if p.is_dir()])
        break
    _link_tree(lib / ver, st / (lib / ver).relative_to("/"), skip=("site-packages", "test"))
    binds = [str(prefix)]
    for d in (".venv", "uffdsrv", "tests"):
        _link_tree(ROOT / d, st / (ROOT / d).relative_to("/"))
        binds.append(str(ROOT / d))
    # the shared libraries those processes map (libc, libcrypto, liburing...):
    # mapped from 9p they fault in again in every process (~2,800 major
    # faults per server start), from ext4 once
    r = run([str(PY), "-c", "import uffdsrv.server.daemon, uffdsrv.harness, uffdsrv.cli, pytest\n"
             "for line in open('/proc/self/maps'):\n"
             "    f = line.split()[5:]\n"
             "    print(f[0] if f and f[0].startswith('/') else '')"], cwd=ROOT)
    for f in sorted(set(r.stdout.split()) - {""}):
        path = Path(f)
        if any(path.is_relative_to(b) for b in binds) or not path.is_file():
            continue
        dst = st / path.relative_to("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dst)
        except OSError:
            shutil.copy2(path, dst)
        binds.append(f)
    return binds


def guest_script(tests: list[str], binds: list[str]) -> str:
    q = shlex.quote
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONFAULTHANDLER": "1", "UFFDSRV_KERNEL_VM": "1",
           "UFFDSRV_EXPECT_MISSING": ",".join(MISSING_ON_6_1), "TMPDIR": "/tmp/scratch/tmp"}
    out = q(str(OUT))
    return "\n".join([
        f"echo \"guest: started on $(uname -r)\" > {out}/guest.log",
        "for m in virtio_blk ext4; do modprobe -q $m; done",
        "for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done",
        f"mkdir -p /tmp/scratch && mount -t ext4 /dev/vda /tmp/scratch >> {out}/guest.log 2>&1"
        f" || {{ echo 'guest: no scratch disk' >> {out}/guest.log; echo 126 > {out}/rc; exit; }}",
        "mkdir -p /tmp/scratch/tmp",
        # mkfs -d put the stage's contents at the image's root
        *(f"mount --bind /tmp/scratch{q(b)} {q(b)} >> {out}/guest.log 2>&1" for b in binds),
        f"cd {q(str(ROOT))}",
        "export " + " ".join(f"{k}={q(v)}" for k, v in env.items()),
        # the probe's answer; importing the server and the tests' harness on
        # the way reads them into the page cache, so that the first test's
        # server starts within its 20 s like the others
        f"{q(str(PY))} -c 'import json, pytest, uffdsrv.server.daemon, uffdsrv.harness; "
        "from uffdsrv.system import kernel; "
        f"print(json.dumps(kernel.probe().as_json()))' > {out}/features.json 2>> {out}/guest.log",
        f"{q(str(PY))} -m pytest -p no:cacheprovider -q -rs --durations=8 "
        f"--junitxml={out}/junit.xml "
        + " ".join(q(t) for t in tests) + f" >> {out}/guest.log 2>&1",
        f"echo $? > {out}/rc",
    ]) + "\n"


class Tail(threading.Thread):
    """Prints the guest's log as it grows (a 9p file the guest appends to)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop, self.pos = path, threading.Event(), 0

    def run(self):
        while not self.stop.wait(0.5):
            self.drain()

    def drain(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()


def boot(image: Path, tests: list[str]) -> int | None:
    """One boot: the subset's exit code, or None if the guest never started."""
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    # the script goes in a file: --exec travels on the kernel command line,
    # which 6.1 cuts at 2048 bytes
    binds = stage()
    script = BUILD / "guest.sh"
    script.write_text(guest_script(tests, binds))
    disk = BUILD / "scratch.img"
    disk.unlink(missing_ok=True)
    r = run(["mkfs.ext4", "-q", "-F", "-d", str(BUILD / "stage"), "-E",
             "lazy_itable_init=1,lazy_journal_init=1", str(disk), SCRATCH]) \
        if not run(["truncate", "-s", SCRATCH, str(disk)]).returncode else None
    if r is None or r.returncode:
        raise SystemExit(f"test-kernel: cannot make {disk}: {r.stderr.strip() if r else ''}")
    argv = [str(VNG), "--run", str(image), "--disable-kvm", "--cpus", "2",
            "--memory", MEMORY, "--append", "clocksource=tsc tsc=reliable",
            "--rwdir", str(OUT), "--disk", str(disk), "--exec", f"sh {shlex.quote(str(script))}"]
    env = dict(os.environ, PATH=f"{VNG.parent}:{os.environ.get('PATH', '')}")
    log = open(BUILD / "qemu.log", "w")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         env=env, cwd=ROOT, start_new_session=True)
    tail = Tail(OUT / "guest.log")
    tail.start()
    t0 = time.monotonic()
    started = None
    try:
        while p.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            if started is None and (OUT / "guest.log").exists():
                started = now
                say(f"guest started after {now - t0:.1f} s")
            if started is None and now - t0 > BOOT_S:
                say(f"no guest after {BOOT_S} s: killing this boot")
                return None
            if started is not None and now - started > RUN_S:
                say(f"the subset ran past {RUN_S} s: killing the guest")
                return 124
        tail.drain()
        if started is None:
            return None
        rc = (OUT / "rc").read_text().strip() if (OUT / "rc").exists() else ""
        return int(rc) if rc.isdigit() else 125
    finally:
        tail.stop.set()
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
        log.close()


def host_features() -> dict:
    r = run([str(PY), "-c", "import json; from uffdsrv.system import kernel; "
             "print(json.dumps(kernel.probe().as_json()))"], cwd=ROOT)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def table(host: dict, guest: dict) -> str:
    names = list(host.get("features") or guest.get("features") or {})
    hr, gr = host.get("release", "?"), guest.get("release", "?")
    w = max([len(n) for n in names] + [7])
    lines = [f"{'feature':<{w}}  {hr:>16}  {gr:>16}"]
    yes = {True: "yes", False: "MISSING", None: "?"}
    for n in names:
        lines.append(f"{n:<{w}}  {yes[host.get('features', {}).get(n)]:>16}  "
                     f"{yes[guest.get('features', {}).get(n)]:>16}")
    lines.append(f"{'uffd_features':<{w}}  {host.get('uffd_features', 0):>#16x}  "
                 f"{guest.get('uffd_features', 0):>#16x}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tests", nargs="*", help="pytest node ids (default: the subset)")
    a = ap.parse_args()
    for tool in ("qemu-system-x86_64", "busybox"):
        if not shutil.which(tool):
            raise SystemExit(f"test-kernel: {tool} is missing (make test-kernel installs it)")
    if not VNG.exists():
        raise SystemExit(f"test-kernel: {VNG} is missing (make test-kernel installs it)")
    BUILD.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    image, pkg = fetch_kernel()
    say(f"kernel {pkg}: {image.relative_to(ROOT)}")
    rc = None
    for n in range(1, BOOTS + 1):
        say(f"boot {n} of {BOOTS} (QEMU TCG, 2 CPUs, {MEMORY})")
        rc = boot(image, a.tests or SUBSET)
        if rc is not None:
            break
    if rc is None:
        say(f"the guest never started in {BOOTS} boots; see {BUILD / 'qemu.log'}")
        return 1
    try:
        guest = json.loads((OUT / "features.json").read_text())
    except (OSError, ValueError):
        guest = {}
    print(table(host_features(), guest))
    junit = (OUT / "junit.xml").read_text() if (OUT / "junit.xml").exists() else ""
    m = re.search(r'tests="(\d+)"', junit)
    say(f"subset exit code {rc} ({m.group(1) if m else '?'} tests) in "
        f"{time.monotonic() - t0:.0f} s; guest log in {OUT / 'guest.log'}")
    if rc == 0:  # the scratch disk holds ~600 MB; kept only to look into a failure
        (BUILD / "scratch.img").unlink(missing_ok=True)
        shutil.rmtree(BUILD / "stage", ignore_errors=True)
    else:
        say(f"the guest's files stay in {BUILD / 'scratch.img'} (read with debugfs)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
