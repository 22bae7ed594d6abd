"""Build script: the pure-Python package today; the native extension (native/) joins here later."""

from setuptools import setup

setup()
