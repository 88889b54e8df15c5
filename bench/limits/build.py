"""Compile the C helpers of ``bench/limits/`` into ``bench/.cache/`` (git-ignored).

Each helper is rebuilt when its source or ``common.h`` is newer than the binary, so the
harness always runs what is in the tree. ``gcc -O2``; nothing else is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

LIMITS_DIR = Path(__file__).resolve().parent
CACHE_DIR = LIMITS_DIR.parent / ".cache"
HELPERS = ("stream", "rtt", "peer", "vsock_guest", "relay")


class BuildError(RuntimeError):
    """gcc is missing or a helper does not compile (``.output`` holds gcc's messages)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message + (f"\n{output}" if output else ""))
        self.output = output


def helper_path(name: str) -> Path:
    """The compiled helper ``name`` (building it first when needed)."""
    if name not in HELPERS:
        raise ValueError(f"unknown helper {name!r}; expected one of {HELPERS}")
    return build(name)


def build(name: str) -> Path:
    source = LIMITS_DIR / f"{name}.c"
    binary = CACHE_DIR / name
    inputs = (source, LIMITS_DIR / "common.h")
    newest = max(p.stat().st_mtime for p in inputs)
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildError("no C compiler (gcc) found: install gcc to measure the machine limit")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run([gcc, "-O2", "-Wall", "-o", str(tmp), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling {source.name} failed", proc.stderr)
    os.replace(tmp, binary)
    return binary


def build_all() -> dict[str, Path]:
    return {name: build(name) for name in HELPERS}


if __name__ == "__main__":  # pragma: no cover
    for name, path in build_all().items():
        print(name, path)
