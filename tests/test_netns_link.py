"""Edge and cloud on two hosts of a real network (Linux network namespaces), end to end.

Why: loopback has no latency, no bandwidth limit and never fails; the edge's cloud link
(deadlines, retries, breaker, degraded answers, offload byte counts) only meets those on a
network. This module builds one per run (``edgecloud.netlab``) and measures the served
system on it:

    root ns: this test (client)        EDGE ns                         CLOUD ns
      lan 10.A.B.1/30 ---veth--- lan0 10.A.B.2/30
                                 edge daemon :8001, /metrics :9001
                                 wan0 10.A.B.5/30 ---veth--- wan0 10.A.B.6/30
                                 tbf 10mbit (uplink)          tbf 10mbit (downlink)
                                                              relay :8100, 20 ms each way
                                                              -> cloud server 127.0.0.1:8101

The kernel has no ``tc netem``: the 40 ms RTT comes from ``edgecloud.netlink_relay`` (a
userspace TCP relay in the cloud host), the rate limit from ``tbf`` on both ends of the WAN
link. Outages: the WAN link taken down (``ip link set down``: a black hole, calls end by
their deadline) and the relay refusing connections (calls fail at once).

Timing is asserted only as lower bounds from physics (RTT, rate), as eventual states with
generous waits, and as deadlines with several-fold margins; never "faster than". Measured numbers are printed (``pytest -rP`` shows them) and
written as JSON to ``$EDGECLOUD_NETNS_REPORT`` when that is set. Skips, with the reason,
where namespaces cannot be made (not root, no ``ip``/``tc``, no netns/veth/tbf support).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.netlab import (
    Lab,
    LinkSpec,
    NetnsUnavailable,
    Samples,
    metric,
    skip_reason,
    sweep_stale_namespaces,
)

# The link: what the test configures, and what physics then guarantees.
LINK = LinkSpec(rtt_ms=40.0, rate_mbit=10.0, burst_bytes=32 * 1024, tbf_latency_ms=100.0)
ONE_WAY_DELAY_MS = LINK.one_way_delay_ms  # relay delay, each direction (20 ms)
RTT_S = LINK.rtt_s                        # a request/answer through the relay takes at least this
RATE_BIT_S = LINK.rate_bit_s              # tbf rate (tc's "10mbit" = 10^7 bit/s)
BURST_BYTES = LINK.burst_bytes            # tbf burst ("32kb" = 32 KiB): the most it sends above rate

# The edge's cloud link, as configured for this network.
LINK_TIMEOUT_S = 1.5      # per-call deadline: a 128-sample offload (200 kB) needs ~0.2 s at 10 Mbit/s
BREAKER_FAILURES = 2
BREAKER_RESET_S = 1.0
CLIENT_DEADLINE_S = 4.0   # what clients give each request during outages

FEATURE_BYTES = 8 * 7 * 7 * 4  # tiny's offloaded feature map per sample, [8, 7, 7] float32

REPORT: dict[str, Any] = {}


def start_servers(lab: Lab, repo: Path) -> None:
    """Cloud server, relay and edge daemon on the untrained ``tiny`` bundle, every sample
    offloaded, the edge's cloud link set for this network."""
    lab.start_servers(
        cloud={"repository": str(repo), "models": ["tiny"],
               "intra_op_threads": 1, "allow_spinning": False,
               "server": {"shutdown_grace_s": 0.5},
               "batching": {"max_queue_delay_ms": 1.0}},
        edge={"repository": str(repo), "models": ["tiny"],
              "thresholds": {"tiny": [0.0]},  # entropy < 0 never: every sample is offloaded
              "server": {"shutdown_grace_s": 0.5},
              "batching": {"max_queue_delay_ms": 1.0, "max_request_batch": 256},
              "cloud": {"timeout_s": LINK_TIMEOUT_S,
                        "breaker_failures": BREAKER_FAILURES, "breaker_reset_s": BREAKER_RESET_S,
                        "initial_backoff_s": 0.05, "max_backoff_s": 0.2}},
    )


