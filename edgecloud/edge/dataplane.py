"""The edge daemon's data plane: what happens to a validated request, whatever protocol it came in.

The OIP servicer (:mod:`edgecloud.edge.servicer`) is a thin protocol adapter over this object, as
MLServer's servicers sit over its ``DataPlane``: it validates and decodes a request into pixels and
:class:`RequestLimits`, calls :meth:`EdgeDataPlane.infer`, and encodes the :class:`InferOutcome`.

One request: micro-batch the edge part across concurrent requests -> offload the undecided
samples through the cloud client -> answer. Every failure on the cloud side turns into a degraded
local answer (the best edge exit, marked), never into an error.

Online exit control (``edge.control``): a controlled model has one
:class:`~edgecloud.control.controller.ExitController` that moves one exit's threshold to hold the
model's budgets. What the data plane does for it:

* **shadow sampling**: a share ``p`` of the edge-exited samples (drawn by
  ``ExitController.shadow_mask``) is also sent to the cloud, OFF the response path: a small
  background worker with a bounded queue (:class:`ShadowQueue`). A full queue drops the shadow
  batch and counts it (``edgecloud_shadow_dropped_total``); a user request is never delayed or
  failed by it. An exited sample has no cloud input (route() produced none), so the worker
  recomputes it (:meth:`EdgeRunner.offload_for`, route() with exits that never answer).
* **energy of shadows**: the radio energy of a shadow send is real and counted (energy component
  ``shadow_radio``, bytes in ``edgecloud_shadow_bytes_total`` — and in
  ``edgecloud_offload_bytes_total``, which counts every byte sent to the cloud). The recompute's
  compute energy is NOT counted: it is a simulator artefact — a device keeps the activations of
  the pass that exited and sends them; the simulated runner cannot hand them over, so it runs the
  edge part again. (Exact for exits at the split point, as in every packaged hybrid bundle, and
  for raw-input offloads such as MEANet's; for an exit placed before the split, the blocks between
  exit and split would be real work on a device and are not counted either.)
* **observations**: once a request's shadow answers are back (or failed, or dropped) the batch
  becomes one :class:`~edgecloud.control.controller.Observations` for ``controller.observe()``,
  delivered by the same worker in request order (only when its queue is full does the request
  thread observe, and then without shadows).
  Offloaded samples the cloud answered carry their disagreement (the edge's best-exit class vs the
  cloud's class) for free; shadowed samples carry theirs once the shadow answer is in. ``score`` is
  the score of the probabilities the edge reported for the sample (the exit that answered it, or
  its best exit when offloaded): the controlled exit's score for one-exit models, an approximation
  for rows another exit answered in multi-exit ones. ``shadowed`` marks every drawn shadow (a label
  is due), so a dropped or failed shadow stays in the design with ``disagree`` NaN: the estimator
  re-weights by the answer rate and its bound counts a missing label as a disagreement
  (:mod:`edgecloud.control.estimate`), instead of silently thinning the Horvitz–Thompson sample. Requests with a per-request threshold
  (``exit_threshold``, ``tolerated_disagreement``) ran under another policy: they are neither
  shadowed nor observed.
* **steps**: ``step()`` runs on a timer thread every ``interval_s`` and, when ``step_samples`` > 0,
  after every that many observed samples; the new threshold goes to the runner and the gauges.
* **cloud saturation**: a cloud answer ``RESOURCE_EXHAUSTED`` or an open breaker
  (``CIRCUIT_OPEN``) calls ``controller.on_cloud_saturated()``.

Per-request limits (:class:`RequestLimits`): ``deadline_s`` (the ``deadline_ms`` parameter): when
what is left of it cannot fit a cloud round trip (the recent round-trip latency of this model's
offloads, p90 of the last 32 within 30 s; without any, the call runs under the deadline), or the
call ran out of it, the edge answers with its best exit, ``degraded_reason`` ``DEADLINE``.
``tolerated_disagreement``: this request's threshold is ``controller.threshold_for(1 - value)``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.serving.batching import DynamicBatcher
from edgecloud.config import BatchingConfig
from edgecloud.edge.cloud_client import CIRCUIT_OPEN, MIN_CALL_BUDGET_S, CloudClient, CloudUnavailable
from edgecloud.edge.runner import EdgeResult, EdgeRunner, SampleResults
from edgecloud.exits import ExitPolicy
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol.errors import InvalidArgument

log = logging.getLogger(__name__)

SHADOW_RADIO = "shadow_radio"       # energy component of shadow sends
DEADLINE = "DEADLINE"               # degraded_reason: the request's deadline_ms left no room
SATURATED_CODES = ("RESOURCE_EXHAUSTED", CIRCUIT_OPEN)  # cloud codes that mean "offload less"
SHADOW_QUEUE_SIZE = 16              # shadow batches waiting for the worker before drops
LATENCY_HISTORY = 32                # cloud round trips behind the deadline estimate ...
LATENCY_MAX_AGE_S = 30.0            # ... no older than this (requests cut by their deadline add
# none, so a slow spell must not keep skipping the cloud after it ended)


def threshold_gauge_value(kind: str, threshold: float | None) -> float:
    """Gauge value of a threshold; an ungated exit shows the value that lets everything out."""
    if threshold is not None:
        return float(threshold)
    return math.inf if kind == "entropy" else 0.0


def policy_score(kind: str, probs: np.ndarray) -> np.ndarray:
    """Per-row score in policy units: entropy in nats (``entropy``) or max probability."""
    p = np.asarray(probs, dtype=np.float64)
    if kind == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return p.max(axis=1) if p.shape[0] else np.zeros(0)


class EdgeModel:
    """One served bundle: its runner and the micro-batcher in front of it."""

    def __init__(self, runner: EdgeRunner, batching: BatchingConfig, metrics: Metrics) -> None:
        self.runner = runner
        self.name = runner.name
        self.max_request_batch = batching.max_request_batch
        self.batcher = DynamicBatcher(
            runner.run_rows,
            solo_fn=runner.run_checked,  # a request alone in its batch: no rows round trip
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            name=runner.name,
            metrics=metrics,
        )
        self._metrics = metrics
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._latency_lock = threading.Lock()
        self._round_trips: deque[tuple[float, float]] = deque(maxlen=LATENCY_HISTORY)
        # complete() counts the bytes actually sent when it takes them (variable-length encodings)

    def metric(self, metric: str, *labels: str) -> Any:
        """``metrics.<metric>.labels(model, *labels)``, cached: prometheus_client's labels()
        validates and locks on every call, several times per request otherwise."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = getattr(self._metrics, metric).labels(self.name, *labels)
            self._children[key] = child
        return child

    def record_round_trip(self, seconds: float) -> None:
        with self._latency_lock:
            self._round_trips.append((time.monotonic(), seconds))

    def round_trip_estimate(self) -> float | None:
        """p90 of this model's recent cloud round trips (the last 32, none older than 30 s);
        None when there are none."""
        oldest = time.monotonic() - LATENCY_MAX_AGE_S
        with self._latency_lock:
            recent = [s for t, s in self._round_trips if t >= oldest]
        return float(np.quantile(recent, 0.9)) if recent else None


