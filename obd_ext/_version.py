"""The one home of obd_ext's version (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
