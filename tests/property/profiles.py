"""Hypothesis profiles for the property and fuzz suites, chosen by ``HYPOTHESIS_PROFILE``.

- ``default`` (also when the variable is unset): the whole property suite stays under about
  a minute on a 2-core machine; derandomized, so a local run and CI see the same examples.
- ``ci``: the same budget as ``default``.
- ``nightly``: fifty times the examples, longer state-machine runs, random seeds.

Tests size themselves with :func:`scaled` (a fraction of the profile's ``max_examples``), so
a heavy test (the data path over sockets) costs a fixed share of every profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"

_COMMON = dict(
    deadline=None,  # socket round trips and first imports vary in time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=True,
)


def register() -> str:
    """Register the three profiles and load the one ``HYPOTHESIS_PROFILE`` names."""
    settings.register_profile("default", max_examples=60, stateful_step_count=50,
                              derandomize=True, **_COMMON)
    settings.register_profile("ci", max_examples=60, stateful_step_count=50,
                              derandomize=True, **_COMMON)
    settings.register_profile("nightly", max_examples=3000, stateful_step_count=300,
                              derandomize=False, **_COMMON)
    name = os.environ.get(PROFILE_ENV) or "default"
    settings.load_profile(name)
    return name


def scaled(fraction: float, **overrides) -> settings:
    """Settings with ``fraction`` of the loaded profile's ``max_examples`` (at least 1)."""
    base = settings.default
    return settings(base, max_examples=max(1, int(base.max_examples * fraction)), **overrides)
