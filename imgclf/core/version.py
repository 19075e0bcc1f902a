"""The package version, recorded in every bundle and export."""

__version__ = "0.1.0"
