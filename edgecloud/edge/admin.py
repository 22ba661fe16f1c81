"""The ``edgecloud.admin.v1.EdgeAdmin`` service: exit thresholds and control budgets at run time.

Why: the right threshold trades accuracy for offloads and energy, and it changes with load,
bandwidth and battery; an operator (or a controller) moves it without restarting the daemon.
A change applies from the next batch on and is reflected in the exit-threshold gauge.

For a model under online exit control (``edge.control``) the controller owns one exit's
threshold: SetThreshold on that exit is refused (FAILED_PRECONDITION); its budgets are changed
with SetBudgets instead (validated, applied at the controller's next step), and GetControl shows
the controller's state, every budget's value, and whether it is met and reachable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from edgecloud.edge.runner import EdgeRunner
from edgecloud.protocol import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = "edgecloud.admin.v1.EdgeAdmin"


def model_thresholds(runner: EdgeRunner) -> admin_pb2.ModelThresholds:
    out = admin_pb2.ModelThresholds(model=runner.name, policy=runner.policy.kind)
    for index, value in enumerate(runner.thresholds()):
        entry = out.exits.add(exit_index=index, exit_name=runner.exit_names[index])
        if value is not None:
            entry.threshold = value
    return out


class EdgeAdminServicer(admin_pb2_grpc.EdgeAdminServicer):
    """Reads and sets the thresholds of the runners it is given (shared with the servicer)."""

    def __init__(
        self,
        runners: Mapping[str, EdgeRunner],
        on_change: Callable[[EdgeRunner], None] | None = None,
        dataplane: Any = None,
    ) -> None:
        self.runners = runners
        self.on_change = on_change
        self.dataplane = dataplane  # EdgeDataPlane: its ``controls`` are the controlled models

    def _runner(self, name: str, context: grpc.ServicerContext) -> EdgeRunner:
        runner = self.runners.get(name)
        if runner is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} is not served here; available: {', '.join(sorted(self.runners))}",
            )
        return runner

    def GetThresholds(self, request: admin_pb2.GetThresholdsRequest, context: grpc.ServicerContext) -> admin_pb2.GetThresholdsResponse:
        names = [request.model] if request.model else sorted(self.runners)
        response = admin_pb2.GetThresholdsResponse()
        for name in names:
            response.models.append(model_thresholds(self._runner(name, context)))
        return response

    def SetThreshold(self, request: admin_pb2.SetThresholdRequest, context: grpc.ServicerContext) -> admin_pb2.SetThresholdResponse:
        runner = self._runner(request.model, context)
        change = request.WhichOneof("change")
        if change is None or (change == "clear" and not request.clear):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set either 'value' or 'clear: true'")
        value = request.value if change == "value" else None
        if not 0 <= request.exit_index < len(runner.exit_names):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"exit {request.exit_index} does not exist; model {runner.name!r} has exits "
                f"0..{len(runner.exit_names) - 1} ({', '.join(runner.exit_names)})",
            )
        controlled = self._controls().get(runner.name)
        if controlled is not None and controlled.exit_index == request.exit_index:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"exit {request.exit_index} of model {runner.name!r} is under online control; "
                "change its budgets (SetBudgets, `edgecloud edge budgets`) instead",
            )
        try:
            runner.set_threshold(request.exit_index, value)
        except (ValueError, IndexError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"threshold rejected: {exc}")
        log.info("threshold of %s exit %d set to %s", runner.name, request.exit_index, value)
        if self.on_change is not None:
            self.on_change(runner)
        return admin_pb2.SetThresholdResponse(model=model_thresholds(runner))

    # ---- online exit control ---------------------------------------------------------------
    def _controls(self) -> Mapping[str, Any]:
        return self.dataplane.controls if self.dataplane is not None else {}

    def _control(self, name: str, context: grpc.ServicerContext) -> Any:
        self._runner(name, context)
        control = self._controls().get(name)
        if control is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} has no controller (configure edge.control.{name} or start with "
                f"--target-agreement); controlled: {', '.join(sorted(self._controls())) or 'none'}",
            )
        return control

    def GetControl(self, request: admin_pb2.GetControlRequest, context: grpc.ServicerContext) -> admin_pb2.GetControlResponse:
        names = [request.model] if request.model else sorted(self._controls())
        response = admin_pb2.GetControlResponse()
        for name in names:
            response.models.append(control_state(self._control(name, context)))
        return response

    def SetBudgets(self, request: admin_pb2.SetBudgetsRequest, context: grpc.ServicerContext) -> admin_pb2.SetBudgetsResponse:
        control = self._control(request.model, context)
        try:
            budgets = updated_budgets(control.controller.budgets, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"budgets rejected: {exc}")
        control.set_budgets(budgets)
        log.info("budgets of %s set to %s", control.name, budgets)
        return admin_pb2.SetBudgetsResponse(model=control_state(control))


# SetBudgets: proto field -> Budgets field (and the budget name `clear` takes)
_BUDGET_FIELDS = {
    "agreement": ("agreement", "agreement"),
    "energy_j": ("energy_j", "energy"),
    "uplink_bytes_s": ("uplink_bytes_s", "uplink"),
    "p99_latency_ms": ("p99_latency_s", "latency"),
}


def updated_budgets(current: Any, request: admin_pb2.SetBudgetsRequest) -> Any:
    """``current`` Budgets with the request's changes; ValueError naming the field."""
    changes: dict[str, Any] = {}
    names = {name for _, name in _BUDGET_FIELDS.values()}
    unknown = [c for c in request.clear if c not in names]
    if unknown:
        raise ValueError(f"clear: unknown budget(s) {unknown}; budgets: "
                         f"{', '.join(sorted(names))}")
    given = request.budgets
    for field, (attr, name) in _BUDGET_FIELDS.items():
        if given.HasField(field):
            if name in request.clear:
                raise ValueError(f"{field} is both set and cleared")
            value = getattr(given, field)
            if not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value}")
            if field == "p99_latency_ms":
                if not value > 0:
                    raise ValueError(f"p99_latency_ms budget must be > 0, got {value}")
                value = value / 1000.0
            changes[attr] = value
        elif name in request.clear:
            changes[attr] = None
    if given.HasField("delta"):
        changes["delta"] = given.delta
    if given.priority:
        changes["priority"] = tuple(given.priority)
    if not changes:
        raise ValueError("nothing to change: set a budget, delta or priority, or clear a budget")
    return current.updated(**changes)


