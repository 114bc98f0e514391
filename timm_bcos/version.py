"""The version of timm-bcos: the package reads it from here, and so does its build (pyproject.toml)."""
__version__ = '0.1.0'
