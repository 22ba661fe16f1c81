"""The gRPC server shell shared by the edge daemon and the cloud server.

:class:`GrpcServer` wires one OIP servicer (plus optional extra services) into a grpcio server
with: message-size limits, a maximum connection age (clients re-resolve and find new replicas),
no SO_REUSEPORT (a second server cannot silently share a port),
the bearer-token interceptor, ``grpc.health.v1`` health, server reflection, TLS/mTLS, the
Prometheus endpoint, a one-line start-up announcement, an optional ready file, and graceful
shutdown (health NOT_SERVING -> drain in-flight RPCs -> stop -> close servicers).

Typical use::

    server = GrpcServer("cloud", settings.cloud.server, servicer, metrics=Metrics("cloud"))
    server.start()            # binds, prints the line, writes the ready file
    return server.serve_forever()   # until SIGTERM/SIGINT, then drains; returns 0
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecloud.config import ServerConfig
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import SERVICE_NAME, pb_grpc
from edgecloud.serving.security import EXEMPT_PREFIXES, TokenInterceptor, server_credentials, tls_mode

# (add_XServicer_to_server, servicer, full service name)
ExtraService = tuple[Callable[[Any, grpc.Server], None], Any, str]


class _InFlight(grpc.ServerInterceptor):
    """Counts running RPCs (health/reflection excluded) so shutdown can wait for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._idle = threading.Condition(self._lock)
        # method -> (its handler, the counting wrapper): built once, not on every RPC
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def wait_idle(self, timeout: float) -> bool:
        """True when no counted RPC is running (waits at most ``timeout`` seconds)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=max(0.0, timeout))

    def _enter(self) -> None:
        with self._lock:
            self._count += 1

    def _exit(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or (handler_call_details.method or "").startswith(EXEMPT_PREFIXES):
            return handler
        if handler.request_streaming or handler.response_streaming:
            return handler  # our services are unary; streams are not counted
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        inner = handler.unary_unary

        def counted(request, context):
            self._enter()
            try:
                return inner(request, context)
            finally:
                self._exit()

        wrapped = grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class LifoThreadPool(futures.Executor):
    """The RPC thread pool: the most recently idle thread takes the next RPC (LIFO).

    grpcio's sync server hands every RPC to an executor. ``ThreadPoolExecutor`` wakes whichever
    idle thread the kernel picks, in practice round-robin, so once a burst has grown the pool,
    sequential requests hop across many threads, each with cold caches and its own malloc
    arena; on a small machine that made batch-1 latency grow after load. Here a finished thread
    takes queued work first, else goes on top of an idle stack, and ``submit`` wakes the top
    one, so light traffic stays on one warm thread while bursts still get ``max_workers``.
    grpcio only calls :meth:`submit` (and uses the returned future's callbacks).
    """

    class _Slot:
        __slots__ = ("item", "wake")

        def __init__(self, item: Any) -> None:
            self.item = item
            self.wake = threading.Lock()
            self.wake.acquire()  # held: the thread blocks on it while idle

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = int(max_workers)
        self._prefix = thread_name_prefix or "rpc"
        self._lock = threading.Lock()
        self._idle: list[LifoThreadPool._Slot] = []
        self._pending: collections.deque[Any] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads started so far (they stay until :meth:`shutdown`)."""
        return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        item = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                slot = self._idle.pop()
                slot.item = item
                slot.wake.release()
            elif len(self._threads) < self.max_workers:
                slot = self._Slot(item)
                thread = threading.Thread(
                    target=self._work, args=(slot,), daemon=True,
                    name=f"{self._prefix}_{len(self._threads)}",
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._pending.append(item)
        return future

    def _work(self, slot: "LifoThreadPool._Slot") -> None:
        while slot.item is not None:
            future, fn, args, kwargs = slot.item
            slot.item = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - delivered through the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            with self._lock:
                if self._pending:
                    slot.item = self._pending.popleft()
                    continue
                if self._shutdown:
                    return
                self._idle.append(slot)
            slot.wake.acquire()  # until submit() hands over work, or shutdown (item None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft()[0].cancel()
            for slot in self._idle:
                slot.item = None
                slot.wake.release()
            self._idle.clear()
            threads = list(self._threads)
        if wait:
            me = threading.current_thread()
            for thread in threads:
                if thread is not me:
                    thread.join()


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Server channel args that close each client connection after ``max_connection_age_s``.

    Why: a gRPC client balances per connection and does not re-resolve DNS on a timer, so a
    long-lived channel never sees replicas added after it connected. A GOAWAY at the maximum
    age makes it reconnect and re-resolve; calls running then get the grace to finish.
    """
    if not config.max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, int(config.max_connection_age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
    ]


def write_ready_file(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file in the same folder + rename): readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GrpcServer:
    """One gRPC server: OIP servicer + extras, health, reflection, auth, TLS, metrics endpoint.

    Args:
        role: ``"edge"`` or ``"cloud"`` (printed and used for nothing else).
        config: the :class:`ServerConfig` (host, ports, workers, token, TLS, grace, sizes).
        servicer: implements ``pb_grpc.GRPCInferenceServiceServicer``.
        metrics: the server's :class:`Metrics`; its ``/metrics`` endpoint is started here.
        extra_services: ``(add_fn, servicer, full_service_name)`` triples, e.g. an admin API.
        ready_file: where to write ``{"grpc_port", "metrics_port", "pid"}`` once serving.
        out: stream for the start-up line (stdout).

    After :meth:`stop`, ``close()`` is called on ``servicer`` and each extra servicer that has
    one (e.g. to drain dynamic batchers) once no RPC can reach them any more.
    """

    def __init__(
        self,
        role: str,
        config: ServerConfig,
        servicer: Any,
        *,
        metrics: Metrics,
        extra_services: Sequence[ExtraService] = (),
        ready_file: str | Path | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.role = role
        self.config = config
        self.servicer = servicer
        self.metrics = metrics
        self.extra_services = list(extra_services)
        self.ready_file = Path(ready_file) if ready_file else None
        self._out = out
        self.port: int = 0
        self.metrics_port: int = 0
        self._server: grpc.Server | None = None
        self._pool: LifoThreadPool | None = None
        self._health = health.HealthServicer()
        self._in_flight = _InFlight()
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # ---- facts -------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.config.host

    @property
    def address(self) -> str:
        """``host:port`` a client on this machine dials."""
        return f"{self.config.host}:{self.port}"

    @property
    def service_names(self) -> list[str]:
        return [SERVICE_NAME] + [name for _, _, name in self.extra_services]

    @property
    def health(self) -> health.HealthServicer:
        return self._health

    @property
    def in_flight(self) -> int:
        """RPCs currently running (health and reflection not counted)."""
        return self._in_flight.count

    def announcement(self) -> str:
        auth = "token" if self.config.token else "off"
        return (
            f"edgecloud {self.role} listening grpc={self.config.host}:{self.port} "
            f"metrics=http://{self.config.host}:{self.metrics_port}/metrics "
            f"tls={tls_mode(self.config.tls)} auth={auth}"
        )

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> "GrpcServer":
        """Bind, start serving, start ``/metrics``, print the line, write the ready file."""
        if self._server is not None:
            raise RuntimeError("server already started")
        cfg = self.config
        interceptors: list[grpc.ServerInterceptor] = []
        if cfg.token:
            interceptors.append(TokenInterceptor(cfg.token))
        interceptors.append(self._in_flight)
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            *connection_age_options(cfg),
        ]
        self._pool = LifoThreadPool(cfg.max_workers, thread_name_prefix=f"{self.role}-grpc")
        server = grpc.server(
            self._pool,
            interceptors=interceptors,
            options=options,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        for add_fn, extra, _name in self.extra_services:
            add_fn(extra, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ["", *self.service_names]:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        bind = f"{cfg.host}:{cfg.port}"
        creds = server_credentials(cfg.tls)
        try:
            port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
        except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot bind
            raise OSError(f"cannot bind gRPC {bind}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot bind gRPC {bind} (in use or not permitted)")
        self.port = port
        server.start()
        self._server = server
        try:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.host)
        except OSError as exc:
            server.stop(0)
            raise OSError(
                f"cannot bind metrics {cfg.host}:{cfg.metrics_port}: {exc.strerror or exc}"
            ) from exc
        out = self._out or sys.stdout
        print(self.announcement(), file=out, flush=True)
        if self.ready_file:
            write_ready_file(
                self.ready_file,
                {"grpc_port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid()},
            )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call twice and from any thread.

        1. health -> NOT_SERVING for every service (probes and balancers stop sending);
        2. wait until in-flight RPCs finish (at most ``grace / 2`` s; default config
           ``shutdown_grace_s``) while still answering — so nothing accepted is lost;
        3. stop accepting; RPCs still running get what is left of the grace, then are
           cancelled;
        4. stop ``/metrics``, ``close()`` the servicers, remove the ready file.
        """
        with self._stop_lock:
            if self._stopped.is_set() or self._server is None:
                return
            grace = self.config.shutdown_grace_s if grace is None else grace
            deadline = time.monotonic() + grace
            self._health_not_serving(min(1.0, grace / 2))
            # Keep answering for at most half the grace while in-flight work finishes, so a
            # busy server still leaves the other half to RPCs that are running at step 3.
            self._in_flight.wait_idle(grace / 2)
            remaining = max(0.0, deadline - time.monotonic())
            self._server.stop(remaining).wait()
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # idle RPC threads exit; none is running now
            self.metrics.shutdown()
            for obj in [self.servicer, *(s for _, s, _ in self.extra_services)]:
                close = getattr(obj, "close", None)
                if callable(close):
                    close()
            if self.ready_file:
                self.ready_file.unlink(missing_ok=True)
            self._stopped.set()
            self._stop_requested.set()

    def _health_not_serving(self, timeout: float) -> None:
        """Health -> NOT_SERVING for every service, waiting at most ``timeout`` seconds.

        Why bounded: grpcio's HealthServicer sends to its Watch streams while holding its lock,
        and a Watch whose connection is closing at that moment can hold that lock until the
        server stops (seen with clients that health-check and a short max connection age). The
        drain must go on regardless: stopping the server ends those streams and frees it.
        """
        done = threading.Event()

        def flip() -> None:
            self._health.enter_graceful_shutdown()
            done.set()

        threading.Thread(target=flip, name=f"{self.role}-health-drain", daemon=True).start()
        done.wait(max(0.0, timeout))

    def request_stop(self, *_args: Any) -> None:
        """Ask :meth:`serve_forever` to shut down (signal-handler safe: only sets a flag)."""
        self._stop_requested.set()

    def serve_forever(self) -> int:
        """Block until SIGTERM/SIGINT (or :meth:`request_stop`), then :meth:`stop`; returns 0."""
        if self._server is None:
            self.start()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.request_stop)
        try:
            while not self._stop_requested.wait(0.5):
                pass
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "GrpcServer":
        return self.start() if self._server is None else self

    def __exit__(self, *_exc: Any) -> None:
        self.stop(grace=1.0)
