"""ExitController: holds budgets on synthetic streams, reports what it cannot hold, obeys its knobs.

The stream: batches of 100 samples, scores uniform on [0, 2] nats (entropy policy; the max_prob
variant maps them to 1 - s/2), disagreement with the cloud with probability
``level * (s / 2)^2``. The harness plays the data plane: exits by the controller's threshold,
shadows with ``shadow_mask``, reports the labels the data plane would know, steps once per batch.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgecloud.control.budgets import Budgets
from edgecloud.control.controller import ControlSettings, ExitController, Observations
from edgecloud.control.estimate import exits_at

COMPUTE_J = 5.5e-6
RADIO_J = 0.02
BYTES = 8192
BATCH = 100


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Stream:
    """A seeded synthetic stream driven through one controller."""

    def __init__(self, controller: ExitController, kind: str = "entropy", seed: int = 1,
                 offload_latency: float = 0.05) -> None:
        self.c, self.kind = controller, kind
        self.rng = np.random.default_rng(seed)
        self.offload_latency = offload_latency
        self.i = 0
        self.answered_disagree: list[np.ndarray] = []   # truth: per sample, the answer disagrees

    def score_of(self, s: np.ndarray) -> np.ndarray:
        return s if self.kind == "entropy" else 1.0 - s / 2.0

    def batch(self, level: float, step: bool = True):
        s = self.rng.uniform(0.0, 2.0, BATCH)
        d = (self.rng.random(BATCH) < level * (s / 2.0) ** 2).astype(float)
        score = self.score_of(s)
        ex = exits_at(self.kind, score, self.c.threshold)
        sh, p = self.c.shadow_mask(ex)
        self.c.observe(Observations(
            score=score, exited=ex, shadowed=sh, shadow_prob=np.where(ex, p, 1.0),
            disagree=np.where(~ex | sh, d, np.nan), compute_j=np.full(BATCH, COMPUTE_J),
            radio_j=np.where(~ex | sh, RADIO_J, 0.0), sent_bytes=np.where(~ex | sh, BYTES, 0),
            latency_s=np.where(ex, 0.002, self.offload_latency), time_s=0.1 * self.i))
        self.answered_disagree.append(d * ex)
        self.i += 1
        return self.c.step() if step else None

    def run(self, levels):
        return [self.batch(level) for level in levels]


def controller(budgets: Budgets, kind: str = "entropy", threshold: float | None = 1.0,
               clock=None, **settings) -> ExitController:
    base = dict(window=2000, min_samples=200, shadow_target=200, seed=3)
    base.update(settings)
    if threshold is not None and kind == "max_prob":
        threshold = 1.0 - threshold / 2.0
    return ExitController(kind, threshold, budgets, ControlSettings(**base),
                          bytes_per_offload=BYTES, radio_j_per_offload=RADIO_J,
                          **({} if clock is None else {"clock": clock}))


def status(state, name):
    return next(b for b in state.budgets if b.name == name)


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_threshold_tightens_when_disagreement_rises_and_relaxes_when_it_falls(kind):
    c = controller(Budgets(agreement=0.97, delta=0.1), kind)
    states = Stream(c, kind).run([0.1] * 40 + [0.8] * 40 + [0.1] * 40)
    share = np.array([s.exit_share for s in states])
    before, during, after = share[25:40].mean(), share[65:80].mean(), share[105:120].mean()
    assert during < before - 0.15, (before, during, after)
    assert after > during + 0.15, (before, during, after)
    # in policy units: entropy thresholds fall when tightening, max_prob thresholds rise
    t = np.array([s.threshold for s in states])
    sign = 1.0 if kind == "entropy" else -1.0
    assert sign * (t[65:80].mean() - t[25:40].mean()) < 0
    assert sign * (t[105:120].mean() - t[65:80].mean()) > 0


def test_meets_a_reachable_agreement_budget():
    c = controller(Budgets(agreement=0.97, delta=0.1))
    stream = Stream(c, seed=5)
    states = stream.run([0.25] * 120)
    truth = np.concatenate(stream.answered_disagree[-60:])      # the last 6000 answers
    assert 1.0 - truth.mean() >= 0.97
    last = states[-1]
    st = status(last, "agreement")
    assert st.met and st.reachable and st.bound >= 0.97 and st.message == ""
    assert last.exit_share > 0.4        # and it does not get there by offloading everything
    assert last.agreement_lower <= last.agreement <= 1.0
    assert last.exit_agreement_lower <= last.exit_agreement


def test_unreachable_agreement_is_reported_and_offloads_everything():
    c = controller(Budgets(agreement=0.999, delta=0.05))
    last = Stream(c).run([0.3] * 30)[-1]
    st = status(last, "agreement")
    assert not st.met and not st.reachable
    assert "offloading everything" in st.message
    assert last.threshold == 0.0 and last.exit_share == 0.0


def test_energy_below_compute_only_is_unreachable():
    c = controller(Budgets(energy_j=COMPUTE_J / 2))
    last = Stream(c).run([0.3] * 10)[-1]
    st = status(last, "energy")
    assert not st.met and not st.reachable
    assert "unreachable" in st.message and "compute" in st.message
    assert last.exit_share == pytest.approx(1.0)    # as close as it gets: answer everything


def test_conflicting_budgets_follow_priority():
    # energy allowing ~20 % sends (shadows included) conflicts with agreement 0.99 here
    energy = COMPUTE_J + 0.2 * RADIO_J
    first = controller(Budgets(agreement=0.99, delta=0.1, energy_j=energy))
    last = Stream(first).run([0.3] * 40)[-1]
    ag, en = status(last, "agreement"), status(last, "energy")
    assert ag.met and ag.reachable
    assert not en.met and not en.reachable and "agreement" in en.message
    flipped = controller(Budgets(agreement=0.99, delta=0.1, energy_j=energy,
                                 priority=("energy", "agreement")))
    last = Stream(flipped).run([0.3] * 40)[-1]
    ag, en = status(last, "agreement"), status(last, "energy")
    assert en.met and en.reachable and en.value <= energy
    assert not ag.met and not ag.reachable and "energy" in ag.message


def test_cost_budgets_alone_buy_as_many_offloads_as_they_allow():
    energy = COMPUTE_J + 0.3 * RADIO_J
    c = controller(Budgets(energy_j=energy))
    last = Stream(c).run([0.3] * 30)[-1]
    en = status(last, "energy")
    assert en.met and en.value <= energy
    assert 0.6 < last.exit_share < 0.8     # sends close to the 30 % the budget pays for


def test_uplink_and_latency_budgets_bound_the_offload_share():
    # 1000 samples/s; uplink for <= ~20 % sends; the p99 of latency must stay on the edge side
    c = controller(Budgets(uplink_bytes_s=0.2 * 1000 * BYTES, p99_latency_s=0.01))
    last = Stream(c).run([0.3] * 30)[-1]
    up, lat = status(last, "uplink"), status(last, "latency")
    assert up.met and up.value <= 0.2 * 1000 * BYTES
    assert lat.met and lat.value <= 0.01
    assert last.exit_share > 0.99 - 1e-9     # p99 at the edge: at most 1 % sent


def test_set_budgets_takes_effect_at_the_next_step():
    c = controller(Budgets(agreement=0.95, delta=0.1))
    stream = Stream(c)
    stream.run([0.3] * 30)
    before = c.threshold
    c.set_budgets(Budgets(agreement=0.99, delta=0.1))
    assert c.threshold == before and c.budgets.agreement == 0.99
    assert status(c.state(), "agreement").target == 0.95     # the last step's view
    state = c.step()
    assert status(state, "agreement").target == 0.99
    assert state.threshold < before


def test_backoff_caps_offloads_for_backoff_s():
    clock = Clock()
    c = controller(Budgets(agreement=0.985, delta=0.1), clock=clock, backoff_s=10.0,
                   backoff_factor=0.5, shadow_min=0.02)
    stream = Stream(c)
    stream.run([0.3] * 30)
    offload = 1.0 - c.state().exit_share
    assert offload > 0.2
    clock.t = 100.0
    c.on_cloud_saturated()
    assert c.shadow_rate() == 0.02
    assert c.shadow_mask(np.ones(50, dtype=bool))[1] == 0.02
    state = c.step()
    assert state.backoff and 1.0 - state.exit_share <= 0.5 * offload + 1e-9
    clock.t = 105.0
    state = stream.batch(0.3)
    assert state.backoff and 1.0 - state.exit_share <= 0.5 * offload + 0.02
    assert status(state, "agreement").message     # the cap's conflict is named, not hidden
    clock.t = 111.0
    state = stream.batch(0.3)
    assert not state.backoff and c.shadow_rate() > 0.02
    assert 1.0 - state.exit_share > 0.5 * offload + 0.02


def test_shadow_mask_is_seeded_and_only_where_exited():
    exited = np.random.default_rng(0).random(5000) < 0.7
    a = controller(Budgets(), seed=7)
    b = controller(Budgets(), seed=7)
    other = controller(Budgets(), seed=8)
    ma, pa = a.shadow_mask(exited)
    mb, pb = b.shadow_mask(exited)
    mo, _ = other.shadow_mask(exited)
    assert pa == pb and np.array_equal(ma, mb) and not np.array_equal(ma, mo)
    assert not (ma & ~exited).any()
    assert ma.sum() / exited.sum() == pytest.approx(pa, rel=0.15)


def test_shadow_rate_adapts_to_the_target_within_bounds():
    c = controller(Budgets(agreement=0.95, delta=0.1), shadow_min=0.01, shadow_max=0.25)
    stream = Stream(c)
    states = stream.run([0.3] * 40)
    share = states[-1].exit_share
    assert 0.01 <= states[-1].shadow_rate <= 0.25
    ideal = 200 / (2000 * share)
    assert ideal / 1.5 <= states[-1].shadow_rate <= ideal * 1.5


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_max_step_and_min_samples_are_honoured(kind):
    c = controller(Budgets(agreement=0.97, delta=0.1), kind, max_step=0.05, min_samples=500)
    stream = Stream(c, kind)
    start = c.threshold
    states = stream.run([0.1] * 30 + [0.6] * 30)
    for s in states[:4]:                      # 100..400 samples < min_samples
        assert s.threshold == start
        assert "waiting" in status(s, "agreement").message
    thresholds = np.array([start] + [s.threshold for s in states])
    assert np.all(np.abs(np.diff(thresholds)) <= 0.05 + 1e-12)
    assert np.any(np.abs(np.diff(thresholds)) > 0.04)    # it does move, in small steps


def test_threshold_for_a_per_request_target():
    c = controller(Budgets(agreement=0.95, delta=0.1))
    assert c.threshold_for(0.97) is None                   # no data yet
    stream = Stream(c)
    stream.run([0.3] * 30)
    loose, strict = c.threshold_for(0.9), c.threshold_for(0.98)
    assert loose is not None and strict is not None and strict < loose
    assert c.threshold_for(0.9999) == 0.0                  # nothing can show it: offload all
    with pytest.raises(ValueError):
        c.threshold_for(1.5)


def test_state_before_any_step_and_window_is_sliding():
    c = controller(Budgets(agreement=0.95), window=300)
    s = c.state()
    assert np.isnan(s.agreement) and np.isnan(s.exit_share) and s.steps == 0
    assert s.threshold == 1.0 and s.budgets[0].name == "agreement" and not s.budgets[0].met
    stream = Stream(c)
    for _ in range(5):
        stream.batch(0.3, step=False)
    state = c.step()
    assert state.window_samples == 300 and state.steps == 1
    assert np.isfinite(state.agreement) and np.isfinite(state.exit_share)


def test_no_budgets_hold_the_threshold():
    c = controller(Budgets())
    states = Stream(c).run([0.3] * 10)
    assert all(s.threshold == 1.0 for s in states)


def test_anytime_bound_controller_runs_and_is_more_conservative():
    cp = controller(Budgets(agreement=0.97, delta=0.1))
    anytime = controller(Budgets(agreement=0.97, delta=0.1), bound="anytime")
    a = Stream(cp).run([0.25] * 40)[-1]
    b = Stream(anytime).run([0.25] * 40)[-1]
    assert status(b, "agreement").reachable
    assert b.exit_share < a.exit_share


def test_concurrent_use_is_safe():
    c = controller(Budgets(agreement=0.97, delta=0.1))
    errors: list[BaseException] = []

    def feed(seed: int) -> None:
        try:
            stream = Stream(c, seed=seed)
            for _ in range(15):
                stream.batch(0.3, step=False)
                c.threshold_for(0.95)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def stepper() -> None:
        try:
            for _ in range(30):
                c.step()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=stepper))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert c.step().window_samples == 2000      # 4,500 observed, the window keeps the last 2,000


def test_curve_memory_holds_a_stable_stream_and_backs_off_when_the_curve_rises():
    budgets = Budgets(agreement=0.97, delta=0.1)
    mem = controller(budgets, seed=5, curve_memory=8000)
    b = Stream(mem, seed=7).run([0.25] * 100)
    assert status(b[-1], "agreement").met
    assert 0.3 < b[-1].exit_share < 1.0
    # the curve triples: the check sees it in the offloaded labels, the exits shrink
    stream = Stream(mem, seed=8)
    after = stream.run([0.75] * 30)
    assert after[-1].exit_share < b[-1].exit_share
    assert after[-1].agreement >= 0.97


def test_curve_memory_is_validated_and_off_by_default():
    assert ControlSettings().curve_memory == 0
    with pytest.raises(ValueError, match="curve_memory"):
        controller(Budgets(agreement=0.97), curve_memory=-1)
    with pytest.raises(ValueError, match="curve_memory"):
        controller(Budgets(agreement=0.97), curve_memory=8000, bound="anytime")
