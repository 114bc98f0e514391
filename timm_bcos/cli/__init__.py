"""The `timm-bcos` command line (explain, publish, pull, coverage, train, evaluate, demo): thin
wrappers over the library."""
from .main import main

__all__ = ['main']
