"""Build script: only the optional Cython extensions live here (metadata is in pyproject.toml)."""

from setuptools import setup

setup()