@dataclass(frozen=True)
class RequestLimits:
    """Per-request settings from the protocol's request parameters (validated by the adapter)."""

    exit0: float | None = None                   # exit_threshold: exit 0's threshold
    tolerated_disagreement: float | None = None  # 0..1, controlled models only
    deadline_s: float | None = None              # deadline_ms / 1000, counted from ``start``


@dataclass
class InferOutcome:
    """What the adapter encodes: per-sample results and request-level facts."""

    results: SampleResults
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ControlSpec:
    """A controlled model: its budgets, the controller's settings, the exit it moves."""

    budgets: Any     # edgecloud.control.budgets.Budgets
    settings: Any    # edgecloud.control.controller.ControlSettings
    exit_index: int


def control_spec(config: Any, runner: EdgeRunner, key: str) -> ControlSpec:
    """A :class:`ControlSpec` from an ``edge.control.<model>`` entry; ValueError naming ``key``
    and the field when the model cannot be controlled that way."""
    from edgecloud.control.controller import from_config

    if runner.manifest.edge_only:
        raise ValueError(f"{key}: model {runner.name!r} is an edge-only bundle (no cloud part); "
                         "there is nothing to offload or agree with")
    thresholds = runner.thresholds()
    if config.exit_index is None:
        gated = [i for i, t in enumerate(thresholds) if t is not None]
        if not gated:
            raise ValueError(f"{key}.exit_index: model {runner.name!r} has no exit with a threshold "
                             "(every exit answers all it sees); nothing to control")
        exit_index = gated[0]
    else:
        exit_index = int(config.exit_index)
        if not 0 <= exit_index < len(thresholds):
            raise ValueError(f"{key}.exit_index: exit {exit_index} does not exist; model "
                             f"{runner.name!r} has exits 0..{len(thresholds) - 1}")
        if thresholds[exit_index] is None:
            raise ValueError(f"{key}.exit_index: exit {exit_index} of model {runner.name!r} has no "
                             "threshold (it answers everything that reaches it); give it one")
    budgets, settings = from_config(config, key)
    return ControlSpec(budgets=budgets, settings=settings, exit_index=exit_index)


