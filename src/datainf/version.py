"""The library's version, in one place (nothing needs to import the package root for it)."""

__version__ = "0.2.0"
