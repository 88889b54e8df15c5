"""Load the Hypothesis profile named by ``HYPOTHESIS_PROFILE`` (see :mod:`profiles`)."""

from tests.property.profiles import register

register()
