"""Online exit control in the edge daemon, end to end: real edge and cloud servers on 127.0.0.1
(the tiny bundle), the real ExitController.

Covers shadow sampling (samples reach the cloud, are counted in samples, bytes and energy; a slow
shadow path drops and counts instead of delaying answers), the Observations the controller gets
(disagreement of offloaded and shadowed rows), the admin API (GetControl, SetBudgets taking effect
without a restart, errors), unreachable budgets in GetControl and the metrics, per-request
``deadline_ms`` and ``tolerated_disagreement``, the ``offload_bytes`` response parameter, the
configuration and the CLI.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_edge import (
    FEATURE_BYTES,
    NULL,
    TIMEOUT,
    cloud_settings,
    code_of,
    edge_settings,
    infer,
    pixels,
    scrape,
    total,
)

from edgecloud import cli
from edgecloud.cloud.server import build_cloud_server
from edgecloud.config import ConfigError, load_settings
from edgecloud.edge.dataplane import default_controller_factory, policy_score
from edgecloud.edge.runner import EdgeRunner
from edgecloud.edge.server import build_edge_server, reload_thresholds
from edgecloud.protocol import admin_pb2, admin_pb2_grpc, pb_grpc

# Fast, deterministic control for tests: steps only when 32 samples were observed (a long timer),
# a small window, shadow every exited sample unless a test says otherwise.
FAST = {"min_samples": 16, "window": 400, "interval_s": 3600.0, "step_samples": 32,
        "shadow_min": 1.0, "shadow_max": 1.0, "seed": 0}


class Recorder:
    """The real controller, with what the data plane hands it recorded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.observed: list = []
        self.saturated = 0
        self.lock = threading.Lock()

    def observe(self, obs) -> None:
        with self.lock:
            self.observed.append(obs)
        self.inner.observe(obs)

    def on_cloud_saturated(self) -> None:
        self.saturated += 1
        self.inner.on_cloud_saturated()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def recording_factory(store: dict):
    def factory(kind, threshold, spec, runner):
        store[runner.name] = Recorder(default_controller_factory(kind, threshold, spec, runner))
        return store[runner.name]
    return factory


@pytest.fixture(scope="module")
def cloud(tiny_repo: Path):
    server = build_cloud_server(cloud_settings(tiny_repo))
    server.start()
    yield server
    server.stop(0.5)


def start(repo: Path, cloud_address: str | None, control: dict | None, *, store: dict | None = None,
          shadow_queue_size: int | None = None, **edge):
    settings = edge_settings(repo, cloud_address, control=control or {}, **edge)
    return build_edge_server(
        settings, out=NULL, controller_factory=recording_factory(store) if store is not None else None,
        shadow_queue_size=shadow_queue_size,
    ).start()


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def observed_samples(recorder: Recorder) -> int:
    with recorder.lock:
        return sum(len(o.score) for o in recorder.observed)


def get_control(admin, model: str = "tiny"):
    return admin.GetControl(admin_pb2.GetControlRequest(model=model), timeout=TIMEOUT).models[0]


def budget(state, name: str):
    return next(b for b in state.budgets if b.name == name)


