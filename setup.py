# The C framer is built through cffi in API mode (out of line); everything
# else about the package lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
