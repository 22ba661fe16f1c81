"""The ``edgecloud.admin.v1.EdgeAdmin`` service: exit thresholds at run time.

Why: the right threshold trades accuracy for offloads and energy, and it changes with load,
bandwidth and battery; an operator (or a controller) moves it without restarting the daemon.
A change applies from the next batch on and is reflected in the exit-threshold gauge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

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
    ) -> None:
        self.runners = runners
        self.on_change = on_change

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
        try:
            runner.set_threshold(request.exit_index, value)
        except (ValueError, IndexError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"threshold rejected: {exc}")
        log.info("threshold of %s exit %d set to %s", runner.name, request.exit_index, value)
        if self.on_change is not None:
            self.on_change(runner)
        return admin_pb2.SetThresholdResponse(model=model_thresholds(runner))
