"""What a user asks the exit controller to hold (config, admin API, CLI all build one of these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

BUDGET_NAMES = ("agreement", "energy", "uplink", "latency")


@dataclass(frozen=True)
class Budgets:
    """Budgets of one served model; ``None`` = not constrained.

    ``agreement``: the share of answers that equal the cloud's answer must be >= this (1 - eps),
    with confidence ``1 - delta``. ``energy_j``: mean energy per inference (edge compute + radio,
    shadow traffic included) <= this. ``uplink_bytes_s``: bytes/s sent to the cloud (shadow
    included) <= this. ``p99_latency_s``: the 99th percentile of request latency <= this.
    ``priority``: which budget wins when they cannot all be met (first wins); every budget that
    is not met is reported as violated, never silently dropped.
    """

    agreement: float | None = None
    delta: float = 0.05
    energy_j: float | None = None
    uplink_bytes_s: float | None = None
    p99_latency_s: float | None = None
    priority: tuple[str, ...] = field(default=BUDGET_NAMES)

    def __post_init__(self) -> None:
        if self.agreement is not None and not 0.0 < self.agreement <= 1.0:
            raise ValueError(f"agreement budget must lie in (0, 1], got {self.agreement}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        for name in ("energy_j", "uplink_bytes_s", "p99_latency_s"):
            value = getattr(self, name)
            if value is not None and not value > 0.0:
                raise ValueError(f"{name} budget must be > 0, got {value}")
        unknown = [p for p in self.priority if p not in BUDGET_NAMES]
        if unknown or len(set(self.priority)) != len(self.priority):
            raise ValueError(f"priority must be an ordering of {BUDGET_NAMES}, got {self.priority}")
        missing = [p for p in BUDGET_NAMES if p not in self.priority]
        object.__setattr__(self, "priority", tuple(self.priority) + tuple(missing))

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the budgets that are set, in priority order."""
        values = {"agreement": self.agreement, "energy": self.energy_j,
                  "uplink": self.uplink_bytes_s, "latency": self.p99_latency_s}
        return tuple(p for p in self.priority if values[p] is not None)

    def target(self, name: str) -> float | None:
        return {"agreement": self.agreement, "energy": self.energy_j,
                "uplink": self.uplink_bytes_s, "latency": self.p99_latency_s}[name]

    def updated(self, **changes: Any) -> "Budgets":
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["priority"] = list(self.priority)
        return out