# ---- shadow sampling ----------------------------------------------------------------------------
def test_shadow_samples_reach_the_cloud_and_are_counted(tiny_repo, cloud):
    store: dict = {}
    server = start(tiny_repo, cloud.address, {"tiny": {"agreement": 0.5, **FAST}}, store=store)
    cloud_before = total(scrape(cloud.metrics_port), "edgecloud_samples_total")
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            answers = [infer(stub, pixels(8, seed=s)) for s in range(6)]
        edge_samples = sum(p["edge_samples"] for _, p, _ in answers)
        cloud_samples = sum(p["cloud_samples"] for _, p, _ in answers)
        assert edge_samples > 0 and cloud_samples > 0
        for _, params, _ in answers:  # offload_bytes: this request's offloaded samples only
            assert params["offload_bytes"] == params["cloud_samples"] * FEATURE_BYTES
        recorder = store["tiny"]
        wait_for(lambda: observed_samples(recorder) == 48, what="observations")
        values = scrape(server.metrics_port)
        runner = server.servicer.models["tiny"].runner
    finally:
        server.stop(0.5)
    shadow_bytes = edge_samples * FEATURE_BYTES
    assert total(values, "edgecloud_shadow_samples_total", model="tiny") == edge_samples
    assert total(values, "edgecloud_shadow_dropped_total", model="tiny") == 0
    assert total(values, "edgecloud_shadow_bytes_total", model="tiny") == shadow_bytes
    assert total(values, "edgecloud_offload_bytes_total", model="tiny") == (
        cloud_samples * FEATURE_BYTES + shadow_bytes)  # every byte sent, shadows included
    assert total(values, "edgecloud_energy_joules_total", model="tiny", component="shadow_radio") == \
        pytest.approx(shadow_bytes * 8 * runner.radio_joules_per_bit, rel=1e-9)
    # answers' energy holds no shadow energy; the radio component only the answers' offloads
    assert total(values, "edgecloud_energy_joules_total", model="tiny", component="radio") == \
        pytest.approx(cloud_samples * FEATURE_BYTES * 8 * runner.radio_joules_per_bit, rel=1e-9)
    # the cloud saw the offloads and the shadows
    cloud_after = total(scrape(cloud.metrics_port), "edgecloud_samples_total")
    assert cloud_after - cloud_before == cloud_samples + edge_samples
    # the shadow rate, steps and agreement gauges were published (48 samples: one step)
    assert total(values, "edgecloud_shadow_rate", model="tiny") == pytest.approx(1.0)
    assert ("edgecloud_agreement", frozenset({("model", "tiny"), ("scope", "system"),
                                               ("stat", "lower_bound")})) in values
    assert total(values, "edgecloud_control_target", model="tiny", budget="agreement") == 0.5


def test_observations_carry_the_disagreement_of_offloaded_and_shadowed_rows(tiny_repo, cloud):
    store: dict = {}
    hold = {**FAST, "min_samples": 400}  # no threshold moves: the test re-runs the edge itself
    server = start(tiny_repo, cloud.address, {"tiny": {"agreement": 0.5, **hold}}, store=store)
    try:
        runner: EdgeRunner = server.servicer.models["tiny"].runner
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            recorder = store["tiny"]
            for seed in range(4):
                x = pixels(8, seed=100 + seed)
                outputs, params, _ = infer(stub, x)
                obs = wait_for(lambda: recorder.observed[seed] if len(recorder.observed) > seed else None,
                               what="the request's observation")
                # the truth, independently: the edge's own answer, and the cloud's for every sample
                # (exit_threshold 0: no entropy is < 0, so everything is offloaded)
                edge = runner.run(x)
                cloud_all, _, _ = infer(stub, x, parameters={"exit_threshold": 0.0})
                truth = (edge.probs.argmax(1) != cloud_all["class_index"]).astype(float)
                exited = edge.exit_index >= 0
                np.testing.assert_array_equal(obs.exited, exited)
                np.testing.assert_array_equal(obs.shadowed, exited)  # shadow rate 1
                np.testing.assert_allclose(obs.shadow_prob, 1.0)
                np.testing.assert_array_equal(obs.disagree, truth)  # offloaded and shadowed: known
                np.testing.assert_allclose(obs.score, policy_score("entropy", edge.probs), rtol=1e-5)
                # offloaded rows: the response's class is the cloud's
                np.testing.assert_array_equal(outputs["class_index"][~exited],
                                              cloud_all["class_index"][~exited])
                assert obs.sent_bytes.sum() == 8 * FEATURE_BYTES  # offloads + shadows: every row once
                assert np.all(obs.sent_bytes == FEATURE_BYTES)
                assert np.all(obs.compute_j > 0) and np.all(obs.radio_j > 0)
                assert np.all(obs.latency_s > 0)
                assert params["cloud_samples"] == int((~exited).sum())
    finally:
        server.stop(0.5)


