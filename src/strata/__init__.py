"""Strata: layered endpoint management on a global single-instance store."""

__version__ = "0.1.0"
