"""The exit controller of one served model: observations in; a threshold and a shadow rate out.

INTERFACE FIXED (the data plane codes against it).

Why shadow sampling: an edge exit means the cloud never sees the sample, so the edge cannot know
whether its answer agreed with the cloud's. A random share ``p`` of the edge-exited samples is
also sent to the cloud, off the response path; weighted by ``1/p`` they give an unbiased
estimate of the disagreement among exited samples. Offloaded samples are labelled for free
(the cloud answered them, and the edge's best exit had an answer too), so for every candidate
threshold the disagreement it would cause is estimated from offloaded samples (exact) plus
shadowed ones (inverse-probability weighted); see :mod:`edgecloud.control.estimate`.

Thresholds are in the policy's own units: entropy in nats (exit when H < t) or max probability
(exit when p >= t). ``score`` in :class:`Observations` is in the same units.

What is guaranteed, and what is not. With ``act_on="bound"`` the chosen threshold's agreement
on the *current window* is >= the target with probability >= 1 - delta over the shadow draws
(design-based; exact for a constant shadow rate with ``clopper-pearson``, conservative when the
rate varied; with ``anytime`` also when the exits adapted to the draws and simultaneously over
all steps). That the *next* samples behave like the window is an assumption (stationarity over
about one window), not a guarantee. Energy, uplink and latency are point estimates.

Curve memory (``curve_memory`` > ``window``; off by default). The exited part of the agreement
bound then uses the disagreement *rate* on the exit side of each threshold, bounded exactly on the
last ``curve_memory`` samples (several windows of shadows, plus their free offloaded labels) and
applied to the window's own exits. This adds an ASSUMPTION: the window's exits disagree at a rate
no higher than the memory's at the same threshold. A check on the free offloaded labels
(:func:`edgecloud.control.estimate.curve_rose`, post-stratified by score) falls back to the
window's own exact bound when the curve rose. See :func:`edgecloud.control.estimate.memory_count_upper`.

Disagreement profile (``estimator="profile"``; off by default). D(t) is priced from a profile of
P(disagree | score) measured offline on the validation split, over the window's own scores, and
rescaled by a factor bounded on every labelled sample (offloads for free, shadows); see
:mod:`edgecloud.control.profile` for the model it assumes. ``meet_window`` > 0 asks for more:
that a *window of that many samples* meets the target with probability about 1 - delta, so the
acted agreement keeps a sampling margin above the target (any estimator: the binomial at the
target; with the profile, from the per-sample variances it knows). ``shift_alpha`` > 0: while
the window's scores show no shift from the validation scores the profile was measured on (a
chi-square test at that level, :func:`edgecloud.control.profile.score_shift_pvalue`), the scale
``r`` pools the profile's own validation labels with the window's, so an undrifted stream is
priced with thousands of labels, not the window's few hundred. ASSUMPTION added: scores that did
not move come with a curve that did not rise. ``profile_bound="predictive"`` replaces r's bound
plus the sampling margin (each at delta, stacked) by one (1 - delta) quantile of the next
window's share (:func:`edgecloud.control.profile.predictive_upper`). ``shift_factor`` > 1: while
the shift test rejects, the exits are priced that many times above r x profile, a model of a
shift raising the confident part of the curve more than the band r is measured on, calibrated
over a corruption family by :mod:`edgecloud.control.shifts`. ``shifted_bound`` picks r's bound
for the shifted windows apart from the stable ones.

Contract with the data plane: ``shadow_prob`` must be the probability a sample really had of
being labelled by a shadow. A shadow that was drawn but never sent (queue full, send failed)
should be reported ``shadowed=True`` with ``disagree`` NaN (a label failure: re-weighted in the
estimate, counted as a disagreement in the bound); reporting it ``shadowed=False`` makes the
true shadow rate lower than ``shadow_prob`` and biases the disagreement estimate low.

The shadow rate aims at ``shadow_target`` shadowed samples per window (``target / (window x exit
share)`` within ``[shadow_min, shadow_max]``), quantised to ``shadow_min * sqrt(2)^k`` so that a
window holds few distinct rates (the bounds use the smallest rate in the window).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgecloud.control.budgets import Budgets
from edgecloud.control.estimate import (
    Estimates,
    WindowData,
    as_threshold_array,
    candidate_thresholds,
    estimate,
    fixed_sequence,
    mixture_quantile,
    most_conservative,
)
from edgecloud.control.profile import (
    DisagreementProfile,
    profile_estimate,
    sampling_margin,
    score_shift_pvalue,
    validation_evidence,
)
from edgecloud.exits import PolicyKind


@dataclass(frozen=True)
class ControlSettings:
    """How the controller estimates and moves (not what it holds: that is :class:`Budgets`)."""

    window: int = 4000             # samples the estimates look back over (sliding)
    min_samples: int = 200         # no move before the window holds this many samples
    interval_s: float = 1.0        # the daemon calls step() this often (timer) ...
    step_samples: int = 0          # ... and/or after every this many observed samples (0: timer
    # only); a replayed trace uses this so that steps fall at the same samples on every run
    shadow_min: float = 0.01       # shadow rate bounds (share of edge-exited samples)
    shadow_max: float = 0.25
    shadow_target: int = 200       # shadowed samples wanted per window (p adapts to reach it)
    bound: Literal["clopper-pearson", "anytime"] = "clopper-pearson"
    act_on: Literal["bound", "estimate"] = "bound"  # the agreement budget acts on the lower
    # confidence bound (the guarantee) or on the point estimate
    max_step: float | None = None  # largest threshold move per step (policy units); None: jump
    backoff_s: float = 10.0        # how long a cloud saturation report caps offloads
    backoff_factor: float = 0.5    # the cap: this share of the offload share before the report
    seed: int = 0                  # shadow draws
    curve_memory: int = 0          # samples (> window) over which the exits' disagreement RATE
    # per threshold is bounded (clopper-pearson only; 0: off, today's bound). Model-based: see
    # edgecloud.control.estimate.memory_count_upper for the assumption and its check
    estimator: Literal["shadows", "profile"] = "shadows"  # D(t) from the window's labels alone,
    # or from an offline disagreement profile rescaled online (edgecloud.control.profile)
    profile: str = ""              # the profile's JSON file (estimator="profile")
    meet_window: int = 0           # > 0: keep the sampling margin for windows of this many samples
    profile_band: int = 0          # > 0: rescale the profile from shadows and only this many of the
    # most confident offloaded samples (next to the threshold); 0: every labelled sample
    profile_bound: Literal["poisson", "exact", "predictive"] = "poisson"  # r's upper bound:
    # Garwood's Poisson bound, or the exact Poisson-binomial one from the labelled samples' own
    # probabilities; or "predictive": no separate bound on r, the (1 - delta) quantile of a
    # meet_window-sample window's share with r's uncertainty and the sampling scatter in one
    shift_alpha: float = 0.0       # > 0: pool the profile's validation labels into r while the
    # window's scores pass a chi-square test against the validation scores at this level
    shift_factor: float = 1.0      # while that test rejects: the exits' rates are this many times
    # r x profile (a shift may raise the confident part of the curve more than the band where r is
    # measured; `edgecloud control shift-family` measures it over a family of corruptions)
    shifted_bound: Literal["", "poisson", "predictive"] = ""  # r's bound while that test
    # rejects ("": profile_bound). E.g. predictive while the scores match validation (the model
    # holds, r is pooled) and the stacked Poisson bound + margin once they moved


@dataclass
class Observations:
    """One batch of samples as the edge saw them; every array has one row per sample."""

    score: np.ndarray        # float: the controlled exit's score, in policy units
    exited: np.ndarray       # bool: answered at the edge by policy
    shadowed: np.ndarray     # bool: exited AND also sent to the cloud as a shadow sample
    shadow_prob: np.ndarray  # float: P(shadowed) this sample had (exited rows; 1.0 elsewhere)
    disagree: np.ndarray     # float: 1.0 / 0.0 where the cloud's answer is known (offloaded and
    # answered, or shadowed and answered: the edge's best-exit class != the cloud's), NaN else
    compute_j: np.ndarray    # float: edge compute energy
    radio_j: np.ndarray      # float: radio energy actually spent (offload + shadow)
    sent_bytes: np.ndarray   # int: bytes actually sent (offload + shadow)
    latency_s: np.ndarray    # float: latency of the request the sample came in
    time_s: float = field(default_factory=time.monotonic)


@dataclass
class BudgetStatus:
    """One budget at the chosen threshold."""

    name: str                # agreement | energy | uplink | latency
    target: float
    value: float             # the estimate at the current threshold (NaN: no data yet)
    bound: float | None      # agreement: the (1 - delta) lower confidence bound
    met: bool                # the (bound, or estimate) satisfies the target
    reachable: bool          # some threshold would satisfy it (given higher-priority budgets)
    message: str = ""        # why not, in words (for logs, metrics help and the admin API)


@dataclass
class ControlState:
    """What the controller knows and did at its last step (metrics and admin API show this)."""

    threshold: float | None
    shadow_rate: float
    window_samples: int
    window_shadowed: int
    agreement: float          # system agreement with the cloud at ``threshold`` (estimate)
    agreement_lower: float    # its (1 - delta) lower confidence bound
    exit_agreement: float     # agreement among edge-exited samples only (estimate)
    exit_agreement_lower: float
    exit_share: float         # share of samples the edge answers at ``threshold``
    budgets: list[BudgetStatus] = field(default_factory=list)
    backoff: bool = False     # a cloud saturation report caps offloads right now
    steps: int = 0
    time_s: float = 0.0
    score_shift_p: float = math.nan  # shift_alpha: the window's score-shift p-value (NaN: no test)


_COLUMNS = ("score", "exited", "shadowed", "shadow_prob", "disagree", "compute_j", "radio_j",
            "sent_bytes", "latency_s", "time_s")
_DTYPES = {"exited": bool, "shadowed": bool, "sent_bytes": np.int64}
_MEM_COLUMNS = ("score", "exited", "shadowed", "shadow_prob", "disagree")
_RATE_STEP = math.sqrt(2.0)  # shadow rates are quantised to shadow_min * sqrt(2)^k


@dataclass(frozen=True)
class _Scan:
    """Every budget's value at an array of thresholds (one window, one budget set)."""

    est: Estimates
    offload: np.ndarray      # offload share
    shadow_rate: np.ndarray  # the shadow rate the controller would use there
    energy: np.ndarray
    uplink: np.ndarray
    latency: np.ndarray
    compute_j: float

    def value(self, name: str) -> np.ndarray:
        return {"agreement": self.est.agreement, "energy": self.energy,
                "uplink": self.uplink, "latency": self.latency}[name]


