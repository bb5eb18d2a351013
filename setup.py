"""Build script: the Python packages, plus the compiled ops in csrc/ (added by the csrc backends)."""
from setuptools import setup

setup()
