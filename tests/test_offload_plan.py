"""``edgecloud offload plan`` and the energy baselines of ``edgecloud eval``.

On the seeded untrained ``tiny`` bundle (conftest) and seeded random images: the plan measures
bytes from the actual payloads and picks the fewest-bytes candidate that meets the agreement;
bad flags fail with a message naming the flag; ``--write-bundle`` writes a bundle the cloud
loads and ``eval`` runs; eval's JSON carries the all-cloud / all-device baselines and counts the
radio from the bytes actually sent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecloud import offload
from edgecloud.bundle import Bundle, ModelRepository
from edgecloud.cim.energy import EnergyTable
from edgecloud.cli import main
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.idx import write_idx
from edgecloud.edge.runner import EdgeRunner
from edgecloud.evaluate.plan import plan_offload

N = 48


def random_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tiny_repo: Path) -> Bundle:
    return ModelRepository(tiny_repo).get("tiny")


@pytest.fixture(scope="module")
def data(bundle) -> ImageDataset:
    images, labels = random_images(N, seed=21)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple(bundle.manifest.classes))


@pytest.fixture(scope="module")
def planned(bundle, data):
    return plan_offload(bundle, data, agreement=0.9, percentile=[99.99, 99.0], batch_size=16)


def test_plan_measures_every_candidate_from_its_payloads(bundle, data, planned):
    report, candidates = planned
    rows = {r["candidate"]: r for r in report["candidates"]}
    names = [c.name for c in candidates]
    assert names == [r["candidate"] for r in report["candidates"]]
    assert {"features/fp32", "features/fp16+zstd", "features/uint8+zstd@p99.99", "features/uint4@p99.99", "features/uint2+zstd@p99",
            "raw/uint8", "raw/uint8+zstd"} <= set(rows)
    assert 0 < report["offloaded"] < N and report["offload_share"] == report["offloaded"] / N
    elements = 8 * 7 * 7
    assert rows["features/fp32"]["bytes_mean"] == elements * 4 and rows["features/fp32"]["agreement"] == 1.0
    assert rows["features/uint4@p99"]["bytes_mean"] == elements // 2
    assert rows["raw/uint8"]["bytes_mean"] == 28 * 28 and rows["raw/uint8"]["cloud_macs"] > rows["features/fp32"]["cloud_macs"]
    # the raw input through the whole network answers as the features through the cloud part
    assert rows["raw/uint8"]["agreement"] == 1.0
    # bytes from the actual payloads: recompute one candidate independently
    runner = EdgeRunner(bundle, "digital")
    x = data.images.float().div(255.0).numpy()
    features = np.concatenate([runner.run(x[i:i + 16]).offload for i in range(0, N, 16)])
    spec = candidates[names.index("features/uint4+zstd@p99.99")].spec
    sent = offload.wire_bytes(offload.encode(features, spec), spec)
    assert rows["features/uint4+zstd@p99.99"]["bytes_mean"] == pytest.approx(sent.mean())
    radio_bit = EnergyTable.load().per_event("radio_bit")
    for r in rows.values():
        assert r["radio_j_per_offload"] == pytest.approx(r["bytes_mean"] * 8 * radio_bit, rel=1e-12)
        assert r["radio_j_per_inference"] == pytest.approx(r["radio_j_per_offload"] * report["offload_share"])
        assert r["bytes_min"] <= r["bytes_mean"] <= r["bytes_max"]


def test_plan_picks_the_fewest_bytes_that_meets_the_agreement(planned, bundle, data):
    report, _ = planned
    rows = report["candidates"]
    chosen = report["chosen_candidate"]
    assert chosen is not None and chosen["agreement"] >= 0.9 and report["chosen"] == chosen["candidate"]
    assert chosen["bytes_mean"] == min(r["bytes_mean"] for r in rows if r["agreement"] >= 0.9)
    assert all(r["meets"] == (r["agreement"] >= 0.9) for r in rows)
    strict, _ = plan_offload(bundle, data, agreement=1.0, encodings=["fp32", "uint4", "uint2"], raw=False,
                             batch_size=16)
    fewest = min(r["bytes_mean"] for r in strict["candidates"] if r["agreement"] >= 1.0)
    assert strict["chosen_candidate"]["bytes_mean"] == fewest
    loose, _ = plan_offload(bundle, data, agreement=1e-9, encodings=["fp32", "uint4", "uint2"], raw=False,
                            batch_size=16)
    assert loose["chosen"] == "features/uint2"  # everything meets: the fewest bytes of all


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped IDX folder: 400 train (~40 validation) and 40 test random images."""
    root = tmp_path_factory.mktemp("fmnist_plan")
    for prefix, n, seed in (("train", 400, 31), ("t10k", 40, 32)):
        images, labels = random_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def plan_args(tiny_repo: Path, root: Path, *extra: str) -> list[str]:
    return ["offload", "plan", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
            "--data-root", str(root), "--batch-size", "16", *extra]