def test_a_slow_shadow_path_drops_and_counts_and_never_delays_answers(tiny_repo, cloud):
    store: dict = {}
    server = start(tiny_repo, cloud.address, {"tiny": {"agreement": 0.5, **FAST}}, store=store,
                   shadow_queue_size=1)
    release = threading.Event()
    entered = threading.Event()
    runner = server.servicer.models["tiny"].runner
    original = runner.offload_for

    def stuck(x):  # the shadow worker hangs on the first shadow batch
        entered.set()
        release.wait(30.0)
        return original(x)

    runner.offload_for = stuck
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            exited = []
            slowest = 0.0
            for seed in range(8):
                t0 = time.perf_counter()
                _, params, _ = infer(stub, pixels(8, seed=200 + seed))
                slowest = max(slowest, time.perf_counter() - t0)
                exited.append(params["edge_samples"])
                if seed == 0:
                    assert entered.wait(TIMEOUT)
            assert slowest < 2.0  # the worker is stuck for 30 s; answers do not wait for it
            values = scrape(server.metrics_port)
            # request 0's shadows are in the worker, request 1's job waits in the queue (size 1),
            # every later request's shadows were dropped and counted
            assert total(values, "edgecloud_shadow_dropped_total", model="tiny") == sum(exited[2:])
            recorder = store["tiny"]
            later = [o for o in recorder.observed[:]]
            assert len(later) == 6  # the dropped ones were observed at once, their labels NaN
            for obs in later:
                assert np.all(np.isnan(obs.disagree[obs.shadowed]))
            release.set()
            wait_for(lambda: observed_samples(recorder) == 64, what="the held shadows")
            values = scrape(server.metrics_port)
            assert total(values, "edgecloud_shadow_samples_total", model="tiny") == sum(exited[:2])
    finally:
        release.set()
        runner.offload_for = original
        server.stop(0.5)


def test_cloud_saturation_is_reported_to_the_controller(tiny_repo):
    store: dict = {}
    # nothing listens there: the first failure opens the breaker, later calls are CIRCUIT_OPEN
    server = start(tiny_repo, "127.0.0.1:1", {"tiny": {"agreement": 0.5, **FAST}}, store=store,
                   cloud={"breaker_failures": 1, "max_attempts": 1})
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            reasons = [infer(stub, pixels(8, seed=300 + s))[1].get("degraded_reason") for s in range(4)]
            assert "CIRCUIT_OPEN" in reasons
            wait_for(lambda: store["tiny"].saturated >= reasons.count("CIRCUIT_OPEN"),
                     what="saturation reports")
            admin = admin_pb2_grpc.EdgeAdminStub(ch)
            state = wait_for(lambda: (lambda st: st if st.steps >= 1 else None)(get_control(admin)),
                             what="a step")  # 32 samples observed
            assert state.backoff
        assert total(scrape(server.metrics_port), "edgecloud_control_backoff", model="tiny") == 1
    finally:
        server.stop(0.5)


def test_the_timer_steps_the_controller(tiny_repo, cloud):
    server = start(tiny_repo, cloud.address,
                   {"tiny": {"agreement": 0.5, **FAST, "interval_s": 0.05, "step_samples": 0}})
    try:
        with grpc.insecure_channel(server.address) as ch:
            admin = admin_pb2_grpc.EdgeAdminStub(ch)
            wait_for(lambda: get_control(admin).steps >= 3, what="timer steps")
    finally:
        server.stop(0.5)


def test_the_score_shift_test_is_published_as_a_metric(tiny_repo, cloud, tmp_path):
    """estimator=profile with shift_alpha: the window's score-shift p-value reaches the metrics
    (the gauge shows whether the profile's validation labels are being pooled). The profile is
    the tiny model's own, on pixels drawn like the traffic's, so the scores have not moved far."""
    from edgecloud.control.profile import DisagreementProfile

    plain = start(tiny_repo, cloud.address, None)
    try:
        probs = plain.servicer.models["tiny"].runner.run(pixels(2000, seed=7)).probs
    finally:
        plain.stop(0.5)
    score = policy_score("entropy", probs)
    rng = np.random.default_rng(0)
    DisagreementProfile.fit("entropy", score, (rng.random(score.size) < 0.1).astype(float),
                            bins=10).save(tmp_path / "profile.json")
    store: dict = {}
    server = start(tiny_repo, cloud.address, {"tiny": {
        "agreement": 0.5, **FAST, "shadow_min": 0.1, "estimator": "profile",
        "profile": str(tmp_path / "profile.json"), "shift_alpha": 0.05}}, store=store)
    try:
        with grpc.insecure_channel(server.address) as ch:
            traffic(pb_grpc.GRPCInferenceServiceStub(ch), store["tiny"], 8, seed=40)
        shift_p = store["tiny"].inner.state().score_shift_p
        assert 1e-6 < shift_p <= 1.0, shift_p      # a mismatched profile gives ~1e-90
        values = scrape(server.metrics_port)
        assert any(n == "edgecloud_control_score_shift_p" for n, _ in values)
        assert total(values, "edgecloud_control_score_shift_p", model="tiny") == pytest.approx(shift_p)
    finally:
        server.stop(0.5)


