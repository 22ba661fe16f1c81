"""The edge->cloud link: retries, deadlines, circuit breaker, batching, auth, mTLS.

The cloud here is a *scripted* OIP server (a real gRPC server on 127.0.0.1 served by
:class:`GrpcServer`, so the token interceptor and TLS are the real ones) whose behaviour each
test sets: answer, fail with a status, or be slow. It answers ``LOGITS`` whose argmax is the
rounded mean of each row's features, so every caller can check it got its own rows back.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecloud.config import CloudLinkConfig, ServerConfig, TLSConfig
from edgecloud.edge.breaker import BreakerState, CircuitBreaker
from edgecloud.edge.cloud_client import (
    CIRCUIT_OPEN,
    CloudClient,
    CloudModel,
    CloudUnavailable,
    service_config,
)
from edgecloud.serving.grpc_server import GrpcServer
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import codec, pb, pb_grpc

CLASSES = 10
FEATURE_SHAPE = (2, 3)
MODEL = CloudModel(name="m", cloud_name="m-cloud", input_name="FEATURES", output_name="LOGITS",
                   num_classes=CLASSES)


class ScriptedCloud(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer that fails ``fail_next`` times with ``fail_code``, sleeps ``delay_s``, and
    otherwise returns one-hot-ish logits at class round(mean(row))."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.rows_per_call: list[int] = []
        self.fail_next = 0
        self.fail_always = False
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.delay_s = 0.0
        self.seen_models: list[str] = []
        self.hold: threading.Event | None = None  # when set: calls wait for it (after `entered`)
        self.entered = threading.Event()

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        with self.lock:
            self.calls += 1
            self.seen_models.append(request.model_name)
            fail = self.fail_always or self.fail_next > 0
            if self.fail_next > 0:
                self.fail_next -= 1
        if fail:
            context.abort(self.fail_code, "scripted failure")
        if self.hold is not None:
            self.entered.set()
            self.hold.wait(10.0)
        if self.delay_s:
            time.sleep(self.delay_s)
        x = codec.decode_inputs(request)["FEATURES"]
        with self.lock:
            self.rows_per_call.append(int(x.shape[0]))
        target = np.rint(x.reshape(x.shape[0], -1).mean(axis=1)).astype(int) % CLASSES
        logits = np.zeros((x.shape[0], CLASSES), np.float32)
        logits[np.arange(x.shape[0]), target] = 20.0
        return codec.encode_response(request.model_name, {"LOGITS": logits}, request_id=request.id)


def start_cloud(token: str | None = None, tls: TLSConfig | None = None) -> tuple[GrpcServer, ScriptedCloud]:
    servicer = ScriptedCloud()
    config = ServerConfig(token=token, tls=tls or TLSConfig(), shutdown_grace_s=0.5)
    server = GrpcServer("cloud", config, servicer, metrics=Metrics("cloud"), out=open("/dev/null", "w"))
    return server.start(), servicer


@pytest.fixture()
def cloud():
    server, servicer = start_cloud()
    yield server, servicer
    server.stop(0.1)


def link(address: str, **kw) -> CloudLinkConfig:
    base = dict(address=address, timeout_s=1.0, max_attempts=3, initial_backoff_s=0.01,
                max_backoff_s=0.05, breaker_failures=3, breaker_reset_s=0.3,
                batching={"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 256})
    base.update(kw)
    return CloudLinkConfig(**base)


def client_for(config: CloudLinkConfig) -> tuple[CloudClient, Metrics]:
    metrics = Metrics("edge")
    client = CloudClient(config, metrics)
    client.add_model(MODEL)
    return client, metrics


def features(value: float, k: int = 2) -> np.ndarray:
    return np.full((k, *FEATURE_SHAPE), value, np.float32)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---- breaker (a real object on a controlled clock) --------------------------------------
def test_breaker_state_machine():
    now = [0.0]
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(2, 1.0, clock=lambda: now[0], on_change=changes.append)
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    breaker.record_success()  # success resets the consecutive count
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 0.99
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()          # the one probe
    assert not breaker.allow()      # everyone else still fails fast
    breaker.record_failure()        # probe failed -> open again for reset_s
    assert breaker.state is BreakerState.OPEN
    now[0] = 2.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN,
                       BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_service_config_retries_unavailable_only_and_has_no_timeout():
    cfg = service_config(link("x:1", max_attempts=4))
    (method,) = cfg["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert "timeout" not in method
    assert "retryPolicy" not in service_config(link("x:1", max_attempts=1))["methodConfig"][0]


# ---- calls against the scripted cloud ---------------------------------------------------
def test_success_returns_probabilities_and_counts_bytes(cloud):
    server, servicer = cloud
    client, metrics = client_for(link(server.address))
    try:
        x = features(3.0, k=4)
        reply = client.infer("m", x, time_remaining=5.0)
        assert reply.probs.shape == (4, CLASSES) and reply.probs.dtype == np.float32
        np.testing.assert_allclose(reply.probs.sum(axis=1), 1.0, rtol=1e-5)
        assert (reply.probs.argmax(axis=1) == 3).all()
        assert servicer.seen_models == ["m-cloud"]  # the manifest's cloud model name is used
        assert metric(metrics, "edgecloud_offload_bytes_total", model="m") == x.nbytes
        assert metric(metrics, "edgecloud_circuit_breaker_open") == 0.0
    finally:
        client.close()


def test_unavailable_is_retried_by_the_channel(cloud):
    server, servicer = cloud
    client, metrics = client_for(link(server.address, max_attempts=3))
    try:
        servicer.fail_next = 2
        reply = client.infer("m", features(1.0))
        assert (reply.probs.argmax(axis=1) == 1).all()
        assert servicer.calls == 3
        assert metric(metrics, "edgecloud_cloud_failures_total", model="m", code="UNAVAILABLE") == 0
    finally:
        client.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT])
def test_other_codes_are_not_retried_and_are_counted(cloud, code):
    server, servicer = cloud
    client, metrics = client_for(link(server.address, max_attempts=5))
    try:
        servicer.fail_next, servicer.fail_code = 1, code
        with pytest.raises(CloudUnavailable) as info:
            client.infer("m", features(1.0))
        assert info.value.code == code.name
        assert servicer.calls == 1
        assert metric(metrics, "edgecloud_cloud_failures_total", model="m", code=code.name) == 1
    finally:
        client.close()


def test_deadline_is_the_smaller_of_link_timeout_and_inbound_remaining(cloud):
    server, servicer = cloud
    servicer.delay_s = 0.6
    client, metrics = client_for(link(server.address, timeout_s=5.0))
    try:
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailable) as info:
            client.infer("m", features(1.0), time_remaining=0.15)  # inbound deadline wins
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - t0 < 0.5
        assert client.budget(0.15) < 0.15 and client.budget(None) == 5.0
        assert client.budget(100.0) == 5.0  # link timeout wins
        with pytest.raises(CloudUnavailable) as info:  # nothing left: not even sent
            client.infer("m", features(1.0), time_remaining=0.001)
        assert info.value.code == "DEADLINE_EXCEEDED" and not info.value.transmitted
    finally:
        client.close()


def test_breaker_opens_fails_fast_then_recovers_through_a_probe(cloud):
    server, servicer = cloud
    client, metrics = client_for(link(server.address, max_attempts=1, breaker_failures=3,
                                      breaker_reset_s=0.3))
    try:
        servicer.fail_always, servicer.fail_code = True, grpc.StatusCode.INTERNAL
        for _ in range(3):
            with pytest.raises(CloudUnavailable):
                client.infer("m", features(1.0))
        assert servicer.calls == 3
        assert metric(metrics, "edgecloud_circuit_breaker_open") == 1.0
        t0 = time.monotonic()
        for _ in range(5):  # open: no call reaches the cloud, answers are immediate
            with pytest.raises(CloudUnavailable) as info:
                client.infer("m", features(1.0))
            assert info.value.code == CIRCUIT_OPEN
        assert time.monotonic() - t0 < 0.2
        assert servicer.calls == 3
        assert metric(metrics, "edgecloud_cloud_failures_total", model="m", code=CIRCUIT_OPEN) == 5
        servicer.fail_always = False
        time.sleep(0.35)  # reset time passes: the next call is the half-open probe
        reply = client.infer("m", features(2.0))
        assert (reply.probs.argmax(axis=1) == 2).all()
        assert servicer.calls == 4
        assert client.breaker.state is BreakerState.CLOSED
        assert metric(metrics, "edgecloud_circuit_breaker_open") == 0.0
    finally:
        client.close()


def test_concurrent_offloads_share_cloud_calls_and_get_their_own_rows(cloud):
    server, servicer = cloud
    client, metrics = client_for(link(server.address, batching={
        "max_batch_size": 64, "max_queue_delay_ms": 80.0, "max_queue_size": 256}))
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = client.infer("m", features(float(i), k=i + 1), time_remaining=5.0).probs

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results) == list(range(6))
        for i, probs in results.items():
            assert probs.shape == (i + 1, CLASSES)
            assert (probs.argmax(axis=1) == i).all()
        assert sum(servicer.rows_per_call) == sum(range(1, 7))
        assert servicer.calls < 6  # batched into fewer cloud calls than callers
    finally:
        client.close()


def test_idle_link_calls_from_the_callers_thread_and_a_busy_one_batches(cloud):
    server, servicer = cloud
    client, _ = client_for(link(server.address, batching={
        "max_batch_size": 64, "max_queue_delay_ms": 0.0, "max_queue_size": 256}))
    callers: list[threading.Thread] = []
    real_call = client._call

    def spy(model, batch):
        callers.append(threading.current_thread())
        return real_call(model, batch)

    client._call = spy  # the batcher's fn looks it up on every batch
    try:
        # Idle link: the caller's own thread makes the call (no hand-off to the worker).
        probs = client.infer("m", features(3.0), time_remaining=5.0).probs
        assert (probs.argmax(axis=1) == 3).all()
        assert callers == [threading.current_thread()]

        # Busy link: offloads arriving during a call queue and go out together afterwards.
        servicer.hold = threading.Event()
        results: dict[int, np.ndarray] = {}

        def offload(i: int) -> None:
            results[i] = client.infer("m", features(float(i), k=1), time_remaining=5.0).probs

        first = threading.Thread(target=offload, args=(1,))
        first.start()
        assert servicer.entered.wait(5.0)
        later = [threading.Thread(target=offload, args=(i,)) for i in (2, 3, 4)]
        for t in later:
            t.start()
        batcher = client._batchers["m"]
        deadline = time.monotonic() + 5.0
        while batcher.depth < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert batcher.depth == 3
        servicer.hold.set()
        for t in [first, *later]:
            t.join(10)
        assert sorted(results) == [1, 2, 3, 4]
        for i, p in results.items():
            assert p.shape == (1, CLASSES) and p.argmax() == i
        assert servicer.rows_per_call == [2, 1, 3]  # the three queued offloads in one call
        assert callers[1] is not callers[2] and callers[2].name.startswith("batcher-")
    finally:
        servicer.hold = None
        client.close()


def test_cloud_down_fails_fast_without_wait_for_ready():
    server, _ = start_cloud()
    address = server.address
    server.stop(0)
    client, metrics = client_for(link(address, timeout_s=2.0, max_attempts=2))
    try:
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailable) as info:
            client.infer("m", features(1.0))
        assert info.value.code == "UNAVAILABLE" and not info.value.transmitted
        assert time.monotonic() - t0 < 1.0  # did not wait for the 2 s deadline
        assert metric(metrics, "edgecloud_offload_bytes_total", model="m") == 0
    finally:
        client.close()


def test_token_is_sent_and_a_wrong_one_is_a_failure():
    server, servicer = start_cloud(token="s3cret")
    good, _ = client_for(link(server.address, token="s3cret"))
    bad, bad_metrics = client_for(link(server.address, token="wrong"))
    try:
        assert good.infer("m", features(4.0)).probs.argmax(axis=1).tolist() == [4, 4]
        with pytest.raises(CloudUnavailable) as info:
            bad.infer("m", features(4.0))
        assert info.value.code == "UNAUTHENTICATED"
        assert metric(bad_metrics, "edgecloud_cloud_failures_total", model="m",
                      code="UNAUTHENTICATED") == 1
    finally:
        good.close()
        bad.close()
        server.stop(0.1)


def test_mutual_tls_link(tmp_path: Path):
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = TLSConfig(enabled=True, cert=pki.server_cert, key=pki.server_key,
                    client_ca=pki.ca, require_client_auth=True)
    server, _ = start_cloud(token="t0k", tls=tls)
    ok, _ = client_for(link(server.address, tls=True, ca=pki.ca, client_cert=pki.client_cert,
                            client_key=pki.client_key, token="t0k"))
    no_cert, _ = client_for(link(server.address, tls=True, ca=pki.ca, token="t0k", max_attempts=1))
    try:
        assert ok.infer("m", features(5.0)).probs.argmax(axis=1).tolist() == [5, 5]
        with pytest.raises(CloudUnavailable) as info:  # handshake refused: UNAVAILABLE
            no_cert.infer("m", features(5.0))
        assert info.value.code == "UNAVAILABLE"
    finally:
        ok.close()
        no_cert.close()
        server.stop(0.1)


def test_metrics_endpoint_shows_breaker_and_failures(cloud):
    server, servicer = cloud
    client, metrics = client_for(link(server.address, max_attempts=1, breaker_failures=1))
    port = metrics.serve(0)
    try:
        servicer.fail_next, servicer.fail_code = 1, grpc.StatusCode.INTERNAL
        with pytest.raises(CloudUnavailable):
            client.infer("m", features(1.0))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}
        assert values[("edgecloud_circuit_breaker_open", ())] == 1.0
        assert values[("edgecloud_cloud_failures_total", (("code", "INTERNAL"), ("model", "m")))] == 1
    finally:
        metrics.shutdown()
        client.close()
