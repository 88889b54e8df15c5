"""Implementation selection by VMCHANNEL_RING (STYLE R8)."""

from __future__ import annotations

import importlib.util

import pytest

import ring
from ring import select_implementation
from ring.pyring import Virtqueue as PyVirtqueue

HAVE_C = importlib.util.find_spec("ring.cring") is not None


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


@pytest.mark.skipif(HAVE_C, reason="C ring present")
def test_require_c_propagates_import_error():
    with pytest.raises(ImportError):
        select_implementation("c")


def test_unknown_value_refused():
    with pytest.raises(ValueError):
        select_implementation("fast")


def test_package_exports():
    assert ring.IMPLEMENTATION in ("py", "c")
    for name in ("Virtqueue", "GuestMemory", "Region", "DriverError", "ChainError",
                 "GuestAddressError", "MemoryMapError", "RingError", "TxResult", "RxResult"):
        assert hasattr(ring, name)
