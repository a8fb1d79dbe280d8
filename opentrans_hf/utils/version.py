"""The library's version (recorded in every adapter, model card and run record)."""

__version__ = "0.2.0"
