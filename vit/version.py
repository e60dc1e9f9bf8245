"""The package version, in one place (``vit.__version__``; exports record it)."""

__version__ = "0.1.0"
