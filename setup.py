"""Packaging shim: the metadata lives in pyproject.toml.

setup.py must never import torch for an ordinary install (pip would otherwise need torch
inside an isolated build environment and download one). Only an explicitly requested
ahead-of-time extension build may import it.
"""

from setuptools import setup

setup()
