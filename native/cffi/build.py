"""Builds uffdsrv/_native (cffi, API mode): one cdef module per kernel
interface holds its constants (the compiler fills in their values), and the
functions come from native/src/native.h, the one place they are declared,
compiled together with the C batch helpers in native/src.

    python native/cffi/build.py      # writes uffdsrv/_native*.so
"""
import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import proc  # noqa: E402
import ring  # noqa: E402
import swapdev  # noqa: E402
import uffd  # noqa: E402

MODULES = (uffd, proc, ring, swapdev)
SOURCES = ["uffd.c", "proc.c", "ring.c", "engine.c", "tier.c"]

def prototypes(header: str) -> str:
    """native.h as cdef reads it: without the preprocessor lines."""
    return "\n".join(line for line in header.splitlines() if not line.startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(prototypes((HERE.parent / "src" / "native.h").read_text()))
for m in MODULES:
    if m.CDEF.strip():
        ffibuilder.cdef(m.CDEF)
ffibuilder.set_source(
    "uffdsrv._native",
    '#include "native.h"\n' + "".join(m.INCLUDES for m in MODULES),
    sources=[str(HERE.parent / "src" / s) for s in SOURCES],
    include_dirs=[str(HERE.parent / "src")],
    libraries=["uring", "lz4", "zstd"],
    extra_compile_args=["-O2", "-Wall", "-Werror", "-Wno-unused-function"],
)

if __name__ == "__main__":
    out = ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=False)
    target = ROOT / "uffdsrv" / pathlib.Path(out).name
    pathlib.Path(out).replace(target)
    print(target)