# ---- client side ----------------------------------------------------------------------------
@dataclass
class Answer:
    ok: bool
    degraded: bool
    reason: str
    latency_s: float
    cloud_latency_ms: float
    n: int
    error: str = ""


class EdgeClient:
    """gRPC to the edge daemon across the client's link (proxies off: the target is ours)."""

    def __init__(self, address: str) -> None:
        import grpc

        from edgecloud.protocol import pb_grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        from edgecloud.protocol import pb

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.stub.ServerReady(pb.ServerReadyRequest(), timeout=2.0).ready:
                    return
            except self._grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def infer(self, n: int, timeout_s: float, seed: int = 0) -> Answer:
        """One request of ``n`` uint8 images; never raises (a gRPC error is a not-ok Answer)."""
        from edgecloud.protocol import codec

        x = np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        request = codec.encode_request("tiny", {"INPUT": x})
        start = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=timeout_s)
        except self._grpc.RpcError as exc:
            return Answer(False, False, "", time.perf_counter() - start, 0.0, n,
                          f"{exc.code().name}: {exc.details()}")
        latency = time.perf_counter() - start
        params = codec.read_parameters(response.parameters)
        return Answer(True, bool(params["degraded"]), str(params.get("degraded_reason", "")),
                      latency, float(params["cloud_latency_ms"]), n)

    def close(self) -> None:
        self.channel.close()


def scrape(lab: Lab) -> Samples:
    """The edge daemon's /metrics, across the client's link, without any proxy."""
    return lab.edge_metrics()


def breaker(lab: Lab) -> float:
    return metric(scrape(lab), "edgecloud_circuit_breaker_open")


def from_cloud(client: EdgeClient) -> bool:
    """Does a one-sample request come back answered by the cloud (not degraded)?"""
    answer = client.infer(1, 30)
    return answer.ok and not answer.degraded


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Poll until ``condition()``; returns the seconds it took; fails naming ``what``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


