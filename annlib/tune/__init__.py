"""Automatic tuning of search parameters (docs/tuning.md): :func:`tune` and its result type."""

from .result import OperatingPoint, TuningResult
from .tuner import tune

__all__ = ["tune", "TuningResult", "OperatingPoint"]
