"""Research jobs on a real local Ray cluster (2 nodes): same results as a local run, bit for bit,
and a node removed mid-job costs time, not the result (edgecloud.distributed)."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'edgecloud[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

from edgecloud.distributed import ray_address, run_tasks  # noqa: E402
from test_robust import _config, bundle, cifar_root, trained  # noqa: E402,F401  (fixtures)

# the seeded job below travels to the Ray workers by value (this test module is not importable there)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def seeded_job(job: tuple[int, float]) -> dict:
    """A seeded job: its result depends only on its seed (optionally slow, to be caught mid-run)."""
    seed, sleep = job
    time.sleep(sleep)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return {"seed": seed, "values": np.random.default_rng(seed).normal(size=5).tolist(), "node": node}


def shared_job(job: int, shared: dict) -> float:
    return float(np.asarray(shared["x"])[job].sum())


@pytest.fixture(scope="module")
def cluster():
    before = os.environ.get("RAY_ADDRESS")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20,
                                                      "include_dashboard": False})
    worker = c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c, worker
    ray.shutdown()
    c.shutdown()
    # later tests in this process must not find the dead cluster through RAY_ADDRESS
    if before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = before


def test_ray_address_from_flag_or_environment(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) == "10.0.0.1:6379"
    assert ray_address("auto") == "auto"


def test_tasks_spread_over_both_nodes_and_equal_a_local_run(cluster) -> None:
    jobs = [(s, 0.3) for s in range(8)]
    local = run_tasks(seeded_job, [(s, 0.0) for s, _ in jobs], workers=1)
    remote = run_tasks(seeded_job, jobs, ray=cluster[0].address)
    assert [r["values"] for r in remote] == [r["values"] for r in local]  # in job order, bit for bit
    assert len({r["node"] for r in remote}) == 2
    shared = {"x": np.arange(12.0).reshape(4, 3)}
    assert run_tasks(shared_job, range(4), shared=shared, ray=cluster[0].address) == [3.0, 12.0, 21.0, 30.0]


def test_robust_grid_on_ray_equals_the_local_grid(cluster, bundle, cifar_root) -> None:
    from edgecloud.robust.runner import run_robustness

    # 4 jobs: each chip's clean row and its hardware-in-loop unit (the costly kind a cluster is for)
    kw = dict(attacks=["pgd"], eps=[16 / 255], threats=["hardware-in-loop"], chips=2, limit=10, calib_samples=10)
    local, _ = run_robustness(_config(bundle, cifar_root, **kw), progress=False)
    remote, info = run_robustness(_config(bundle, cifar_root, ray=cluster[0].address, **kw), progress=False)
    assert [r.__dict__ for r in remote] == [r.__dict__ for r in local]
    assert "ray" not in info["settings"]


def test_eval_chips_on_ray_and_in_a_pool_equal_the_sequential_run(cluster, tiny_repo) -> None:
    import torch

    from edgecloud.bundle import ModelRepository
    from edgecloud.data.dataset import ImageDataset
    from edgecloud.evaluate import EvalConfig, evaluate

    bundle = ModelRepository(tiny_repo).get("tiny")
    rng = np.random.default_rng(7)
    data = ImageDataset(torch.from_numpy(rng.integers(0, 256, (24, 1, 28, 28), dtype=np.uint8)),
                        torch.from_numpy(rng.integers(0, 10, 24).astype(np.int64)), tuple(bundle.manifest.classes))
    noisy = {"programming_noise": "proportional", "programming_sigma": 0.5, "read_noise": 0.05}

    def run(**kw):
        return evaluate(bundle, data, EvalConfig(progress=False, batch_size=8, chips=3, backend="crossbar",
                                                 backend_options=noisy, **kw))

    sequential = run()
    for other in (run(ray=cluster[0].address), run(workers=2)):
        assert other.per_chip == sequential.per_chip
        assert other.summary == sequential.summary
        assert all((a.pred == b.pred).all() for a, b in zip(other.tables, sequential.tables))
    assert len({str(c["accuracy"]) + str(c["energy_total_j"]) for c in sequential.per_chip}) > 1  # chips differ


def test_a_node_removed_mid_job_costs_time_not_the_result(cluster) -> None:
    """Last in this module: it leaves the cluster with the head node alone."""
    c, worker = cluster
    jobs = [(s, 1.0) for s in range(6)]
    local = run_tasks(seeded_job, [(s, 0.0) for s, _ in jobs], workers=1)
    timer = threading.Timer(1.5, c.remove_node, args=(worker,))
    timer.start()
    try:
        remote = run_tasks(seeded_job, jobs, ray=c.address)
    finally:
        timer.join()
    assert [r["values"] for r in remote] == [r["values"] for r in local]
    assert len(ray.nodes()) >= 2 and sum(1 for n in ray.nodes() if n["Alive"]) == 1
