"""Load the Hypothesis profile named by ``HYPOTHESIS_PROFILE`` (shared with tests/property)."""

from tests.property.profiles import register

register()