# ---- the admin API ------------------------------------------------------------------------------
@pytest.fixture()
def controlled(tiny_repo, cloud):
    store: dict = {}
    server = start(tiny_repo, cloud.address, {"tiny": {"agreement": 0.5, **FAST}}, store=store)
    ch = grpc.insecure_channel(server.address)
    yield server, pb_grpc.GRPCInferenceServiceStub(ch), admin_pb2_grpc.EdgeAdminStub(ch), store
    ch.close()
    server.stop(0.5)


def traffic(stub, recorder, n_requests: int, seed: int) -> None:
    """Requests of 16 samples; returns once all are observed and the steps they cause are done
    (FAST steps after every 32 observed samples, and only then)."""
    before = observed_samples(recorder)
    for s in range(n_requests):
        infer(stub, pixels(16, seed=seed + s))
    expected = before + 16 * n_requests
    wait_for(lambda: observed_samples(recorder) == expected, what="observations")
    wait_for(lambda: recorder.inner.state().steps == expected // FAST["step_samples"], what="steps")


def test_budget_change_through_the_admin_api_takes_effect_without_a_restart(controlled):
    server, stub, admin, store = controlled
    state = get_control(admin)
    assert state.model == "tiny" and state.exit_index == 0 and state.exit_name == "edge"
    assert state.policy == "entropy" and state.targets.agreement == pytest.approx(0.5)
    initial = state.threshold

    response = admin.SetBudgets(admin_pb2.SetBudgetsRequest(
        model="tiny", budgets=admin_pb2.Budgets(agreement=0.999)), timeout=TIMEOUT)
    assert response.model.targets.agreement == pytest.approx(0.999)
    assert get_control(admin).targets.agreement == pytest.approx(0.999)
    values = scrape(server.metrics_port)
    assert total(values, "edgecloud_control_target", model="tiny", budget="agreement") == \
        pytest.approx(0.999)

    traffic(stub, store["tiny"], 8, seed=400)  # 128 samples: steps at every 32
    state = get_control(admin)
    assert state.steps >= 1
    # an untrained edge agrees with the cloud far less than 99.9 %: the controller offloads more
    assert state.threshold < initial
    threshold_gauge = total(scrape(server.metrics_port), "edgecloud_exit_threshold", model="tiny",
                            exit="edge")
    assert threshold_gauge == pytest.approx(state.threshold)
    assert server.servicer.models["tiny"].runner.thresholds()[0] == pytest.approx(state.threshold)


def test_unreachable_budget_shows_in_get_control_and_the_metrics(controlled):
    server, stub, admin, store = controlled
    admin.SetBudgets(admin_pb2.SetBudgetsRequest(   # far below the edge's own compute energy
        model="tiny", budgets=admin_pb2.Budgets(energy_j=1e-15), clear=["agreement"]), timeout=TIMEOUT)
    traffic(stub, store["tiny"], 4, seed=500)
    state = get_control(admin)
    assert not state.HasField("targets") or not state.targets.HasField("agreement")
    energy = budget(state, "energy")
    assert energy.target == pytest.approx(1e-15)
    assert not energy.met and not energy.reachable
    assert energy.value > 1e-15
    values = scrape(server.metrics_port)
    assert total(values, "edgecloud_control_violation", model="tiny", budget="energy") == 1
    assert total(values, "edgecloud_control_unreachable", model="tiny", budget="energy") == 1
    assert total(values, "edgecloud_control_value", model="tiny", budget="energy") == \
        pytest.approx(energy.value)
    # the cleared agreement budget left the gauges
    assert not any(n == "edgecloud_control_target" and ("budget", "agreement") in ls
                   for n, ls in values)
    assert total(values, "edgecloud_control_backoff", model="tiny") == 0


def test_admin_control_errors(controlled, tiny_repo, cloud):
    server, _stub, admin, _store = controlled

    def set_budgets(**kw):
        clear = kw.pop("clear", [])
        return lambda: admin.SetBudgets(admin_pb2.SetBudgetsRequest(
            model=kw.pop("model", "tiny"), budgets=admin_pb2.Budgets(**kw), clear=clear), timeout=TIMEOUT)

    for kw, needle in (({"agreement": 1.5}, "agreement"), ({"delta": 0.0}, "delta"),
                       ({"energy_j": -1.0}, "energy_j"), ({"p99_latency_ms": 0.0}, "p99_latency_ms"),
                       ({"uplink_bytes_s": math.nan}, "uplink_bytes_s"),
                       ({"priority": ["speed"]}, "priority"), ({"clear": ["speed"]}, "speed"),
                       ({}, "nothing to change")):
        code, details = code_of(set_budgets(**kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw, details)
        assert needle in details, (kw, details)
    code, details = code_of(set_budgets(model="nope", agreement=0.9))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = code_of(lambda: admin.GetControl(admin_pb2.GetControlRequest(model="nope"),
                                                     timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND
    # the controller owns exit 0's threshold
    code, details = code_of(lambda: admin.SetThreshold(
        admin_pb2.SetThresholdRequest(model="tiny", exit_index=0, value=0.5), timeout=TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "SetBudgets" in details
    # GetControl with no model lists every controlled model
    assert [m.model for m in admin.GetControl(admin_pb2.GetControlRequest(), timeout=TIMEOUT).models] == ["tiny"]

    plain = start(tiny_repo, cloud.address, None)  # serves tiny without a controller
    try:
        with grpc.insecure_channel(plain.address) as ch:
            stub = admin_pb2_grpc.EdgeAdminStub(ch)
            code, details = code_of(lambda: stub.SetBudgets(admin_pb2.SetBudgetsRequest(
                model="tiny", budgets=admin_pb2.Budgets(agreement=0.9)), timeout=TIMEOUT))
            assert code == grpc.StatusCode.NOT_FOUND and "no controller" in details
            assert len(stub.GetControl(admin_pb2.GetControlRequest(), timeout=TIMEOUT).models) == 0
    finally:
        plain.stop(0.5)


# ---- per-request parameters ---------------------------------------------------------------------
def test_deadline_parameter(tiny_repo, cloud, controlled):
    server, stub, _admin, _store = controlled
    x = pixels(16, seed=600)
    _, roomy, _ = infer(stub, x, parameters={"deadline_ms": 5000.0})
    assert roomy["cloud_samples"] > 0 and not roomy["degraded"]
    assert roomy["offload_bytes"] == roomy["cloud_samples"] * FEATURE_BYTES
    # a deadline that is gone once the edge has run: the best edge exit answers, marked
    outputs, tight, _ = infer(stub, x, parameters={"deadline_ms": 0.001})
    assert tight["degraded"] and tight["degraded_reason"] == "DEADLINE"
    assert tight["degraded_samples"] == roomy["cloud_samples"] and tight["cloud_samples"] == 0
    assert tight["offload_bytes"] == 0
    assert outputs["exit_index"].max() == 0  # every answer is the edge's
    _, ints, _ = infer(stub, x, parameters={"deadline_ms": 5000})  # an int64 is a number too
    assert not ints["degraded"]
    # recent round trips (here: said to take 10 s) that do not fit the deadline: no cloud call
    model = server.servicer.models["tiny"]
    for _ in range(40):
        model.record_round_trip(10.0)
    _, late, _ = infer(stub, x, parameters={"deadline_ms": 5000.0})
    assert late["degraded_reason"] == "DEADLINE" and late["offload_bytes"] == 0
    _, free, _ = infer(stub, x)  # without deadline_ms the estimate plays no part
    assert not free["degraded"] and free["cloud_samples"] > 0
    for bad in ("soon", -5.0, 0.0, math.inf, True):
        code, details = code_of(lambda b=bad: infer(stub, x, parameters={"deadline_ms": b}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, details)
        assert "deadline_ms" in details


def test_tolerated_disagreement_parameter(tiny_repo, cloud, controlled):
    _server, stub, _admin, store = controlled
    traffic(stub, store["tiny"], 4, seed=700)  # data in the window for threshold_for
    x = pixels(16, seed=750)
    _, strict, _ = infer(stub, x, parameters={"tolerated_disagreement": 0.0})
    _, loose, _ = infer(stub, x, parameters={"tolerated_disagreement": 0.9})
    assert strict["cloud_samples"] >= loose["cloud_samples"]
    assert strict["cloud_samples"] + strict["edge_samples"] == 16
    for bad, needle in (("half", "tolerated_disagreement"), (1.5, "tolerated_disagreement"),
                        (-0.1, "tolerated_disagreement"), (math.nan, "tolerated_disagreement")):
        code, details = code_of(lambda b=bad: infer(stub, x, parameters={"tolerated_disagreement": b}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, (bad, details)
    code, details = code_of(lambda: infer(
        stub, x, parameters={"tolerated_disagreement": 0.1, "exit_threshold": 0.5}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "give one of them" in details

    plain = start(tiny_repo, cloud.address, None)
    try:
        with grpc.insecure_channel(plain.address) as ch:
            code, details = code_of(lambda: infer(pb_grpc.GRPCInferenceServiceStub(ch), x,
                                                  parameters={"tolerated_disagreement": 0.1}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "tolerated_disagreement" in details and "no controller" in details
    finally:
        plain.stop(0.5)


# ---- configuration and CLI ----------------------------------------------------------------------
def test_control_configuration_errors_name_the_key(tiny_repo, cloud):
    for tree, needle in (({"agreement": 1.5}, "edge.control.tiny.agreement"),
                         ({"delta": 1.0}, "edge.control.tiny.delta"),
                         ({"p99_latency_ms": -1}, "edge.control.tiny.p99_latency_ms"),
                         ({"window": 0}, "edge.control.tiny.window"),
                         ({"priority": ["agreement", "speed"]}, "edge.control.tiny.priority"),
                         ({"shadow_min": 0.5, "shadow_max": 0.1}, "shadow_min"),
                         ({"bound": "hoeffding"}, "edge.control.tiny.bound"),
                         ({"agreemnt": 0.9}, "edge.control.tiny.agreemnt")):
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_settings(None, {"edge": {"control": {"tiny": tree}}})
    with pytest.raises(ValueError, match=r"edge\.control names unknown model\(s\) \['nope'\]"):
        build_edge_server(edge_settings(tiny_repo, cloud.address, control={"nope": {"agreement": 0.9}}),
                          out=NULL)
    with pytest.raises(ValueError, match=r"edge\.control\.tiny\.exit_index: exit 3 does not exist"):
        build_edge_server(edge_settings(tiny_repo, cloud.address,
                                        control={"tiny": {"agreement": 0.9, "exit_index": 3}}), out=NULL)
    with pytest.raises(ValueError, match="needs a cloud"):
        build_edge_server(edge_settings(tiny_repo, None, control={"tiny": {"agreement": 0.9}}), out=NULL)
    with pytest.raises(ValueError, match="--target-agreement must lie in"):
        build_edge_server(edge_settings(tiny_repo, cloud.address), out=NULL, target_agreement=1.5)


def test_target_agreement_flag_controls_every_gated_model(tiny_repo, cloud):
    server = build_edge_server(edge_settings(tiny_repo, cloud.address), out=NULL,
                               target_agreement=0.8).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            state = get_control(admin_pb2_grpc.EdgeAdminStub(ch))
        assert state.targets.agreement == pytest.approx(0.8)
        assert state.targets.delta == pytest.approx(0.05)
    finally:
        server.stop(0.5)
    args = cli.build_parser().parse_args(["edge", "serve", "--target-agreement", "0.9"])
    assert args.target_agreement == 0.9


def test_cli_budgets_shows_and_changes_budgets(controlled, capsys):
    server, _stub, _admin, _store = controlled
    assert cli.main(["edge", "budgets", "--address", server.address, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["model"] == "tiny" and rows[0]["targets"]["agreement"] == pytest.approx(0.5)
    assert cli.main(["edge", "budgets", "--address", server.address, "--model", "tiny",
                     "--agreement", "0.7", "--p99-latency-ms", "250", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["targets"]["agreement"] == pytest.approx(0.7)
    assert row["targets"]["p99_latency_ms"] == pytest.approx(250.0)
    assert cli.main(["edge", "budgets", "--address", server.address, "--model", "tiny",
                     "--agreement", "2"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert cli.main(["edge", "budgets", "--address", server.address]) == 0
    assert "tiny exit 0:edge (entropy)" in capsys.readouterr().out


def test_sighup_reload_leaves_the_controlled_threshold_to_the_controller(controlled, tmp_path):
    server, _stub, admin, _store = controlled
    runner = server.servicer.models["tiny"].runner
    before = runner.thresholds()[0]
    config = tmp_path / "edge.yaml"
    config.write_text("edge:\n  thresholds:\n    tiny: [0.123]\n")
    reload_thresholds(server, config)
    assert runner.thresholds()[0] == before
    assert get_control(admin).threshold == pytest.approx(before)
