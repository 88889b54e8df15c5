"""setuptools entry: the cffi out-of-line module is declared here (cffi issue #55:
`cffi_modules` is not expressible in pyproject.toml)."""
from setuptools import setup

setup(cffi_modules=["ring/_vring_build.py:ffibuilder"])