def report(section: str, **numbers: Any) -> None:
    """Keep a measured number for the printout and $EDGECLOUD_NETNS_REPORT."""
    REPORT.setdefault(section, {}).update(numbers)
    print(f"netns-link {section}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def load(client: EdgeClient, stop: threading.Event, workers: int, n: int) -> list[Answer]:
    """Requests from ``workers`` threads, back to back, until ``stop``; every answer kept."""
    answers: list[Answer] = []

    def worker(seed: int) -> None:
        while not stop.is_set():
            answers.append(client.infer(n, CLIENT_DEADLINE_S, seed=seed))
            seed += workers

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(60)
    return answers


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    sweep_stale_namespaces()
    lab = Lab(tmp_path_factory.mktemp("netns"), LINK)
    try:
        try:
            lab.build_network()
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        started = time.monotonic()
        start_servers(lab, tiny_repo)
        report("setup", servers_ready_s=round(time.monotonic() - started, 1), subnet=str(lab.subnet))
        yield lab
    finally:
        lab.destroy()
        if REPORT and os.environ.get("EDGECLOUD_NETNS_REPORT"):
            Path(os.environ["EDGECLOUD_NETNS_REPORT"]).write_text(json.dumps(REPORT, indent=1))


@pytest.fixture(scope="module")
def client(lab: Lab) -> Iterator[EdgeClient]:
    client = EdgeClient(lab.edge_address)
    client.wait_ready(60)
    # The first offload opens the edge->cloud connection; wait until the cloud answers.
    wait_for(lambda: from_cloud(client), 60, "a first answer from the cloud")
    yield client
    client.close()


@pytest.fixture()
def healthy(lab: Lab, client: EdgeClient) -> EdgeClient:
    """Each test starts on a working link: WAN and relay up, breaker closed."""
    lab.set_wan(True)
    lab.set_relay(True)
    wait_for(lambda: from_cloud(client) and breaker(lab) == 0.0, 60,
             "breaker closed and the cloud answering")
    return client


# ---- tests ----------------------------------------------------------------------------------
def test_offload_round_trip_is_at_least_the_link_rtt(lab: Lab, healthy: EdgeClient):
    before = scrape(lab)
    answers = [healthy.infer(1, 30, seed=i) for i in range(12)]
    after = scrape(lab)
    assert all(a.ok and not a.degraded for a in answers), answers
    cloud_ms = np.array([a.cloud_latency_ms for a in answers])
    # Physics: the request waits 20 ms in the relay on the way up, the answer 20 ms down.
    assert cloud_ms.min() >= RTT_S * 1000.0, cloud_ms
    client_ms = np.array([a.latency_s * 1000.0 for a in answers])
    assert (client_ms >= cloud_ms).all()
    # The edge's own histogram agrees: no round trip in a bucket below the RTT.
    hist = "edgecloud_request_duration_seconds_bucket"
    fast = metric(after, hist, stage="cloud_round_trip", le="0.025") - metric(
        before, hist, stage="cloud_round_trip", le="0.025")
    count = metric(after, "edgecloud_request_duration_seconds_count", stage="cloud_round_trip") - metric(
        before, "edgecloud_request_duration_seconds_count", stage="cloud_round_trip")
    assert count == len(answers) and fast == 0
    report("rtt", configured_rtt_ms=RTT_S * 1000, offload_round_trip_ms_min=round(float(cloud_ms.min()), 1),
           offload_round_trip_ms_median=round(float(np.median(cloud_ms)), 1),
           offload_round_trip_ms_max=round(float(cloud_ms.max()), 1),
           client_latency_ms_median=round(float(np.median(client_ms)), 1))


def test_offload_throughput_is_bounded_by_the_tbf_rate_and_bytes_agree(lab: Lab, healthy: EdgeClient):
    # 32 x 64 x 1568 B = 3.2 MB, >= 2.6 s at 10 Mbit/s. Two clients keep the link busy; one
    # 100 kB offload takes ~0.1 s on the wire, so one waiting behind another stays far inside
    # its 1.5 s link deadline even on a loaded machine.
    requests, batch, workers = 32, 64, 2
    # The window brackets every snapshot, so it bounds what they count. Upstream, tbf counts a
    # byte before the relay can read it: tbf snapshots first at the start, last at the end.
    t0 = time.monotonic()
    (up0, over0), (down0, _) = lab.tbf(lab.edge_ns), lab.tbf(lab.cloud_ns)
    m0, r0 = scrape(lab), lab.relay_stats()
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda i: healthy.infer(batch, 60, seed=i), range(requests)))
    elapsed = time.monotonic() - start
    m1, r1 = scrape(lab), lab.relay_stats()
    (up1, over1), (down1, _) = lab.tbf(lab.edge_ns), lab.tbf(lab.cloud_ns)
    window = time.monotonic() - t0

    assert all(a.ok for a in answers), [a.error for a in answers if not a.ok]
    assert not any(a.degraded for a in answers), [a.reason for a in answers if a.degraded]
    offload = metric(m1, "edgecloud_offload_bytes_total", model="tiny") - metric(
        m0, "edgecloud_offload_bytes_total", model="tiny")
    relay_up = r1["up_bytes"] - r0["up_bytes"]
    relay_down = r1["down_bytes"] - r0["down_bytes"]
    tc_up, tc_down = up1 - up0, down1 - down0
    assert offload == requests * batch * FEATURE_BYTES  # every sample offloaded, fp32
    # The metric counts tensor bytes; the relay saw them plus gRPC/HTTP/2 framing (message
    # headers, HEADERS frames, 9 B per <=16 KiB DATA frame, pings, window updates), and tbf
    # saw that plus TCP/IP/Ethernet headers and any retransmits.
    overhead = relay_up - offload
    assert 0 < overhead <= 0.02 * offload + 4096 * requests, (relay_up, offload)
    assert relay_up <= tc_up  # (downstream the relay reads before tbf sends: not comparable)
    # Physics: a token bucket never lets more than burst + rate x time through.
    limit = BURST_BYTES + RATE_BIT_S / 8 * window
    assert tc_up <= 1.01 * limit, (tc_up, limit, window)
    assert over1 > over0  # the bucket did hold packets back: the limit was reached, not idle
    assert offload * 8 / elapsed <= RATE_BIT_S * 1.01 + BURST_BYTES * 8 / elapsed
    report("throughput", requests=requests, samples_per_request=batch, elapsed_s=round(elapsed, 2),
           offload_bytes_metric=int(offload), relay_up_bytes=relay_up, tbf_up_bytes=tc_up,
           relay_down_bytes=relay_down, tbf_down_bytes=tc_down,
           framing_overhead_pct=round(100 * overhead / offload, 3),
           offload_goodput_mbit_s=round(offload * 8 / elapsed / 1e6, 2),
           wire_up_mbit_s=round(tc_up * 8 / window / 1e6, 2), tbf_rate_mbit_s=RATE_BIT_S / 1e6,
           tbf_up_overlimits=over1 - over0)


