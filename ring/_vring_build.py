"""cffi build script for ``ring._vring_c``, the C hot path of the ring package.

Two ways to run it (STYLE R7):

- ``pip install .``: setup.py declares ``cffi_modules=["ring/_vring_build.py:ffibuilder"]``
  (cffi issue #55: not expressible in pyproject.toml), setuptools compiles the module;
- ``python3 ring/_vring_build.py``: an in-place build for development, leaving
  ``ring/_vring_c.*.so`` next to this file.

The declarations come from ``csrc/vring.h`` itself (it is kept cdef-clean), so the C code
and the Python binding cannot drift apart.

Spec: virtio 1.2 §2.7, §2.8 (what the C code implements); docs/internals.md.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

import cffi

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _relative(path: pathlib.Path) -> str:
    """setuptools wants source paths relative to the project root (it runs there)."""
    try:
        return os.path.relpath(path, os.getcwd())
    except ValueError:  # another drive (Windows): absolute then
        return str(path)


def make_builder(absolute: bool = False) -> cffi.FFI:
    """The FFI builder; source paths relative to the project root for setuptools (which runs
    there), absolute for :func:`build_in_place` (cffi compiles inside a temporary dir)."""
    where = (lambda p: str(p)) if absolute else _relative
    builder = cffi.FFI()
    builder.cdef((CSRC / "vring.h").read_text())
    builder.cdef((CSRC / "vsock_path.h").read_text())  # the vsock TX lane (uses vring.h)
    builder.cdef((CSRC / "vsock_stream.h").read_text())  # the vsock stream loop (uses both)
    builder.set_source(
        "ring._vring_c",
        '#include "vring.h"\n#include "vsock_path.h"\n#include "vsock_stream.h"',
        sources=[where(CSRC / "vring.c"), where(CSRC / "vsock_path.c"),
                 where(CSRC / "vsock_stream.c"), where(CSRC / "zerocopy.c")],
        include_dirs=[where(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    )
    return builder


ffibuilder = make_builder()


def build_in_place() -> pathlib.Path:
    """Compile into ``ring/`` (the source tree imports it from there)."""
    with tempfile.TemporaryDirectory(prefix="vring-build-") as tmp:
        built = pathlib.Path(make_builder(absolute=True).compile(tmpdir=tmp, verbose=False))
        target = ROOT / "ring" / built.name
        partial = target.with_name(target.name + ".tmp")
        shutil.copyfile(built, partial)
        os.replace(partial, target)  # atomic: a running import never sees half a file
    return target


if __name__ == "__main__":
    print(build_in_place(), file=sys.stderr)