@pytest.mark.parametrize("flags, flag", [
    (["--split", "test"], "--split"),
    (["--agreement", "1.5"], "--agreement"),
    (["--encodings", "uint8,uint3"], "--encodings"),
    (["--percentile", "30"], "--percentile"),
    (["--percentile", "x"], "--percentile"),
])
def test_bad_flags_fail_naming_the_flag(tiny_repo, fmnist_root, capsys, flags, flag):
    rc = main(plan_args(tiny_repo, fmnist_root, *flags))
    err = capsys.readouterr().err
    assert rc == 2 and flag in err, err


def test_missing_dataset_and_occupied_output_fail_naming_the_flag(tiny_repo, fmnist_root, tmp_path, capsys):
    rc = main(["offload", "plan", "tiny", "--repository", str(tiny_repo), "--data-root", str(fmnist_root)])
    assert rc == 2 and "--dataset" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    rc = main(plan_args(tiny_repo, fmnist_root, "--write-bundle", str(tmp_path / "taken")))
    assert rc == 2 and "--write-bundle" in capsys.readouterr().err


def test_cli_plan_table_csv_json_and_a_written_bundle_that_eval_runs(tiny_repo, fmnist_root, tmp_path, capsys):
    out_csv, out_dir = tmp_path / "plan.csv", tmp_path / "repo" / "tiny_plan"
    rc = main(plan_args(tiny_repo, fmnist_root, "--encodings", "fp32,uint8,uint4+zstd", "--no-raw",
                        "--agreement", "1e-9", "--percentile", "99.99", "--csv", str(out_csv), "--write-bundle", str(out_dir), "--json"))
    out = capsys.readouterr().out
    assert rc == 0 and "<- chosen" in out
    report = last_json(out)
    assert report["split"] == "val" and 35 <= report["samples"] <= 45  # the stratified 10 % hold-out
    assert report["chosen"] == "features/uint4+zstd" and report["written_bundle"] == str(out_dir)
    with out_csv.open() as fh:
        assert [r["candidate"] for r in csv.DictReader(fh)] == [r["candidate"] for r in report["candidates"]]
    written = Bundle(out_dir)
    assert written.name == "tiny_plan" and written.manifest.cloud.encoding == "uint4+zstd"
    assert "## Offload plan" in (out_dir / "README.md").read_text()

    # eval on the written bundle: baselines in the JSON, radio from the bytes actually sent
    rc = main(["eval", str(out_dir), "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
               "--limit", "24", "--batch-size", "8", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "all-cloud" in out and "all-device" in out
    ev = last_json(out)
    table = EnergyTable.load()
    radio_bit, mac = table.per_event("radio_bit"), table.per_event("mac_fp32")
    macs = written.manifest.reference_macs
    base = ev["baselines"]
    assert base["all_cloud"]["radio_j"] == pytest.approx(28 * 28 * 8 * radio_bit)
    assert base["all_cloud"]["cloud_j"] == pytest.approx(macs * mac) and base["all_cloud"]["edge_compute_j"] == 0
    assert base["all_device"]["total_j"] == pytest.approx(macs * mac) and base["all_device"]["radio_j"] == 0
    split = ev["summary"]["energy_split_j"]
    total = split["total"]["mean"]
    assert total == pytest.approx(split["edge_compute"]["mean"] + split["radio"]["mean"] + split["cloud"]["mean"])
    assert ev["summary"]["energy_vs_all_cloud"]["mean"] == pytest.approx(total / base["all_cloud"]["total_j"])
    assert ev["summary"]["energy_vs_all_device"]["mean"] == pytest.approx(total / base["all_device"]["total_j"])
    # the radio: every offloaded sample's own payload bytes x 8 x radio_bit
    from edgecloud.evaluate.source import load_eval_data

    data, _ = load_eval_data("fashion-mnist", "test", written.manifest, fmnist_root, limit=24)
    runner = EdgeRunner(written, "digital")
    sent = 0
    for i in range(0, 24, 8):
        edge = runner.run(data.images[i:i + 8].float().div(255.0).numpy())
        if edge.offload_index.size:
            sent += int(runner.wire_bytes(runner.encode_offload(edge.offload)).sum())
    assert sent > 0
    assert split["radio"]["mean"] == pytest.approx(sent * 8 * radio_bit / 24, rel=1e-9)