class ExitController:
    """Holds a model's :class:`Budgets` by moving one exit's threshold and the shadow rate.

    Thread-safe: the data plane calls :meth:`shadow_mask` and :meth:`observe` from request
    threads and :meth:`step` from a timer thread; the admin API calls :meth:`set_budgets`.

    One step: candidate thresholds are the window's distinct score quantiles (plus the fully
    conservative one, which exits nothing); each budget marks the candidates that meet it
    (agreement: fixed-sequence scan from the fewest exits, see :mod:`edgecloud.control.estimate`;
    energy, uplink, latency: their estimates at that candidate's offload share). Budgets are taken
    in priority order, each narrowing the set; one that no remaining candidate meets is reported
    unreachable (naming the higher-priority budgets it conflicts with) and the set narrows to the
    candidates closest to meeting it. With an agreement budget the controller picks the remaining
    candidate with the most exits (fewest offloads, least energy); with cost budgets only (energy,
    uplink, latency) it picks the one with the most offloads they allow (the best answers the
    budget buys); with no budget it holds the threshold. An agreement budget that even the most
    conservative quantile candidate cannot show sends the exit to "offload everything" and is
    reported met=False, reachable=False: agreement then holds trivially, but the exit is useless.
    """

    def __init__(
        self,
        kind: PolicyKind,
        threshold: float | None,
        budgets: Budgets,
        settings: ControlSettings = ControlSettings(),
        *,
        bytes_per_offload: float,
        radio_j_per_offload: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kind not in ("entropy", "max_prob"):
            raise ValueError(f"unknown exit policy {kind!r}; use 'entropy' or 'max_prob'")
        _check_settings(settings)
        if not bytes_per_offload >= 0 or not radio_j_per_offload >= 0:
            raise ValueError("bytes_per_offload and radio_j_per_offload must be >= 0")
        self._kind: PolicyKind = kind
        self._threshold = None if threshold is None else float(threshold)
        self._budgets = budgets
        self._settings = settings
        self._bytes = float(bytes_per_offload)
        self._radio = float(radio_j_per_offload)
        self._clock = clock
        self._profile = DisagreementProfile.load(settings.profile) if settings.estimator == "profile" else None
        if self._profile is not None and self._profile.kind != kind:
            raise ValueError(f"profile {settings.profile}: made for policy {self._profile.kind!r}, "
                             f"the exit uses {kind!r}")
        self._prior = (validation_evidence(self._profile)
                       if self._profile is not None and settings.shift_alpha > 0 else None)
        self.shift_p = math.nan  # the last scan's score-shift p-value (NaN: no test)
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(settings.seed)
        self._data = {c: np.zeros(0, dtype=_DTYPES.get(c, np.float64)) for c in _COLUMNS}
        self._mem = {c: np.zeros(0, dtype=_DTYPES.get(c, np.float64)) for c in _MEM_COLUMNS}
        self._version = 0
        self._cache: tuple | None = None
        self._shadow = float(self._rates(np.array([1.0]))[0])
        self._backoff_until = -math.inf
        self._offload_cap = 1.0
        self._steps_at_report = -1
        self._looks = 0
        self._steps = 0
        self._state = self._blank_state("no step yet")

    # ---- what the data plane reads -------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """The threshold the exit should use now."""
        with self._lock:
            return self._threshold

    @property
    def budgets(self) -> Budgets:
        with self._lock:
            return self._budgets

    @property
    def settings(self) -> ControlSettings:
        return self._settings

    def shadow_rate(self) -> float:
        """The share of edge-exited samples to shadow now (``shadow_min`` during a backoff)."""
        with self._lock:
            return self._settings.shadow_min if self._in_backoff() else self._shadow

    def shadow_mask(self, exited: np.ndarray) -> tuple[np.ndarray, float]:
        """Which of these samples to shadow (seeded Bernoulli draws at the current rate, only
        where ``exited``), and that rate."""
        exited = np.asarray(exited, dtype=bool)
        with self._lock:
            p = self.shadow_rate()
            draws = self._rng.random(exited.shape[0])
        return (draws < p) & exited, p

    def observe(self, obs: Observations) -> None:
        """Add one batch to the window (call once its shadow answers are in, or have failed)."""
        n = int(np.asarray(obs.score).shape[0])
        rows = {c: np.asarray(getattr(obs, c), dtype=_DTYPES.get(c, np.float64)).reshape(-1)
                for c in _COLUMNS if c != "time_s"}
        bad = [c for c, v in rows.items() if v.shape[0] != n]
        if bad:
            raise ValueError(f"observations: {bad} do not have one row per sample ({n})")
        rows["shadowed"] = rows["shadowed"] & rows["exited"]
        rows["time_s"] = np.full(n, float(obs.time_s))
        keep = self._settings.window
        with self._lock:
            for c in _COLUMNS:
                self._data[c] = np.concatenate([self._data[c], rows[c]])[-keep:]
            if self._settings.curve_memory > keep:
                for c in _MEM_COLUMNS:
                    self._mem[c] = np.concatenate([self._mem[c], rows[c]])[-self._settings.curve_memory:]
            self._version += 1

    # ---- control -------------------------------------------------------------------------
    def step(self) -> ControlState:
        """Re-estimate and choose the threshold and shadow rate; returns the new state."""
        with self._lock:
            now = self._clock()
            backoff = self._in_backoff(now)
            n = self._n()
            self._steps += 1
            if n == 0:
                self._state = self._blank_state("no samples yet", now=now, backoff=backoff)
                return self._state
            self._looks += 1
            grid, scan = self._grid_scan(backoff)
            target, info = self._choose(grid, scan, backoff)
            if self._hold(target, grid, info, backoff):
                target = self._threshold
            new, why = self._move(target, grid, scan, backoff, n)
            self._threshold = new
            final = self._scan(as_threshold_array(new), backoff)
            share = float(final.est.exit_share[0])
            self._shadow = float(self._rates(np.array([share]))[0])
            self._state = ControlState(
                threshold=new,
                shadow_rate=self.shadow_rate(),
                window_samples=n,
                window_shadowed=int(self._data["shadowed"].sum()),
                agreement=float(final.est.agreement[0]),
                agreement_lower=float(final.est.agreement_lower[0]),
                exit_agreement=float(final.est.exit_agreement[0]),
                exit_agreement_lower=float(final.est.exit_agreement_lower[0]),
                exit_share=share,
                budgets=self._statuses(final, info, why),
                backoff=backoff,
                steps=self._steps,
                score_shift_p=self.shift_p,
                time_s=float(now),
            )
            return self._state

    def state(self) -> ControlState:
        """The last step's state (a state with NaN estimates before the first step)."""
        with self._lock:
            return self._state

    def set_budgets(self, budgets: Budgets) -> None:
        """Replace the budgets; the next :meth:`step` acts on them."""
        with self._lock:
            self._budgets = budgets
            self._cache = None

    def on_cloud_saturated(self) -> None:
        """The cloud said RESOURCE_EXHAUSTED (or the breaker opened): cap offloads for
        ``settings.backoff_s`` and shadow at the minimum rate.

        The cap is ``backoff_factor`` x the offload share at the current threshold; it takes
        effect at the next :meth:`step` (which ignores ``max_step`` to meet it). Reports during a
        backoff extend it; they tighten the cap again only once a step has applied it (a burst
        of reports from one overload halves the offloads once, not once per report).
        """
        with self._lock:
            now = self._clock()
            active = self._in_backoff(now)
            if not active or self._steps > self._steps_at_report:
                cap = self._settings.backoff_factor * self._offload_now()
                self._offload_cap = min(self._offload_cap, cap) if active else cap
                self._steps_at_report = self._steps
            self._backoff_until = now + self._settings.backoff_s

    def threshold_for(self, agreement: float) -> float | None:
        """The threshold that meets a per-request agreement target on the current window
        (None: not enough data yet; the caller keeps the model's threshold).

        Same estimates, bound, ``act_on`` and fixed-sequence scan as :meth:`step`; no
        ``max_step``. A target no candidate can show gives the fully conservative threshold.
        Each call is a separate test at level ``delta`` (per-request guarantee, not joint).
        """
        if not 0.0 < agreement <= 1.0:
            raise ValueError(f"agreement must lie in (0, 1], got {agreement}")
        with self._lock:
            if self._n() == 0 or self._n() < self._settings.min_samples:
                return None
            grid, scan = self._grid_scan(self._in_backoff())
            passes = self._acted_agreement(scan.est, agreement)[1:] >= agreement - 1e-12
            j = fixed_sequence(passes)
            return float(grid[1 + j]) if j >= 0 else most_conservative(self._kind)

    # ---- internals: window ---------------------------------------------------------------
    def _n(self) -> int:
        return int(self._data["score"].shape[0])

    def _in_backoff(self, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) < self._backoff_until

    def _window(self) -> WindowData:
        d = self._data
        return WindowData.of(d["score"], d["exited"], d["shadowed"], d["shadow_prob"], d["disagree"])

    def _memory(self) -> WindowData | None:
        """The longer memory for the disagreement curve (None: off, or not longer than the
        window yet)."""
        m = self._mem
        if self._settings.curve_memory <= self._settings.window or m["score"].shape[0] <= self._n():
            return None
        return WindowData.of(m["score"], m["exited"], m["shadowed"], m["shadow_prob"], m["disagree"])

    def _sample_rate(self) -> float:
        """Samples per second over the window's time span (NaN: one batch time only)."""
        t = self._data["time_s"]
        if t.size == 0:
            return math.nan
        span = float(t.max() - t.min())
        if span <= 0:
            return math.nan
        return float((t > t.min()).sum() / span)

    def _offload_now(self) -> float:
        if self._n() == 0:
            return 1.0
        share = estimate(self._window(), self._kind, [self._threshold], bound=None).exit_share[0]
        return float(1.0 - share)

    # ---- internals: estimates ------------------------------------------------------------
    def _rates(self, exit_share: np.ndarray) -> np.ndarray:
        """Shadow rate aiming at ``shadow_target`` shadowed samples per window, quantised to a
        few levels (the bounds are exact for a constant rate, conservative across levels)."""
        s = self._settings
        with np.errstate(divide="ignore", invalid="ignore"):
            ideal = s.shadow_target / (s.window * np.asarray(exit_share, dtype=np.float64))
        ideal = np.clip(np.nan_to_num(ideal, nan=s.shadow_max, posinf=s.shadow_max),
                        s.shadow_min, s.shadow_max)
        k = np.round(np.log(ideal / s.shadow_min) / math.log(_RATE_STEP))
        return np.minimum(s.shadow_min * _RATE_STEP ** k, s.shadow_max)

    def _scan(self, thresholds: np.ndarray, backoff: bool) -> _Scan:
        d = self._data
        if self._profile is not None:
            window = self._window()
            prior = None
            if self._prior is not None:
                self.shift_p = score_shift_pvalue(self._profile, window.score)
                prior = self._prior if self.shift_p >= self._settings.shift_alpha else None
            shifted = self._prior is not None and prior is None
            est = profile_estimate(window, self._kind, thresholds, self._profile,
                                   delta=self._budgets.delta, band=self._settings.profile_band,
                                   exact=self._settings.profile_bound == "exact", prior=prior,
                                   predict=self._predict(shifted),
                                   exit_factor=self._settings.shift_factor if shifted else 1.0)
        else:
            est = estimate(self._window(), self._kind, thresholds, delta=self._budgets.delta,
                           bound=self._settings.bound, looks=max(1, self._looks),
                           memory=self._memory())
        share = est.exit_share
        offload = 1.0 - share
        rate = (np.full(share.shape, self._settings.shadow_min) if backoff
                else self._rates(share))
        sent_share = offload + rate * share
        compute = float(d["compute_j"].mean())
        lat = d["latency_s"]
        return _Scan(
            est=est, offload=offload, shadow_rate=rate,
            energy=compute + sent_share * self._radio,
            uplink=self._sample_rate() * sent_share * self._bytes,
            latency=mixture_quantile(lat[d["exited"]], lat[~d["exited"]], offload),
            compute_j=compute,
        )

    def _predict(self, shifted: bool = False) -> int:
        """The window size the profile's bound predicts (0: a bound on r, margin apart);
        ``shifted``: the score-shift test rejects, so ``shifted_bound`` applies when set."""
        s = self._settings
        bound = s.shifted_bound if shifted and s.shifted_bound else s.profile_bound
        return s.meet_window if bound == "predictive" else 0

    def _grid_scan(self, backoff: bool) -> tuple[np.ndarray, _Scan]:
        key = (self._version, self._budgets, self._looks, backoff)
        if self._cache is None or self._cache[0] != key:
            grid = candidate_thresholds(self._kind, self._data["score"])
            self._cache = (key, grid, self._scan(grid, backoff))
        return self._cache[1], self._cache[2]

    def _acted_agreement(self, est: Estimates, target: float | None = None) -> np.ndarray:
        """What the agreement budget compares with its target: the bound or the estimate, less
        the sampling margin of ``meet_window`` (at ``target``, default the budget's)."""
        acted = est.agreement_lower if self._settings.act_on == "bound" else est.agreement
        if self._settings.meet_window > 0 and not (est.predictive and self._settings.act_on == "bound"):
            target = self._budgets.agreement if target is None else target
            acted = acted - sampling_margin(float(target or 1.0), self._settings.meet_window,
                                            self._budgets.delta, est.sample_var)
        return acted

    # ---- internals: choosing -------------------------------------------------------------
    def _meets(self, name: str, scan: _Scan) -> np.ndarray:
        """Candidates meeting one budget (unknown values do not constrain)."""
        target = self._budgets.target(name)
        if name == "agreement":
            ok = np.zeros(scan.offload.shape, dtype=bool)
            passes = self._acted_agreement(scan.est)[1:] >= target - 1e-12
            ok[1:2 + fixed_sequence(passes)] = True   # never index 0: exiting nothing
            return ok
        values = scan.value(name)
        return np.isnan(values) | (values <= target)

    def _closest(self, name: str, scan: _Scan, feasible: np.ndarray) -> np.ndarray:
        """The feasible candidates that come closest to an unreachable budget."""
        out = np.zeros(feasible.shape, dtype=bool)
        if name == "agreement":
            out[np.flatnonzero(feasible)[0]] = True        # the most conservative
            return out
        values = np.where(np.isnan(scan.value(name)), np.inf, scan.value(name))
        best = values[feasible].min()
        return feasible & (values <= best * (1 + 1e-12) + 1e-300)

    def _nowhere(self, name: str, scan: _Scan) -> str:
        b, target = self._budgets, self._budgets.target(name)
        if name == "agreement":
            if scan.offload.shape[0] < 2:
                return "agreement: no candidate threshold yet; offloading everything"
            which = "lower bound" if self._settings.act_on == "bound" else "estimate"
            value = float(self._acted_agreement(scan.est)[1])
            return (f"agreement >= {target:g} cannot be shown even at the most conservative "
                    f"candidate threshold (exit share {scan.est.exit_share[1]:.1%}, {which} "
                    f"{value:.4f} at confidence {1 - b.delta:g}); offloading everything")
        lowest = float(np.nanmin(scan.value(name)))
        unit = {"energy": "J", "uplink": "B/s", "latency": "s"}[name]
        extra = (f" (edge compute alone: {scan.compute_j:.4g} J; shadow sends count as offloads)"
                 if name == "energy" else "")
        return (f"{name} <= {target:.4g} {unit} is unreachable: the lowest any threshold gives "
                f"is {lowest:.4g} {unit}{extra}")

    def _choose(self, grid: np.ndarray, scan: _Scan, backoff: bool) -> tuple[float | None, dict]:
        """The target threshold and, per budget, (reachable, message)."""
        feasible = np.ones(grid.shape, dtype=bool)
        cuts: list[str] = []
        if backoff:
            capped = scan.offload <= self._offload_cap + 1e-12
            if capped.any() and not capped.all():
                feasible, cuts = capped, ["the cloud-saturation backoff"]
        info: dict[str, tuple[bool, str]] = {}
        active = self._budgets.active
        for name in active:
            ok = self._meets(name, scan)
            if (feasible & ok).any():
                info[name] = (True, "")
                narrowed = feasible & ok
            else:
                msg = (self._nowhere(name, scan) if not ok.any() else
                       f"{name} cannot be met together with higher-priority {', '.join(cuts)}")
                info[name] = (False, msg)
                narrowed = self._closest(name, scan, feasible)
            if (feasible & ~narrowed).any():
                cuts.append(name)
            feasible = narrowed
        idx = np.flatnonzero(feasible)
        if not active:
            if backoff and self._offload_now() > self._offload_cap + 1e-12:
                return float(grid[idx[0]]), info         # least change that meets the cap
            return self._threshold, info
        pick = idx[-1] if "agreement" in active else idx[0]
        return float(grid[pick]), info

    def _hold(self, target: float | None, grid: np.ndarray, info: dict, backoff: bool) -> bool:
        """Keep the current threshold when the target is at most one candidate cell (1/G of the
        window) more liberal and the current one still meets every budget: the grid
        slides with the window, and without this dead band the threshold would twitch every
        step. Never holds a threshold with more exits than the target (the agreement side), nor
        while a budget is unreachable."""
        current = self._threshold
        if backoff or target is None or current is None or current == target:
            return False
        counts = estimate(self._window(), self._kind, [current, target], bound=None).exits
        cell = self._n() / max(1, grid.shape[0] - 1)
        if not 0 <= counts[1] - counts[0] <= cell:
            return False
        here = self._scan(as_threshold_array(current), backoff)
        for name, (reachable, _) in info.items():
            if not reachable:   # an unreachable budget gets as close as the grid allows
                return False
            if name == "agreement":
                if not self._acted_agreement(here.est)[0] >= self._budgets.agreement - 1e-12:
                    return False
            elif not self._meets(name, here)[0]:
                return False
        return True

    def _numeric(self, threshold: float | None, grid: np.ndarray) -> float:
        """A finite stand-in for ``None`` (exit everything) so that ``max_step`` can apply."""
        if threshold is not None:
            return threshold
        return float(grid[-1]) if self._kind == "entropy" else 0.0

    def _move(self, target: float | None, grid: np.ndarray, scan: _Scan, backoff: bool,
              n: int) -> tuple[float | None, str]:
        """Apply ``min_samples`` and ``max_step``; returns the new threshold and why it is not
        the target (or "")."""
        s, current = self._settings, self._threshold
        if target == current:
            return current, ""
        if n < s.min_samples:
            return current, f"waiting for {s.min_samples} samples (window has {n})"
        urgent = backoff and self._offload_now() > self._offload_cap + 1e-12
        if s.max_step is None or urgent or target is None:
            return target, ""
        cur = self._numeric(current, grid)
        new = min(max(target, cur - s.max_step), cur + s.max_step)
        new = max(new, 0.0) if self._kind == "entropy" else min(max(new, 0.0), 1.0)
        return float(new), ("" if new == target else "moving towards it (max_step)")

    def _statuses(self, final: _Scan, info: dict, why: str) -> list[BudgetStatus]:
        out = []
        for name in self._budgets.active:
            target = float(self._budgets.target(name))
            reachable, msg = info.get(name, (True, ""))
            value = float(final.value(name)[0])
            bound = None
            if name == "agreement":
                bound = float(final.est.agreement_lower[0])
                acted = float(self._acted_agreement(final.est)[0])
                met = reachable and acted >= target - 1e-12
            else:
                met = bool(value <= target)
            if not msg and not met:
                msg = why or ("no data yet" if math.isnan(value) else
                              "not met at the current threshold")
            out.append(BudgetStatus(name, target, value, bound, bool(met), bool(reachable), msg))
        return out

    def _blank_state(self, why: str, now: float | None = None, backoff: bool = False) -> ControlState:
        nan = math.nan
        statuses = [BudgetStatus(name, float(self._budgets.target(name)), nan,
                                 nan if name == "agreement" else None, False, True, why)
                    for name in self._budgets.active]
        return ControlState(
            threshold=self._threshold, shadow_rate=self.shadow_rate(), window_samples=self._n(),
            window_shadowed=int(self._data["shadowed"].sum()), agreement=nan,
            agreement_lower=nan, exit_agreement=nan, exit_agreement_lower=nan, exit_share=nan,
            budgets=statuses, backoff=backoff, steps=self._steps,
            time_s=float(self._clock() if now is None else now),
        )


def _check_settings(s: ControlSettings) -> None:
    """Reject settings the controller cannot honour (at construction, not mid-stream)."""
    if s.window < 1 or s.min_samples < 0:
        raise ValueError("window must be >= 1 and min_samples >= 0")
    if not 0.0 < s.shadow_min <= s.shadow_max <= 1.0:
        raise ValueError(f"need 0 < shadow_min <= shadow_max <= 1, got {s.shadow_min}, {s.shadow_max}")
    if s.shadow_target < 0:
        raise ValueError("shadow_target must be >= 0")
    if s.bound not in ("clopper-pearson", "anytime"):
        raise ValueError(f"unknown bound {s.bound!r}; use 'clopper-pearson' or 'anytime'")
    if s.act_on not in ("bound", "estimate"):
        raise ValueError(f"unknown act_on {s.act_on!r}; use 'bound' or 'estimate'")
    if s.max_step is not None and not s.max_step > 0:
        raise ValueError("max_step must be > 0 (or None)")
    if s.curve_memory < 0:
        raise ValueError("curve_memory must be >= 0 (0: off)")
    if s.curve_memory and s.bound != "clopper-pearson":
        raise ValueError("curve_memory works with bound='clopper-pearson' only")
    if s.estimator not in ("shadows", "profile"):
        raise ValueError(f"unknown estimator {s.estimator!r}; use 'shadows' or 'profile'")
    if s.estimator == "profile" and not s.profile:
        raise ValueError("estimator 'profile' needs profile: the JSON file of `edgecloud control profile`")
    if s.estimator == "profile" and s.curve_memory:
        raise ValueError("curve_memory works with estimator='shadows' only")
    if s.profile_band < 0:
        raise ValueError("profile_band must be >= 0 (0: every labelled sample)")
    if s.profile_bound not in ("poisson", "exact", "predictive"):
        raise ValueError(f"unknown profile_bound {s.profile_bound!r}; use 'poisson', 'exact' or "
                         "'predictive'")
    if s.profile_bound == "predictive" and s.meet_window <= 0:
        raise ValueError("profile_bound 'predictive' needs meet_window > 0: the window it predicts")
    if s.meet_window < 0:
        raise ValueError("meet_window must be >= 0 (0: no sampling margin)")
    if not 0.0 <= s.shift_alpha < 1.0:
        raise ValueError(f"shift_alpha must lie in [0, 1) (0: off), got {s.shift_alpha}")
    if s.shift_alpha and (s.estimator != "profile" or s.profile_bound == "exact"):
        raise ValueError("shift_alpha works with estimator='profile' and profile_bound 'poisson' "
                         "or 'predictive' only")
    if not s.shift_factor >= 1.0:
        raise ValueError(f"shift_factor must be >= 1 (1: off), got {s.shift_factor}")
    if s.shift_factor != 1.0 and not s.shift_alpha:
        raise ValueError("shift_factor needs shift_alpha > 0: the test that says when scores moved")
    if s.shifted_bound not in ("", "poisson", "predictive"):
        raise ValueError(f"unknown shifted_bound {s.shifted_bound!r}; use 'poisson' or 'predictive' "
                         "('': profile_bound)")
    if s.shifted_bound and not s.shift_alpha:
        raise ValueError("shifted_bound needs shift_alpha > 0: the test that says when scores moved")
    if s.shifted_bound == "predictive" and s.meet_window <= 0:
        raise ValueError("shifted_bound 'predictive' needs meet_window > 0: the window it predicts")
    if not 0.0 <= s.backoff_factor <= 1.0 or s.backoff_s < 0:
        raise ValueError("backoff_factor must lie in [0, 1] and backoff_s be >= 0")


def from_config(config: Any, key: str = "control") -> tuple[Budgets, ControlSettings]:
    """The budgets and settings of an ``edge.control.<model>`` entry
    (:class:`edgecloud.config.ControlConfig`); ValueError naming ``key`` when the budgets are
    invalid. Shared by the daemon and the offline replay, so both read a config the same way."""
    try:
        budgets = Budgets(
            agreement=config.agreement, delta=config.delta, energy_j=config.energy_j,
            uplink_bytes_s=config.uplink_bytes_s,
            p99_latency_s=None if config.p99_latency_ms is None else config.p99_latency_ms / 1000.0,
            priority=tuple(config.priority),
        )
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from exc
    settings = ControlSettings(
        window=config.window, min_samples=config.min_samples, interval_s=config.interval_s,
        step_samples=config.step_samples, shadow_min=config.shadow_min,
        shadow_max=config.shadow_max, shadow_target=config.shadow_target, bound=config.bound,
        act_on=config.act_on, max_step=config.max_step, backoff_s=config.backoff_s,
        backoff_factor=config.backoff_factor, seed=config.seed,
        curve_memory=getattr(config, "curve_memory", 0),
        estimator=getattr(config, "estimator", "shadows"), profile=getattr(config, "profile", "") or "",
        meet_window=getattr(config, "meet_window", 0), profile_band=getattr(config, "profile_band", 0),
        profile_bound=getattr(config, "profile_bound", "poisson"),
        shift_alpha=getattr(config, "shift_alpha", 0.0),
        shift_factor=getattr(config, "shift_factor", 1.0),
        shifted_bound=getattr(config, "shifted_bound", "") or "",
    )
    return budgets, settings


__all__ = ["BudgetStatus", "ControlSettings", "ControlState", "ExitController", "Observations", "from_config"]