def budgets_message(budgets: Any) -> admin_pb2.Budgets:
    out = admin_pb2.Budgets(delta=budgets.delta, priority=list(budgets.priority))
    if budgets.agreement is not None:
        out.agreement = budgets.agreement
    if budgets.energy_j is not None:
        out.energy_j = budgets.energy_j
    if budgets.uplink_bytes_s is not None:
        out.uplink_bytes_s = budgets.uplink_bytes_s
    if budgets.p99_latency_s is not None:
        out.p99_latency_ms = budgets.p99_latency_s * 1000.0
    return out


def control_state(control: Any) -> admin_pb2.ControlState:
    """A controlled model's last-step state and its budgets as set."""
    state = control.controller.state()
    runner = control.runner
    out = admin_pb2.ControlState(
        model=control.name, exit_index=control.exit_index,
        exit_name=runner.exit_names[control.exit_index], policy=runner.policy.kind,
        shadow_rate=float(state.shadow_rate), window_samples=int(state.window_samples),
        window_shadowed=int(state.window_shadowed), agreement=float(state.agreement),
        agreement_lower=float(state.agreement_lower), exit_agreement=float(state.exit_agreement),
        exit_agreement_lower=float(state.exit_agreement_lower), exit_share=float(state.exit_share),
        backoff=bool(state.backoff), steps=int(state.steps),
        targets=budgets_message(control.controller.budgets),
    )
    threshold = runner.thresholds()[control.exit_index]
    if threshold is not None:
        out.threshold = threshold
    for status in state.budgets:
        entry = out.budgets.add(
            name=status.name, target=float(status.target), value=float(status.value),
            met=bool(status.met), reachable=bool(status.reachable), message=status.message,
        )
        if status.bound is not None:
            entry.bound = float(status.bound)
    return out
