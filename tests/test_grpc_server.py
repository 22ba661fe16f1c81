"""GrpcServer's RPC thread pool (LIFO hand-off) and in-flight counting on a live server."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from edgecloud.config import ServerConfig
from edgecloud.serving.grpc_server import GrpcServer, LifoThreadPool
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import pb, pb_grpc


def test_sequential_work_stays_on_the_most_recently_idle_thread():
    pool = LifoThreadPool(8, thread_name_prefix="t")
    gate = threading.Barrier(5)
    burst = [pool.submit(lambda: (gate.wait(5), threading.current_thread().name)[1]) for _ in range(5)]
    names = {f.result(5) for f in burst}
    assert len(names) == 5 and pool.threads == 5  # a burst grows the pool
    time.sleep(0.05)  # all five are idle again
    seq = [pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(20)]
    assert len(set(seq)) == 1 and pool.threads == 5  # light traffic: one warm thread, no new ones
    pool.shutdown()


def test_pool_bounds_threads_queues_the_rest_and_reports_errors():
    pool = LifoThreadPool(2)
    release = threading.Event()
    running = [pool.submit(release.wait, 5) for _ in range(2)]
    queued = [pool.submit(lambda i=i: i * i) for i in range(4)]
    time.sleep(0.05)
    assert pool.threads == 2 and not any(f.done() for f in queued)
    release.set()
    assert [f.result(5) for f in queued] == [0, 1, 4, 9] and all(f.result(5) for f in running)

    def boom():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        pool.submit(boom).result(5)
    assert pool.submit(lambda: 7).result(5) == 7  # the thread survived
    callback = threading.Event()
    pool.submit(lambda: None).add_done_callback(lambda _f: callback.set())  # what grpcio uses
    assert callback.wait(5)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(lambda: None)


class _Live(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.threads: list[str] = []

    def ServerLive(self, request, context):
        self.threads.append(threading.current_thread().name)
        return pb.ServerLiveResponse(live=True)


def test_live_server_counts_rpcs_and_reuses_one_thread_for_sequential_calls():
    servicer = _Live()
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, max_workers=4)
    with GrpcServer("edge", config, servicer, metrics=Metrics("edge"), out=open("/dev/null", "w")) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(10):
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
                time.sleep(0.02)  # the handler thread is back on the idle stack
        assert server.in_flight == 0
    assert len(servicer.threads) == 10
    assert isinstance(server._pool, LifoThreadPool)
    assert len(set(servicer.threads)) == 1  # sequential calls: one warm thread


def test_metric_children_are_looked_up_once_and_count_like_labels():
    metrics = Metrics("cloud")
    first = metrics.child("requests", "m", "OK")
    assert metrics.child("requests", "m", "OK") is first
    first.inc()
    metrics.requests.labels(model="m", status="OK").inc()
    assert metrics.registry.get_sample_value("edgecloud_requests_total", {"model": "m", "status": "OK"}) == 2.0
    assert metrics.child("requests", "m", "INTERNAL") is not first
