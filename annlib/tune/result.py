"""What :func:`annlib.tune` returns: the chosen search parameters, usable as ``**result``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["OperatingPoint", "TuningResult"]


@dataclass(frozen=True)
class OperatingPoint:
    """One candidate setting with its predicted recall and cost on the tuning sample.

    Attributes
    ----------
    params : dict
        Search parameters.
    recall : float
        Recall@k on the tuning sample (exact for the model, or measured).
    cost : float
        Predicted or measured seconds per query, one thread, batch search.
    """

    params: dict[str, Any]
    recall: float
    cost: float


@dataclass(frozen=True)
class TuningResult(Mapping):
    """Search parameters chosen by :func:`annlib.tune`, with what was predicted and checked.

    It is a mapping of the chosen parameters, so ``index.search(Q, k, **result)`` works.

    Attributes
    ----------
    params : dict
        The chosen search parameters (also the mapping's contents).
    family : str
        The index family tuned.
    target_recall, max_cost : float or None
        The constraint that was given (exactly one is set).
    predicted_recall, predicted_cost : float
        Recall@k on the tuning sample and seconds per query (one thread) at ``params``.
    held_out_recall : float or None
        Recall@k measured by real searches of the held-out queries (None without held-out).
    margin : float
        Added to the recall target on the tuning sample (raised if the held-out check fell short).
    pareto : tuple of OperatingPoint
        The predicted recall/cost frontier the choice was made on, cheapest first.
    method : str
        How the choice was made ("lagrangian" over an exact recall model, or "bisection").
    seconds : float
        Wall time of the whole tuning call.
    details : dict
        Family-specific extras (grid sizes, calibrated cost coefficients, ...).
    """

    params: dict[str, Any]
    family: str
    target_recall: float | None
    max_cost: float | None
    predicted_recall: float
    predicted_cost: float
    held_out_recall: float | None
    margin: float
    pareto: tuple[OperatingPoint, ...]
    method: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (stored as ``index.tuning`` when the result is applied)."""
        return {
            "family": self.family, "params": dict(self.params), "target_recall": self.target_recall,
            "max_cost": self.max_cost, "predicted_recall": round(self.predicted_recall, 5),
            "predicted_cost_us": round(self.predicted_cost * 1e6, 3),
            "held_out_recall": None if self.held_out_recall is None else round(self.held_out_recall, 5),
            "margin": self.margin, "method": self.method, "seconds": round(self.seconds, 3),
        }

    def __repr__(self) -> str:
        held = "n/a" if self.held_out_recall is None else f"{self.held_out_recall:.4f}"
        return (f"TuningResult({self.params}, family={self.family!r}, predicted_recall="
                f"{self.predicted_recall:.4f}, held_out_recall={held}, predicted_cost="
                f"{self.predicted_cost * 1e6:.1f} us/query, {len(self.pareto)} Pareto points, "
                f"{self.seconds:.2f} s)")
