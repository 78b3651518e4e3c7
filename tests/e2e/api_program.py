"""A Python program that uses the explicit agent API (no LD_PRELOAD): it
manages one buffer and answers commands on stdin. `pread`/`pwrite` move
data between a file and the buffer through the kernel, so the faults on
reclaimed pages are taken inside read(2)/write(2)."""
import hashlib
import mmap
import os
import sys

from uffdsrv import client

PAGE = 4096
npages = int(sys.argv[2])
buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if not client.start(sys.argv[1]):
    print("unmanaged", client.status(), flush=True)
    sys.exit(1)


def page(i: int, gen: int) -> bytes:
    return hashlib.sha256(f"{i}:{gen}".encode()).digest() * (PAGE // 32)


gens = [1] * npages
for i in range(npages):
    buf[i * PAGE:(i + 1) * PAGE] = page(i, 1)
client.register(buf)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "verify":
        bad = sum(buf[i * PAGE:(i + 1) * PAGE] != page(i, gens[i]) for i in range(npages))
        print("ok", bad, flush=True)
    elif cmd == "pwrite":  # the kernel reads the reclaimed buffer
        fd = os.open(args[0], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        n = os.write(fd, buf)
        os.close(fd)
        with open(args[0], "rb") as f:
            data = f.read()
        bad = sum(data[i * PAGE:(i + 1) * PAGE] != page(i, gens[i]) for i in range(npages))
        print("ok", n, bad, flush=True)
    elif cmd == "pread":  # the kernel writes into the reclaimed buffer
        gen = int(args[1])
        with open(args[0], "wb") as f:
            for i in range(npages):
                f.write(page(i, gen))
        fd = os.open(args[0], os.O_RDONLY)
        n = os.readv(fd, [buf])
        os.close(fd)
        gens = [gen] * npages
        print("ok", n, flush=True)
    elif cmd == "unregister":
        try:
            client.unregister(buf)
            print("ok", flush=True)
        except OSError as e:  # the server refused: the buffer stays managed
            print("error", e.errno, flush=True)
    elif cmd == "exit":
        print("bye", flush=True)
        break
