"""fedsim's version, in one place (``setup.cfg`` reads it; runs and registered models record it)."""

__version__ = "0.1.0"
