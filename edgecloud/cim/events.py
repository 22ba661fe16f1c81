"""Per-sample event counts for one batch.

Layers never compute joules: they record *events* (MACs by precision, ADC conversions, cell
reads, radio bits, ...) against the samples that caused them. :mod:`edgecloud.cim.energy` turns
counts into joules with a table of constants. A context variable holds the log of the batch
being run, so layers deep in a model can record without it being threaded through ``forward``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch

EventKey = tuple[str, str]  # (component, event), e.g. ("digital", "mac_binary")


class EventLog:
    """Event counts, one float64 vector of length ``batch_size`` per (component, event)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.counts: dict[EventKey, np.ndarray] = {}
        self._index: np.ndarray | None = None  # the rows of the batch currently running

    def add(self, component: str, event: str, per_sample: float | np.ndarray | torch.Tensor) -> None:
        """Add counts for the rows currently running (all rows unless inside :meth:`subset`)."""
        key = (component, event)
        vec = self.counts.get(key)
        if vec is None:
            vec = self.counts[key] = np.zeros(self.batch_size, dtype=np.float64)
        if isinstance(per_sample, torch.Tensor):
            per_sample = per_sample.detach().cpu().double().numpy()
        if self._index is None:
            vec += per_sample
        else:
            vec[self._index] += per_sample

    @contextlib.contextmanager
    def subset(self, index: np.ndarray | torch.Tensor) -> Iterator[None]:
        """Attribute events inside the block to rows ``index`` of the current selection."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        index = np.asarray(index, dtype=np.int64)
        previous = self._index
        self._index = index if previous is None else previous[index]
        try:
            yield
        finally:
            self._index = previous

    def total(self) -> dict[EventKey, float]:
        return {k: float(v.sum()) for k, v in self.counts.items()}

    def select(self, index: np.ndarray) -> "EventLog":
        """A log restricted to some rows (e.g. the samples of one request)."""
        out = EventLog(len(index))
        out.counts = {k: v[index].copy() for k, v in self.counts.items()}
        return out


_current: contextvars.ContextVar[EventLog | None] = contextvars.ContextVar("edgecloud_event_log", default=None)


def current_log() -> EventLog | None:
    """The log of the batch being run, or ``None`` outside :func:`recording`."""
    return _current.get()


@contextlib.contextmanager
def recording(log: EventLog) -> Iterator[EventLog]:
    token = _current.set(log)
    try:
        yield log
    finally:
        _current.reset(token)


def record(component: str, event: str, per_sample: float | np.ndarray | torch.Tensor) -> None:
    """Record events if a log is active; a no-op otherwise (training, export)."""
    log = _current.get()
    if log is not None:
        log.add(component, event, per_sample)
