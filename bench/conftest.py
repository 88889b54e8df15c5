"""pytest configuration of the micro-benchmarks (``python -m pytest bench``).

They live outside ``tests/`` (``testpaths = ["tests"]``), so ``pytest tests`` never collects
them. The end-to-end harness is ``python -m bench``.
"""

import pytest

from tests.support import ring_impl_class


@pytest.fixture(params=["py", "c"])
def ring_impl(request):
    """The Virtqueue class of each ring implementation (C skipped when not built)."""
    return ring_impl_class(request.param)