def default_controller_factory(kind: str, threshold: float | None, spec: ControlSpec,
                               runner: EdgeRunner) -> Any:
    from edgecloud.control.controller import ExitController

    per_offload = float(runner.offload_bytes_per_sample)
    return ExitController(
        kind, threshold, spec.budgets, spec.settings, bytes_per_offload=per_offload,
        radio_j_per_offload=per_offload * 8.0 * runner.radio_joules_per_bit,
    )


ControllerFactory = Callable[[str, "float | None", ControlSpec, EdgeRunner], Any]


class ModelControl:
    """One controlled model: its controller, the exit it moves, the step timer, the metrics."""

    def __init__(self, model: EdgeModel, spec: ControlSpec, metrics: Metrics,
                 factory: ControllerFactory, on_threshold: Callable[[EdgeRunner], None]) -> None:
        self.model = model
        self.runner = model.runner
        self.name = model.name
        self.spec = spec
        self.exit_index = spec.exit_index
        self.settings = spec.settings
        self.metrics = metrics
        try:
            self.controller = factory(self.runner.policy.kind,
                                      self.runner.thresholds()[self.exit_index], spec, self.runner)
        except ValueError as exc:
            raise ValueError(f"edge.control.{self.name}: {exc}") from exc
        self._on_threshold = on_threshold
        self._step_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._since_step = 0
        self._budget_labels: set[str] = set()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.publish_targets()

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._tick, name=f"control-{self.name}", daemon=True)
            self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5.0)

    def _tick(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a controller bug must not stop serving
                log.exception("exit controller step failed for %s", self.name)

    # ---- observations and steps ----------------------------------------------------------
    def observe(self, obs: Any) -> None:
        """Hand one batch to the controller; step when ``step_samples`` more were observed.
        Never raises: a controller failure is logged, the daemon keeps serving."""
        try:
            self.controller.observe(obs)
            every = self.settings.step_samples
            if every > 0:
                with self._count_lock:
                    self._since_step += int(np.asarray(obs.score).shape[0])
                    due = self._since_step >= every
                    if due:
                        self._since_step = 0
                if due:
                    self.step()
        except Exception:  # noqa: BLE001 - a controller bug must not fail requests
            log.exception("exit controller observe/step failed for %s", self.name)

    def saturated(self) -> None:
        try:
            self.controller.on_cloud_saturated()
        except Exception:  # noqa: BLE001
            log.exception("exit controller on_cloud_saturated failed for %s", self.name)

    def shadow_mask(self, exited: np.ndarray) -> tuple[np.ndarray, float]:
        """Rows to shadow (exited ones only) and their probability; none if the controller fails."""
        try:
            mask, rate = self.controller.shadow_mask(exited)
            return np.asarray(mask, dtype=bool) & exited, float(rate)
        except Exception:  # noqa: BLE001
            log.exception("exit controller shadow_mask failed for %s", self.name)
            return np.zeros_like(exited), 0.0

    def step(self) -> Any:
        """One controller step: apply its threshold to the runner, publish gauges."""
        with self._step_lock:
            state = self.controller.step()
            if self.runner.thresholds()[self.exit_index] != state.threshold:
                self.runner.set_threshold(self.exit_index, state.threshold)
                log.info("controller moved %s exit %d threshold to %s", self.name, self.exit_index,
                         state.threshold)
            self._on_threshold(self.runner)
            self.publish(state)
            return state

    def set_budgets(self, budgets: Any) -> None:
        self.controller.set_budgets(budgets)
        self.publish_targets()

    # ---- metrics -------------------------------------------------------------------------
    def publish_targets(self) -> None:
        budgets = self.controller.budgets
        active = set(budgets.active)
        for name in active:
            self.metrics.control_target.labels(self.name, name).set(float(budgets.target(name)))
        for name in self._budget_labels - active:  # cleared budgets leave the gauges
            for family in ("control_target", "control_value", "control_violation",
                           "control_unreachable"):
                try:
                    getattr(self.metrics, family).remove(self.name, name)
                except KeyError:
                    pass
        self._budget_labels = active

    def publish(self, state: Any) -> None:
        m, name = self.metrics, self.name
        m.shadow_rate.labels(name).set(float(state.shadow_rate))
        for scope, estimate, lower in (("system", state.agreement, state.agreement_lower),
                                       ("exit", state.exit_agreement, state.exit_agreement_lower)):
            m.agreement.labels(name, scope, "estimate").set(float(estimate))
            m.agreement.labels(name, scope, "lower_bound").set(float(lower))
        m.control_backoff.labels(name).set(1.0 if state.backoff else 0.0)
        if not math.isnan(state.score_shift_p):
            m.control_score_shift_p.labels(name).set(float(state.score_shift_p))
        self.publish_targets()
        for status in state.budgets:
            if status.name not in self._budget_labels:
                continue
            m.control_target.labels(name, status.name).set(float(status.target))
            m.control_value.labels(name, status.name).set(float(status.value))
            m.control_violation.labels(name, status.name).set(0.0 if status.met else 1.0)
            m.control_unreachable.labels(name, status.name).set(0.0 if status.reachable else 1.0)


@dataclass
class _ShadowJob:
    control: ModelControl
    x: np.ndarray             # [S, ...] pixels of the shadowed rows
    rows: np.ndarray          # [S] their rows in the request
    edge_class: np.ndarray    # [S] the edge's class for them
    obs: Any                  # the request's Observations, completed by the worker
    enqueued: float = field(default_factory=time.monotonic)


class ShadowQueue:
    """A bounded queue and one worker thread for shadow sends (off the response path)."""

    def __init__(self, run: Callable[[_ShadowJob], None], maxsize: int = SHADOW_QUEUE_SIZE) -> None:
        self._run = run
        self._queue: queue.Queue[_ShadowJob | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._work, name="edge-shadow", daemon=True)
        self._thread.start()

    def offer(self, job: _ShadowJob) -> bool:
        """Queue ``job``; False (nothing queued) when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - keep the worker alive
                log.exception("shadow job failed for %s", job.control.name)

    def close(self, timeout: float = 5.0) -> None:
        """Let the queued jobs finish (up to ``timeout``), then stop the worker."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    return
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))


