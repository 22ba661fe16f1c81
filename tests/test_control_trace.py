"""edgecloud.control.trace: deterministic drifting streams, windowing, the hindsight oracle, and
one small run of benchmarks/controller.py against real servers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgecloud.control import trace
from tests.control_data import BUNDLE, CIFAR, REPO_ROOT, needs_cifar_bundle



def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 10
    return images, labels


SPEC = trace.TraceSpec((
    trace.Segment("clean", 120),
    trace.Segment("noise", 80, sigma=0.08),
    trace.Segment("blur", 60, blur=1.0),
    trace.Segment("classes", 90, classes=(2, 3, 4)),
    trace.Segment("slowdown", 50, delay_ms=30.0),
    trace.Segment("noise", 40, sigma=0.1, ramp=20),
), seed=7)


# ---- the stream ------------------------------------------------------------------------------
def test_same_spec_and_seed_give_identical_bytes():
    images, labels = _data()
    a = trace.build_stream(SPEC, images, labels)
    b = trace.build_stream(trace.TraceSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))),
                           images.copy(), labels.copy())
    assert a.images.dtype == np.uint8 and a.images.shape == (SPEC.length, 3, 8, 8)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.source_index, b.source_index)
    assert np.array_equal(a.labels, b.labels)


def test_another_seed_gives_another_stream():
    images, labels = _data()
    a = trace.build_stream(SPEC, images, labels)
    other = trace.TraceSpec(SPEC.segments, seed=8)
    b = trace.build_stream(other, images, labels)
    assert a.images.tobytes() != b.images.tobytes()
    assert not np.array_equal(a.source_index, b.source_index)


def test_segments_have_their_lengths_kinds_and_effects():
    images, labels = _data()
    stream = trace.build_stream(SPEC, images, labels)
    bounds = SPEC.bounds()
    assert bounds[0] == (0, 120) and bounds[-1][1] == SPEC.length == len(stream) == 440
    for i, ((start, stop), seg) in enumerate(zip(bounds, SPEC.segments)):
        assert stop - start == seg.length
        assert (stream.segment[start:stop] == i).all()
        assert stream.segment_at(start).kind == seg.kind
        src = stream.source_index[start:stop]
        assert np.array_equal(stream.labels[start:stop], labels[src])
        clean = images[src]
        changed = stream.images[start:stop] != clean
        if seg.kind in ("clean", "classes", "slowdown"):
            assert not changed.any()  # untouched pixels
        else:
            assert changed.mean() > 0.3
    # a segment draws without replacement while its pool lasts
    assert len(set(stream.source_index[:120].tolist())) == 120
    classes = stream.labels[bounds[3][0]:bounds[3][1]]
    assert set(classes.tolist()) == {2, 3, 4}
    # ramp: the first noisy sample of the ramped segment is perturbed less than the last ones
    start, stop = bounds[5]
    diff = np.abs(stream.images[start:stop].astype(int) - images[stream.source_index[start:stop]].astype(int))
    assert diff[0].mean() < diff[-10:].mean()


def test_segment_validation_and_parsing():
    with pytest.raises(ValueError):
        trace.Segment("noise", 10)            # noise needs a sigma
    with pytest.raises(ValueError):
        trace.Segment("fog", 10)
    with pytest.raises(ValueError):
        trace.Segment("clean", 0)
    spec = trace.parse_segments("clean:100;noise:50:sigma=0.08;classes:30:classes=2/3;slowdown:20:delay_ms=40", seed=3)
    assert [s.kind for s in spec.segments] == ["clean", "noise", "classes", "slowdown"]
    assert spec.segments[1].sigma == 0.08 and spec.segments[2].classes == (2, 3)
    assert spec.segments[3].delay_ms == 40 and spec.seed == 3 and spec.length == 200
    assert trace.parse_segments("drift").length == trace.preset("drift").length
    assert trace.parse_segments(json.dumps(SPEC.to_dict()["segments"]), seed=7) == SPEC


def test_gaussian_blur_keeps_constant_images_and_mass():
    x = np.full((1, 1, 6, 6), 0.4)
    assert np.allclose(trace.gaussian_blur(x, 1.0), 0.4)
    rng = np.random.default_rng(0)
    y = rng.random((2, 3, 9, 9))
    blurred = trace.gaussian_blur(y, 1.0)
    assert blurred.shape == y.shape and blurred.std() < y.std()


# ---- windows and settling --------------------------------------------------------------------
def test_windowing_math():
    assert trace.window_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    v = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1, 0], dtype=float)
    assert np.allclose(trace.window_means(v, 4), [0.5, 0.75, 0.5])
    spec = trace.TraceSpec((trace.Segment("clean", 300), trace.Segment("noise", 250, sigma=0.1),
                            trace.Segment("slowdown", 150, delay_ms=10),
                            trace.Segment("slowdown", 100, delay_ms=50)))
    # onsets: start, noise at 300 (window 3), back to clean data at 550 (window 5); a change of
    # delay alone is no data drift
    assert trace.onset_windows(spec, 100) == [0, 3, 5]
    mask = trace.settled_mask(spec, 100, 2)
    assert mask.tolist() == [False, False, True, False, False, False, False, True]


def _ref(score, agrees, edge_j=1.0, off_j=10.0, policy="entropy") -> trace.Reference:
    score = np.asarray(score, dtype=float)
    n = score.size
    cloud = np.zeros(n, dtype=np.int64)
    edge = np.where(np.asarray(agrees, dtype=bool), 0, 1)
    return trace.Reference(policy, score, edge, cloud, np.full(n, edge_j), np.full(n, off_j),
                           np.full(n, 100.0))


def test_evaluate_threshold_per_window():
    ref = _ref([0.1, 0.5, 0.9, 0.2, 0.3, 0.8], [1, 0, 1, 1, 1, 0])
    ws = trace.evaluate_threshold(ref, 0.6, 3)
    # window 0: exits 0.1 (agrees) and 0.5 (disagrees); 0.9 offloaded
    assert np.allclose(ws.agreement, [2 / 3, 1.0])
    assert np.allclose(ws.exit_share, [2 / 3, 2 / 3])
    assert np.allclose(ws.energy_j, [(1 + 1 + 11) / 3, (1 + 1 + 11) / 3])
    assert np.allclose(ws.bytes, [100 / 3, 100 / 3])
    per = trace.evaluate_threshold(ref, [0.0, 1.0], 3)  # one threshold per window
    assert np.allclose(per.exit_share, [0, 1]) and np.allclose(per.agreement, [1, 2 / 3])
    maxp = trace.evaluate_threshold(_ref([0.9, 0.4], [1, 1], policy="max_prob"), 0.5, 2)
    assert np.allclose(maxp.exit_share, [0.5])


def test_oracle_picks_lowest_energy_threshold_meeting_target():
    # sorted by entropy: agrees, agrees, disagrees, agrees, agrees, disagrees, ...
    score = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    agrees = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 1], dtype=bool)
    exit_j, off_j = np.full(10, 1.0), np.full(10, 11.0)
    # target 0.9: at most 1 disagreement among exited -> exit the 5 lowest (k=5), not 6+
    choice = trace.oracle_threshold(score, agrees, exit_j, off_j, 0.9)
    assert choice.exit_share == 0.5 and choice.agreement == pytest.approx(0.9)
    assert 0.4 < choice.threshold <= 0.5
    assert choice.energy_j == pytest.approx((5 * 1 + 5 * 11) / 10)
    # brute force over a fine grid: nothing feasible is cheaper
    ref = _ref(score, agrees)
    for t in np.linspace(0, 1.2, 241):
        ws = trace.evaluate_threshold(ref, t, 10)
        if ws.agreement[0] >= 0.9:
            assert ws.energy_j[0] >= choice.energy_j - 1e-12
    # the oracle's threshold reproduces its numbers
    ws = trace.evaluate_threshold(ref, choice.threshold, 10)
    assert ws.agreement[0] == pytest.approx(choice.agreement)
    assert ws.energy_j[0] == pytest.approx(choice.energy_j)
    # target 1.0: exit only the samples before the first disagreement
    assert trace.oracle_threshold(score, agrees, exit_j, off_j, 1.0).exit_share == 0.2
    # everything agrees: exit everything
    all_ok = trace.oracle_threshold(score, np.ones(10, bool), exit_j, off_j, 0.99)
    assert all_ok.exit_share == 1.0 and all_ok.threshold > 0.9
    # the first sample disagrees and the target is 1: nothing exits, threshold 0
    none = trace.oracle_threshold(score, ~np.eye(10, dtype=bool)[0], exit_j, off_j, 1.0)
    assert none.exit_share == 0.0 and none.threshold == 0.0


def test_oracle_respects_ties_and_per_sample_energy():
    score = np.array([0.1, 0.1, 0.3, 0.4])
    agrees = np.array([1, 0, 1, 1], dtype=bool)
    # cutting between the tied 0.1s is not realisable: target 0.75 allows the tie group
    choice = trace.oracle_threshold(score, agrees, np.zeros(4), np.ones(4), 0.75)
    assert choice.exit_share == 1.0
    choice = trace.oracle_threshold(score, agrees, np.zeros(4), np.ones(4), 0.8)
    assert choice.exit_share == 0.0  # exiting the tie group already costs 1 disagreement of 4
    # max_prob policy: most confident = highest score; exit when score >= t
    p = np.array([0.99, 0.95, 0.6, 0.5])
    ok = np.array([1, 1, 0, 1], dtype=bool)
    c = trace.oracle_threshold(p, ok, np.zeros(4), np.ones(4), 1.0, policy="max_prob")
    assert c.exit_share == 0.5 and 0.6 < c.threshold <= 0.95
    assert trace.exits_at(p, c.threshold, "max_prob").tolist() == [True, True, False, False]


def test_oracle_windows_meet_target_per_window():
    rng = np.random.default_rng(1)
    score = rng.random(400)
    agrees = rng.random(400) > score * 0.2  # confident samples agree more
    ref = _ref(score, agrees)
    ws = trace.oracle_windows(ref, 100, 0.95)
    assert (ws.agreement >= 0.95).all()
    static = trace.evaluate_threshold(ref, 0.5, 100)
    assert (ws.energy_j[static.agreement >= 0.95] <= static.energy_j[static.agreement >= 0.95] + 1e-12).all()


def test_reference_round_trips(tmp_path):
    ref = _ref([0.1, 0.2], [1, 0])
    ref.static_threshold = 0.5
    ref.save(str(tmp_path / "ref.npz"))
    back = trace.Reference.load(str(tmp_path / "ref.npz"))
    assert back.policy == "entropy" and back.static_threshold == 0.5
    assert np.array_equal(back.score, ref.score) and np.array_equal(back.edge_class, ref.edge_class)


def test_metric_helpers():
    before = {("edgecloud_energy_joules_total", (("component", "shadow_radio"), ("model", "m"))): 1.0,
              ("edgecloud_energy_joules_total", (("component", "radio"), ("model", "m"))): 5.0}
    after = {k: v * 3 for k, v in before.items()}
    assert trace.metric_delta(before, after, "edgecloud_energy_joules_total", model="m",
                              component="shadow_radio") == 2.0
    assert trace.metric_value(after, "edgecloud_energy_joules_total", model="m") == 18.0
    assert trace.label_values(after, "edgecloud_energy_joules_total", "component") == ["radio", "shadow_radio"]


def test_replayer_requests_never_straddle_windows_or_segments():
    images, labels = _data()
    stream = trace.build_stream(SPEC, images, labels)
    rep = trace.Replayer("127.0.0.1:1", "m", "INPUT", stream, batch=32, window=100)
    reqs = rep.requests()
    assert reqs[0][0] == 0 and reqs[-1][1] == len(stream)
    assert all(a < b <= a + 32 for a, b in reqs)
    assert all(b == c for (_, b), (c, _) in zip(reqs, reqs[1:]))  # contiguous, in order
    cuts = set(range(0, len(stream), 100)) | {s for s, _ in SPEC.bounds()}
    for a, b in reqs:
        assert not any(a < c < b for c in cuts)


def test_load_stream_split_is_checked():
    with pytest.raises(ValueError, match="manifest"):
        trace.load_stream(SPEC, str(CIFAR), split="val")
    with pytest.raises(ValueError, match="'test', 'val', 'val-a', 'val-b'"):
        trace.load_stream(SPEC, str(CIFAR), split="train")
    with pytest.raises(ValueError, match="manifest"):
        trace.load_stream(SPEC, str(CIFAR), split="val-a")


def test_validation_halves_split_the_hold_out_without_overlap():
    a, b, whole = (trace.val_part_rows(11, p) for p in ("val-a", "val-b", "val"))
    assert set(a).isdisjoint(b) and sorted(np.concatenate([a, b])) == list(whole) == list(range(11))
    assert list(a) == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ValueError, match="unknown validation part 'val-c'"):
        trace.val_part_rows(11, "val-c")


def test_validation_folds_partition_the_hold_out_and_their_complements_are_the_rest():
    folds = [trace.val_part_rows(23, f"val-5f{i}") for i in range(5)]
    assert sorted(np.concatenate(folds)) == list(range(23))
    for i, fold in enumerate(folds):
        rest = trace.val_part_rows(23, f"val-5f{i}c")
        assert set(fold).isdisjoint(rest) and len(fold) + len(rest) == 23
    assert list(folds[0]) == [0, 5, 10, 15, 20]
    assert trace.is_val_part("val-5f4") and trace.is_val_part("val-5f4c") and trace.is_val_part("val-a")
    assert not trace.is_val_part("val-5f5") and not trace.is_val_part("val-1f0") and not trace.is_val_part("test")
    with pytest.raises(ValueError, match="needs K >= 2 folds"):
        trace.val_part_rows(23, "val-5f5")
    with pytest.raises(ValueError, match="val-KfI"):
        trace.val_part_rows(23, "val-fold")


@needs_cifar_bundle
def test_val_stream_draws_only_the_bundles_hold_out():
    """Settings are chosen on a stream of validation images: the bundle's hold-out of the train
    split, none of them a test image."""
    from edgecloud.bundle import Bundle
    from edgecloud.evaluate.source import load_eval_data

    manifest = Bundle(BUNDLE).manifest
    spec = trace.TraceSpec((trace.Segment("clean", 300),), seed=3)
    stream = trace.load_stream(spec, str(CIFAR), split="val", manifest=manifest)
    val, _ = load_eval_data("cifar10", "val", manifest, str(CIFAR))
    assert np.array_equal(stream.images, val.images.numpy()[stream.source_index])
    assert np.array_equal(stream.labels, val.labels.numpy()[stream.source_index])
    test = trace.load_stream(spec, str(CIFAR), split="test")
    assert not np.array_equal(stream.images, test.images)
    half = trace.load_stream(spec, str(CIFAR), split="val-b", manifest=manifest)  # odd rows only
    odd = val.images.numpy()[1::2]
    assert np.array_equal(half.images, odd[half.source_index]) and half.source_index.max() < len(odd)


# ---- the benchmark against real servers -----------------------------------------------------
@needs_cifar_bundle
def test_controller_benchmark_quick(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "controller.py"), "--quick", "--json",
         "--data-root", str(CIFAR), "--out", str(out)],
        capture_output=True, text=True, timeout=170, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("target", "windows", "controlled_meet_share", "static_meet_share",
                "energy_vs_oracle", "shadow_share", "settling", "cpu"):
        assert key in summary, key
    assert summary["target"] == 0.97 and summary["windows"] == 10
    assert summary["errors"] is None
    assert summary["server_exit_codes"] == {"static": 0, "controlled": 0, "cloud": 0}
    pw = summary["per_window"]
    for mode in ("static", "controlled", "oracle"):
        assert len(pw[f"{mode}_agreement"]) == 10
    # the served static run answers exactly as the offline reference says it would
    assert summary["static_served_vs_offline_max_agreement_gap"] <= 0.02
    assert all(t == pytest.approx(0.5813) for t in pw["static_threshold"])
    assert all(a >= 0.97 for a in pw["oracle_agreement"])
    assert summary["shadow_share"] is not None and 0.0 <= summary["shadow_share"] <= 1.0
    assert sum(pw["controlled_shadow_share"]) > 0  # the controller shadowed something
    assert (out / "controller.png").stat().st_size > 0
    assert len((out / "windows.csv").read_text().splitlines()) == 11


def test_segment_oracle_holds_one_threshold_per_stretch_and_meets_its_share():
    rng = np.random.default_rng(0)
    spec = trace.parse_segments("clean:400;blur:400:blur=1.0", seed=0)
    score = rng.random(800)
    # clean: disagreements only above 0.9; blur: disagreements spread from 0.3 up
    agrees = np.ones(800, dtype=bool)
    agrees[:400] = ~((score[:400] > 0.9) & (rng.random(400) < 0.5))
    agrees[400:] = ~((score[400:] > 0.3) & (rng.random(400) < 0.2))
    ref = _ref(score, agrees)
    window, target = 100, 0.95
    settled = trace.settled_mask(spec, window, 1)
    seg = trace.segment_oracle_windows(ref, spec, window, target, settled, meet_share=0.8)
    assert len(set(seg.threshold[:4])) == 1 and len(set(seg.threshold[4:])) == 1
    assert seg.threshold[4] < seg.threshold[0]  # blur needs the stricter threshold
    for rows in (np.arange(0, 4), np.arange(4, 8)):
        judged = rows[settled[rows]]
        assert (seg.agreement[judged] >= target).mean() >= 0.8
    # hindsight per window needs no margin: never more energy than one threshold per stretch
    oracle = trace.oracle_windows(ref, window, target)
    assert oracle.energy_j[settled].mean() <= seg.energy_j[settled].mean() + 1e-12
    # a looser threshold on the blur stretch would miss its share
    looser = seg.threshold.copy()
    looser[4:] = np.quantile(score, 0.995)
    worse = trace.evaluate_threshold(ref, looser.tolist(), window)
    assert (worse.agreement[4:][settled[4:]] >= target).mean() < 0.8
    with pytest.raises(ValueError, match="settled"):
        trace.segment_oracle_windows(ref, spec, window, target, settled[:-1])


def test_profile_bins_table_sets_the_profile_beside_each_segments_true_rates(tmp_path):
    """benchmarks/controller.py's profile_bins.csv: per profile bin, the profile's rate and, per
    segment, how many stream samples fell in the bin and how often they really disagreed."""
    import csv
    import importlib.util

    from edgecloud.control.profile import DisagreementProfile

    spec_ = importlib.util.spec_from_file_location("controller_benchmark", REPO_ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    DisagreementProfile.fit("entropy", np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0.0, 1.0, 0.0]),
                            bins=2).save(tmp_path / "p.json")
    spec = trace.parse_segments("clean:4;blur:4:blur=1.0", seed=0)
    # clean: low entropy agrees, high entropy half disagrees; blur: everything disagrees
    ref = _ref([0.1, 0.15, 0.85, 0.9, 0.1, 0.2, 0.8, 0.95], [1, 1, 0, 1, 0, 0, 0, 0])
    bench.write_profile_bins(tmp_path / "bins.csv", DisagreementProfile.load(tmp_path / "p.json"), ref, spec)
    rows = list(csv.DictReader((tmp_path / "bins.csv").open()))
    assert [r["bin"] for r in rows] == ["0", "1"]
    high, low = rows  # bin 0 is the least confident (highest entropy)
    assert float(high["score_from"]) == pytest.approx(0.5) and float(high["score_to"]) == pytest.approx(0.9)
    assert float(high["profile_rate"]) == 0.5 and float(low["profile_rate"]) == 0.0
    assert high["0_clean_samples"] == "2" and float(high["0_clean_disagreement"]) == 0.5
    assert low["0_clean_samples"] == "2" and float(low["0_clean_disagreement"]) == 0.0
    assert float(high["1_blur_disagreement"]) == 1.0 and float(low["1_blur_disagreement"]) == 1.0


def test_class_rise_table_prices_exits_and_band_per_answered_class(tmp_path):
    """benchmarks/controller.py's class_rise.csv: per segment and class, the exits (below the
    segment's threshold) and the band (the next samples above it) with observed and
    profile-predicted disagreements."""
    import csv
    import importlib.util

    from edgecloud.control.profile import DisagreementProfile

    spec_ = importlib.util.spec_from_file_location("controller_benchmark", REPO_ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    DisagreementProfile.fit("entropy", np.array([0.1, 0.2, 0.8, 0.9]), np.array([1.0, 0.0, 1.0, 0.0]),
                            bins=2).save(tmp_path / "p.json")      # rate 0.5 in both bins
    spec = trace.parse_segments("clean:4;blur:4:blur=1.0", seed=0)
    ref = _ref([0.1, 0.15, 0.85, 0.9, 0.1, 0.2, 0.8, 0.95], [1, 1, 0, 1, 0, 0, 0, 1])
    bench.write_class_rise(tmp_path / "rise.csv", DisagreementProfile.load(tmp_path / "p.json"), ref, spec,
                           [0.5, 0.5], 0.25)
    rows = list(csv.DictReader((tmp_path / "rise.csv").open()))
    first = [r for r in rows if r["segment"] == "0"]
    assert [r["edge_class"] for r in first] == ["all", "0", "1"]   # the edge's answers (1: disagrees here)
    allrow = first[0]
    assert allrow["exits"] == "2" and allrow["exits_disagree"] == "0" and float(allrow["exits_expected"]) == 1.0
    assert float(allrow["exits_r"]) == 0.0
    assert allrow["band"] == "1" and allrow["band_disagree"] == "1" and float(allrow["band_r"]) == 2.0  # 0.85
    blur = [r for r in rows if r["segment"] == "1" and r["edge_class"] == "all"][0]
    assert blur["kind"] == "blur" and blur["exits_disagree"] == "2" and float(blur["exits_r"]) == 2.0
    ones = [r for r in rows if r["segment"] == "1" and r["edge_class"] == "1"][0]
    assert ones["exits"] == "2" and float(ones["exits_r"]) == 2.0 and ones["band"] == "1"


def test_benchmark_split_accepts_folds_and_names_the_bad_value():
    import argparse
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("controller_benchmark", REPO_ROOT / "benchmarks" / "controller.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    for good in ("test", "val", "val-b", "val-5f3", "val-5f3c"):
        assert bench._split(good) == good
    with pytest.raises(argparse.ArgumentTypeError, match="'val-5f9'"):
        bench._split("val-5f9")


def test_controller_summaries_line_up_runs_and_name_the_settings_that_differ(tmp_path, capsys):
    """benchmarks/controller_summaries.py: one row per benchmark output, the settings that differ
    between them, and per setting the worst share where static misses and the mean energy."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("controller_summaries",
                                                   REPO_ROOT / "benchmarks" / "controller_summaries.py")
    tool = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tool)

    def write(name, factor, split, where, energy):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "stream": {"dataset": f"cifar10 {split}"}, "settled_windows": 30, "static_miss_windows": 12,
            "controlled_meet_share": 1.0, "controlled_meet_share_where_static_misses": where,
            "energy_vs_oracle": energy, "shadow_share": 0.002, "controlled_source": "offline",
            "control": {"agreement": 0.97, "profile": f"p-{split}.json", "shift_factor": factor,
                        "profile_band": 250}}))
        return d

    dirs = [write("a0", 1.0, "val-5f0", 1.0, 1.10), write("a1", 1.0, "val-5f1", 0.9, 1.12),
            write("b0", 1.34, "val-5f0", 1.0, 1.20)]
    assert tool.main([str(d) for d in dirs] + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in out["rows"]] == ["shift_factor=1.0", "shift_factor=1.0", "shift_factor=1.34"]
    assert out["rows"][1]["split"] == "val-5f1"
    s = out["settings"]["shift_factor=1.0"]
    assert s["runs"] == 2 and s["worst_meet_share_where_static_misses"] == 0.9
    assert s["mean_energy_vs_oracle"] == pytest.approx(1.11) and s["worst_energy_vs_oracle"] == 1.12
    assert tool.main([str(d) for d in dirs]) == 0
    assert "| val-5f1 | shift_factor=1.0 | 100.0% | 90.0% (12) | 1.120 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no summary.json"):
        tool.main([str(tmp_path / "missing")])
