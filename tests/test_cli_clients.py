"""The user-facing commands end to end: demo, infer, bench (real processes on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgecloud.procs import start_server


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecloud", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def servers(tiny_repo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("servers")
    repo = ["--repository", str(tiny_repo)]
    cloud = start_server("cloud", repo, workdir)
    edge = start_server("edge", [*repo, "--cloud", cloud.address], workdir)
    yield edge, cloud
    assert edge.stop() == 0
    assert cloud.stop() == 0


def test_demo_runs_end_to_end_and_reports(tiny_repo):
    done = _cli("demo", "--repository", str(tiny_repo), "--model", "tiny", "--samples", "60", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 60
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert sum(summary["exit_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert summary["energy_joules_per_inference"] > 0 and summary["energy_joules_all_cloud"] > 0
    assert summary["server_exit_codes"] == {"edge": 0, "cloud": 0}
    assert summary["errors"] == {}


def test_infer_reads_npy_and_images(servers, tmp_path):
    edge, _ = servers
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "three.npy", batch)
    Image.fromarray(batch[0]).save(tmp_path / "one.png")
    done = _cli("infer", "--address", edge.address, "--model", "tiny", "--json",
                str(tmp_path / "three.npy"), str(tmp_path / "one.png"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["input"] for r in rows] == ["three.npy[0]", "three.npy[1]", "three.npy[2]", "one.png"]
    # the PNG holds the same pixels as the first array row: same answer
    assert rows[3]["class_index"] == rows[0]["class_index"]
    assert all(r["energy_joules"] > 0 and 0 < r["confidence"] <= 1 for r in rows)
    table = _cli("infer", "--address", edge.address, "--model", "tiny", str(tmp_path / "one.png"))
    assert table.returncode == 0 and "one.png" in table.stdout


def test_infer_reports_bad_files_clearly(servers, tmp_path):
    edge, _ = servers
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5, 5), np.float32))
    done = _cli("infer", "--address", edge.address, "--model", "tiny", str(tmp_path / "wrong.npy"))
    assert done.returncode == 2
    assert "does not fit the model input" in done.stderr
    done = _cli("infer", "--address", edge.address, "--model", "tiny", str(tmp_path / "missing.png"))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_bench_json_counts_requests(servers):
    edge, _ = servers
    done = _cli("bench", "--address", edge.address, "--model", "tiny", "--requests", "40",
                "--concurrency", "4", "--batch-size", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 40 and summary["ok_requests"] == 40
    assert summary["samples"] == 80
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert sum(summary["exit_share"].values()) == pytest.approx(1.0, abs=1e-3)
