"""The package version, below every module that records it (model cards, metrics)."""

__version__ = "0.1.0"
