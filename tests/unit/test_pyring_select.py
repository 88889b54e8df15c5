"""Implementation selection by VMCHANNEL_RING (STYLE R8)."""

from __future__ import annotations

import pytest

import ring
from ring import select_implementation
from ring.pyring import Virtqueue as PyVirtqueue

@pytest.mark.parametrize("value", ["py", "1", "PY"])
def test_force_python(value):
    assert select_implementation(value) == ("py", PyVirtqueue)


def test_unset_picks_c_when_importable_else_python():
    name, cls = select_implementation(None)
    try:
        import ring.cring as cring
    except ImportError:
        assert (name, cls) == ("py", PyVirtqueue)
    else:
        assert (name, cls) == ("c", cring.Virtqueue)


def test_without_the_c_module_require_c_fails_and_unset_falls_back(monkeypatch):
    """As on a machine where the cffi build did not run: ``ring.cring`` cannot import."""
    import sys

    monkeypatch.setitem(sys.modules, "ring.cring", None)  # import now raises ImportError
    with pytest.raises(ImportError):
        select_implementation("c")
    assert select_implementation(None) == ("py", PyVirtqueue)


def test_require_c_gives_the_c_ring_when_built():
    name, cls = select_implementation("c")
    import ring.cring as cring

    assert (name, cls) == ("c", cring.Virtqueue)


def test_unknown_value_refused():
    with pytest.raises(ValueError):
        select_implementation("fast")


def test_package_exports():
    assert ring.IMPLEMENTATION in ("py", "c")
    for name in ("Virtqueue", "GuestMemory", "Region", "DriverError", "ChainError",
                 "GuestAddressError", "MemoryMapError", "RingError", "TxResult", "RxResult"):
        assert hasattr(ring, name)
