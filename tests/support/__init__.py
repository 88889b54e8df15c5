"""Shared test support: the guest-driver model (:mod:`tests.support.driver`) and helpers to
run ring tests over every available ring implementation."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

RING_IMPLS = ("py", "c")


def ring_impl_class(name: str):
    """The ``Virtqueue`` class of implementation ``name`` ("py" or "c"); skips the test when
    the C implementation is not built."""
    if name == "py":
        return importlib.import_module("ring.pyring").Virtqueue
    try:
        return importlib.import_module("ring.cring").Virtqueue
    except ImportError as exc:
        pytest.skip(f"C ring not available: {exc}")


def snapshot(memory) -> list[bytes]:
    """A copy of every region's bytes (compare before/after to find guest writes)."""
    return [bytes(r.view) for r in memory.regions]


def changed_gpas(memory, before: list[bytes]) -> list[int]:
    """Guest-physical addresses whose byte differs from ``before``."""
    out = []
    for region, old in zip(memory.regions, before):
        new = bytes(region.view)
        if new != old:
            diff = np.nonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))[0]
            out.extend(region.gpa + int(i) for i in diff)
    return out
