"""A circuit breaker for the edge->cloud link.

Why: when the cloud is down every offload would wait for a connection attempt or a deadline
before the edge answers degraded anyway. After ``failures`` consecutive failures the breaker
opens and calls fail at once; after ``reset_s`` one probe call is let through (half-open); its
success closes the breaker, its failure opens it again for another ``reset_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Value of the edgecloud_circuit_breaker_open gauge per state.
GAUGE_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 0.5, BreakerState.OPEN: 1.0}


class CircuitBreaker:
    """Thread-safe consecutive-failure breaker with a single half-open probe."""

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError("breaker failures must be >= 1")
        if reset_s <= 0:
            raise ValueError("breaker reset time must be > 0")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_s:
                return BreakerState.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May a call go out now? In half-open state only the first caller gets ``True``."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock() - self._opened_at < self.reset_s:
                    return False
                self._set(BreakerState.HALF_OPEN)
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._probe_in_flight = False
            if self._state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            was_probe = self._state is BreakerState.HALF_OPEN
            self._probe_in_flight = False
            if was_probe or self._consecutive >= self.failures:
                self._opened_at = self._clock()
                if self._state is not BreakerState.OPEN:
                    self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