class EdgeDataPlane:
    """Inference for every served model (see module docstring)."""

    def __init__(
        self,
        runners: Mapping[str, EdgeRunner],
        *,
        metrics: Metrics,
        batching: BatchingConfig,
        cloud: CloudClient | None = None,
        control: Mapping[str, ControlSpec] | None = None,
        controller_factory: ControllerFactory | None = None,
        shadow_queue_size: int = SHADOW_QUEUE_SIZE,
    ) -> None:
        self.metrics = metrics
        self.cloud = cloud
        self.models: dict[str, EdgeModel] = {
            name: EdgeModel(runner, batching, metrics) for name, runner in runners.items()
        }
        unknown = sorted(set(control or {}) - set(self.models))
        if unknown:
            raise ValueError(f"edge.control names unknown model(s) {unknown}; served: "
                             f"{', '.join(sorted(self.models))}")
        if control and cloud is None:
            raise ValueError(f"edge.control ({', '.join(sorted(control))}) needs a cloud "
                             "(edge.cloud.address / --cloud): the cloud's answers are the "
                             "agreement signal")
        factory = controller_factory or default_controller_factory
        self.controls: dict[str, ModelControl] = {
            name: ModelControl(self.models[name], spec, metrics, factory, self.publish_thresholds)
            for name, spec in (control or {}).items()
        }
        self._shadow = ShadowQueue(self._shadow_run, shadow_queue_size) if self.controls else None
        for model in self.models.values():
            self.publish_thresholds(model.runner)
        for ctl in self.controls.values():
            ctl.start()

    # ---- life cycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the controllers, drain the edge batchers and the shadow queue, then the cloud link."""
        for ctl in self.controls.values():
            ctl.stop()
        for model in self.models.values():
            model.batcher.close(timeout=10.0)
        if self._shadow is not None:
            self._shadow.close()
        if self.cloud is not None:
            self.cloud.close()

    def publish_thresholds(self, runner: EdgeRunner) -> None:
        """Copy a model's current thresholds into the edgecloud_exit_threshold gauge."""
        for index, value in enumerate(runner.thresholds()):
            self.metrics.exit_threshold.labels(model=runner.name, exit=runner.exit_label(index)).set(
                threshold_gauge_value(runner.policy.kind, value)
            )

    def controlled_exit(self, name: str) -> int | None:
        ctl = self.controls.get(name)
        return None if ctl is None else ctl.exit_index

    # ---- one request ---------------------------------------------------------------------
    def infer(
        self,
        model: EdgeModel,
        x: np.ndarray,
        limits: RequestLimits = RequestLimits(),
        *,
        time_remaining: float | None = None,
        start: float | None = None,
    ) -> InferOutcome:
        """Answer one validated request: ``x`` [N, *sample] pixels; ``time_remaining`` is what
        is left of the RPC's deadline (None: none), ``start`` its ``perf_counter`` arrival."""
        start = time.perf_counter() if start is None else start
        name = model.name
        runner = model.runner
        control = self.controls.get(name)
        policy = self._private_policy(model, control, limits)
        edge, queue_s = self._edge(model, x, policy)
        model.metric("latency", "queue").observe(queue_s)
        model.metric("latency", "edge_compute").observe(edge.compute_s)

        observe = control is not None and policy is None
        # the edge's class per row, before complete() puts the cloud's in (offloaded rows: the
        # best exit's): what the disagreement of offloaded and shadowed rows is measured against
        edge_class = edge.probs.argmax(axis=1) if observe else None
        shadow_rows = np.zeros(0, np.int64)
        shadow_p = 0.0
        if observe and self.cloud is not None:
            exited = edge.exit_index >= 0
            if exited.any():
                mask, shadow_p = control.shadow_mask(exited)
                shadow_rows = np.flatnonzero(mask)

        cloud_probs: np.ndarray | None = None
        transmitted = False
        sent_rows = np.zeros(0, dtype=np.int64)  # bytes of each offloaded row on the wire
        cloud_latency_ms = 0.0
        reason = ""
        if edge.offload_index.size:
            remaining = time_remaining
            binding = False  # the deadline_ms parameter, not the RPC's deadline, limits the call
            if limits.deadline_s is not None:
                left = limits.deadline_s - (time.perf_counter() - start)
                binding = remaining is None or left <= remaining
                remaining = left if remaining is None else min(remaining, left)
            estimate = model.round_trip_estimate() if limits.deadline_s is not None else None
            if self.cloud is None:
                reason = "NO_CLOUD"
            elif limits.deadline_s is not None and remaining is not None and (
                remaining < MIN_CALL_BUDGET_S or (estimate is not None and remaining < estimate)
            ):
                reason = DEADLINE
            else:
                try:
                    wire = runner.encode_offload(edge.offload)  # what the radio carries
                    sent_rows = runner.wire_bytes(wire)
                    reply = self.cloud.infer(name, wire, remaining)
                    cloud_probs, transmitted = reply.probs, True
                    cloud_latency_ms = reply.latency_s * 1000.0
                    model.metric("latency", "cloud_round_trip").observe(reply.latency_s)
                    model.record_round_trip(reply.latency_s)
                except CloudUnavailable as exc:
                    reason, transmitted = exc.code, exc.transmitted
                    if binding and exc.code == "DEADLINE_EXCEEDED":
                        reason = DEADLINE
                    log.debug("cloud unavailable for %s: %s", name, exc)
                    if control is not None and exc.code in SATURATED_CODES:
                        control.saturated()
        if not transmitted:
            sent_rows = np.zeros(0, dtype=np.int64)
        results = self._complete(model, edge, cloud_probs, transmitted, sent_rows)
        self._count(model, results)

        n_degraded = int(results.degraded.sum())
        n_cloud = int(results.cloud.sum())
        parameters: dict[str, Any] = {
            "degraded": n_degraded > 0,
            "degraded_samples": n_degraded,
            "cloud_samples": n_cloud,
            "edge_samples": int(results.exit_index.shape[0]) - n_degraded - n_cloud,
            "cloud_latency_ms": float(cloud_latency_ms),
            "edge_compute_ms": float(edge.compute_s * 1000.0),
            "offload_bytes": int(sent_rows.sum()),
        }
        if n_degraded:
            parameters["degraded_reason"] = reason
        if observe:
            self._observe(control, model, x, edge, edge_class, results, cloud_probs, sent_rows,
                          shadow_rows, shadow_p, time.perf_counter() - start)
        return InferOutcome(results, parameters)

    def _private_policy(self, model: EdgeModel, control: ModelControl | None,
                        limits: RequestLimits) -> ExitPolicy | None:
        """This request's own policy (None: the model's live one, shared batches)."""
        runner = model.runner
        if limits.exit0 is None and limits.tolerated_disagreement is None:
            return None
        policy = ExitPolicy(kind=runner.policy.kind, thresholds=list(runner.thresholds()))
        if limits.tolerated_disagreement is not None and control is not None:
            try:
                threshold = control.controller.threshold_for(1.0 - limits.tolerated_disagreement)
            except ValueError as exc:
                raise InvalidArgument(f"parameter 'tolerated_disagreement': {exc}") from exc
            except Exception:  # noqa: BLE001 - a controller bug: keep the model's threshold
                log.exception("exit controller threshold_for failed for %s", model.name)
                threshold = None
            if threshold is not None:
                policy.set_threshold(control.exit_index, threshold)
        if limits.exit0 is not None:
            policy.set_threshold(0, limits.exit0)
        return policy

    def _edge(self, model: EdgeModel, x: np.ndarray, policy: ExitPolicy | None) -> tuple[EdgeResult, float]:
        """Edge part of one request; returns the result and its queue time."""
        if policy is not None:  # a private policy: run alone, not in a shared batch
            return model.runner.run(x, policy=policy), 0.0
        # ResourceExhausted when full: explicit overload. inline: an idle batcher runs this
        # request in this handler thread (no hand-off to the worker and back); a busy one
        # queues it, so concurrent requests still share batches.
        future = model.batcher.submit(x, inline=True)
        out = future.result()  # an EdgeResult when the batch was this request alone, else rows
        edge = out if isinstance(out, EdgeResult) else model.runner.from_rows(out)
        return edge, future.queue_s

    @staticmethod
    def _complete(model: EdgeModel, edge: EdgeResult, cloud_probs: np.ndarray | None,
                  transmitted: bool, sent_rows: np.ndarray) -> SampleResults:
        sent = sent_rows if transmitted and sent_rows.size else None
        return model.runner.complete(edge, cloud_probs, transmitted, sent_bytes=sent)

    @staticmethod
    def _count(model: EdgeModel, results: SampleResults) -> None:
        runner = model.runner
        exits = results.exit_index
        if exits.size and int(exits.min()) >= 0:
            counts = np.bincount(exits, minlength=runner.cloud_exit + 1)
            pairs = [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]
        else:  # not expected after complete(); counted as before, under the exit's label
            values, counts = np.unique(exits, return_counts=True)
            pairs = list(zip(values.tolist(), counts.tolist()))
        for exit_index, count in pairs:
            model.metric("samples", runner.exit_label(exit_index)).inc(count)
        degraded = int(results.degraded.sum())
        if degraded:
            model.metric("degraded_samples").inc(degraded)
        for component, joules in results.energy.items():
            total = float(joules.sum())
            if total > 0:
                model.metric("energy", component).inc(total)

    # ---- control: observations and shadows ------------------------------------------------
    def _observe(self, control: ModelControl, model: EdgeModel, x: np.ndarray, edge: EdgeResult,
                 edge_class: np.ndarray, results: SampleResults, cloud_probs: np.ndarray | None,
                 sent_rows: np.ndarray, shadow_rows: np.ndarray, shadow_p: float,
                 latency_s: float) -> None:
        from edgecloud.control.controller import Observations

        runner = model.runner
        n = edge.size
        exited = edge.exit_index >= 0
        disagree = np.full(n, np.nan)
        rows = edge.offload_index
        if cloud_probs is not None and rows.size:
            disagree[rows] = (edge_class[rows] != np.asarray(cloud_probs).argmax(axis=1)).astype(float)
        sent_bytes = np.zeros(n, dtype=np.int64)
        if sent_rows.size:  # transmitted: each offloaded row's bytes (offload_index order)
            sent_bytes[rows] = sent_rows
        compute = np.zeros(n, dtype=np.float64)
        for component, joules in edge.energy.items():
            compute += joules
        radio = np.asarray(results.energy.get("radio", np.zeros(n)), dtype=np.float64).copy()
        shadowed = np.zeros(n, dtype=bool)
        shadowed[shadow_rows] = True  # drawn: a label is due (NaN until it is in: dropped, failed)
        obs = Observations(
            score=policy_score(runner.policy.kind, edge.probs),
            exited=exited.copy(),
            shadowed=shadowed,
            shadow_prob=np.where(exited, float(shadow_p), 1.0),
            disagree=disagree,
            compute_j=compute,
            radio_j=radio,
            sent_bytes=sent_bytes,
            latency_s=np.full(n, float(latency_s)),
        )
        if self._shadow is not None:  # observations too go through the worker: in order, and
            # a step that falls due runs there, not in this request's thread
            job = _ShadowJob(control, np.array(x[shadow_rows]), shadow_rows, edge_class[shadow_rows], obs)
            if self._shadow.offer(job):
                return
        if shadow_rows.size:
            model.metric("shadow_dropped").inc(int(shadow_rows.size))
        control.observe(obs)  # queue full: observe here (cheap; a due step runs here too)

    def _shadow_run(self, job: _ShadowJob) -> None:
        """Worker side: recompute the cloud input, send it, label the rows, observe the batch."""
        control, obs = job.control, job.obs
        model = control.model
        runner = model.runner
        if not job.rows.size:
            control.observe(obs)
            return
        try:
            reply = None
            transmitted = False
            per_row = np.zeros(0, dtype=np.int64)
            try:
                features = runner.offload_for(job.x)
                wire = runner.encode_offload(features)
                per_row = runner.wire_bytes(wire)
                reply = self.cloud.infer(model.name, wire, None)
                transmitted = True
            except CloudUnavailable as exc:
                transmitted = exc.transmitted
                if exc.code in SATURATED_CODES:
                    control.saturated()
                log.debug("shadow send failed for %s: %s", model.name, exc)
            if transmitted and per_row.size:
                nbytes = int(per_row.sum())
                joules = nbytes * 8.0 * runner.radio_joules_per_bit
                model.metric("shadow_samples").inc(int(job.rows.size))
                model.metric("shadow_bytes").inc(nbytes)
                model.metric("energy", SHADOW_RADIO).inc(joules)
                obs.sent_bytes[job.rows] += per_row
                obs.radio_j[job.rows] += per_row * 8.0 * runner.radio_joules_per_bit
            if reply is not None:
                cloud_class = np.asarray(reply.probs).argmax(axis=1)
                obs.disagree[job.rows] = (job.edge_class != cloud_class).astype(float)
        except Exception:  # noqa: BLE001 - a failed shadow must still report its batch
            log.exception("shadow sampling failed for %s", model.name)
        control.observe(obs)


__all__ = [
    "ControlSpec", "EdgeDataPlane", "EdgeModel", "InferOutcome", "ModelControl", "RequestLimits",
    "control_spec", "policy_score", "threshold_gauge_value",
]