def _outage(lab: Lab, client: EdgeClient, take_down: Callable[[], None], bring_up: Callable[[], None],
            section: str, failing_code: str) -> None:
    """Under load: link down -> every answer degraded, in time, breaker opens; link up ->
    breaker closes, answers come from the cloud again. ``failing_code``: how the calls that
    open the breaker fail on this kind of outage."""
    failures0 = scrape(lab)
    take_down()
    down_at = time.monotonic()
    stop = threading.Event()
    answers: list[Answer] = []
    loader = threading.Thread(target=lambda: answers.extend(load(client, stop, 2, 4)), daemon=True)
    loader.start()
    try:
        opened_s = wait_for(lambda: breaker(lab) == 1.0, 30, "circuit breaker open (gauge 1)", 0.05)
        time.sleep(1.5)  # answers while open: degraded at once, the half-open probe fails
    finally:
        stop.set()
        loader.join(60)
    after = scrape(lab)
    assert answers and all(a.ok for a in answers), Counter(a.error for a in answers if not a.ok)
    assert all(a.degraded for a in answers), "an answer from the cloud while its link was down"
    reasons = Counter(a.reason for a in answers)
    open_refusals = metric(after, "edgecloud_cloud_failures_total", code="CIRCUIT_OPEN") - metric(
        failures0, "edgecloud_cloud_failures_total", code="CIRCUIT_OPEN")
    assert reasons["CIRCUIT_OPEN"] > 0 and open_refusals > 0
    assert reasons[failing_code] > 0 and set(reasons) <= {failing_code, "CIRCUIT_OPEN"}, reasons
    latencies = np.array([a.latency_s for a in answers])
    assert latencies.max() < CLIENT_DEADLINE_S  # implied by ok; the number is reported

    bring_up()
    up_at = time.monotonic()
    closed_s = wait_for(lambda: from_cloud(client) and breaker(lab) == 0.0, 60,
                        "breaker closed and answers from the cloud after the link came back")
    after_up = [client.infer(4, 30, seed=100 + i) for i in range(5)]
    assert all(a.ok and not a.degraded for a in after_up), after_up
    assert breaker(lab) == 0.0
    report(section, requests_during_outage=len(answers), degraded=len(answers),
           reasons=dict(reasons), breaker_open_after_s=round(opened_s, 2),
           latency_ms_median=round(float(np.median(latencies)) * 1000, 1),
           latency_ms_max=round(float(latencies.max()) * 1000, 1),
           outage_s=round(up_at - down_at, 1), breaker_closed_after_up_s=round(closed_s, 2))


def test_wan_link_down_degrades_within_deadlines_then_recovers(lab: Lab, healthy: EdgeClient):
    """A black hole (interface down): calls in flight end by their deadline, not by an error."""
    _outage(lab, healthy, lambda: lab.set_wan(False), lambda: lab.set_wan(True), "wan_down",
            "DEADLINE_EXCEEDED")


def test_cloud_refusing_connections_degrades_at_once_then_recovers(lab: Lab, healthy: EdgeClient):
    """The relay resets the connection and refuses new ones: calls fail fast (UNAVAILABLE)."""
    _outage(lab, healthy, lambda: lab.set_relay(False), lambda: lab.set_relay(True), "relay_refuses",
            "UNAVAILABLE")
