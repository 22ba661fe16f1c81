"""Bundle export (ONNX round trip, manifest), the tiny_repo fixture, training loop and recipes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgecloud.bundle import ModelRepository
from edgecloud.exits import ExitPolicy
from edgecloud.nets.layers import count_macs


def test_tiny_repo_bundle_is_valid(tiny_repo) -> None:
    repo = ModelRepository(tiny_repo)
    assert repo.names() == ["tiny"]
    bundle = repo.get("tiny")
    m = bundle.manifest
    assert m.family == "fmnist_hybrid" and len(m.classes) == 10
    assert [e.name for e in m.exits] == ["edge"]
    assert m.cloud.input_name == "FEATURES" and m.cloud.output_name == "LOGITS"
    model = bundle.build_model()
    assert m.cloud.input_shape == list(model.offload_shape())
    assert m.cloud.macs == count_macs(model.cloud_module(), model.offload_shape())
    assert m.reference_macs > m.cloud.macs > 0
    assert (bundle.path / "README.md").read_text().startswith("# tiny")
    # The threshold splits seeded uniform-random inputs roughly in half.
    policy = ExitPolicy(m.policy, [e.threshold for e in m.exits])
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    d = model.route(x, policy)
    assert 16 <= int((d.exit_index == 0).sum()) <= 48


def test_onnx_equals_torch_cloud_part(tiny_repo) -> None:
    bundle = ModelRepository(tiny_repo).get("tiny")
    model = bundle.build_model()
    session = ort.InferenceSession(str(bundle.cloud_onnx), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.name == "FEATURES" and inp.shape[1:] == list(model.offload_shape())
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    d = model.route(x, ExitPolicy("entropy", [0.0]))
    for batch in (1, 7, 40):  # the batch dimension is dynamic
        feats = d.offload[:batch]
        got = session.run(["LOGITS"], {"FEATURES": feats.numpy()})[0]
        with torch.no_grad():
            want = model.cloud_module()(feats).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_bundle_rejects_wrong_class_count(tmp_path) -> None:
    from edgecloud.export import export_bundle
    from edgecloud.nets import create_model

    model = create_model("fmnist_hybrid", width=8, cloud_width=8, cloud_blocks=1)
    with pytest.raises(ValueError, match="class names"):
        export_bundle(model, tmp_path / "b", name="b", family="fmnist_hybrid", classes=["a", "b"])
    with pytest.raises(ValueError, match="exit"):
        export_bundle(model, tmp_path / "b", name="b", family="fmnist_hybrid",
                      classes=[str(i) for i in range(10)], exits=[1.0, 2.0])
    assert not (tmp_path / "b" / "manifest.yaml").exists()


# ---- training, recipes, threshold selection ---------------------------------------------------------

def _write_toy_fmnist(root, n_train=600, n_test=100, seed=0):
    """Fashion-MNIST-shaped IDX files whose class is a bright 7x7 patch at one of 10 places."""
    from edgecloud.data.idx import write_idx

    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 4)
            images[i, r * 7 + 3:r * 7 + 10, q * 7:q * 7 + 7] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return _write_toy_fmnist(tmp_path_factory.mktemp("toy_fmnist"))


def _toy_recipe(root, **optim):
    from edgecloud.train.recipe import Recipe

    return Recipe.model_validate({
        "name": "toy", "family": "fmnist_hybrid",
        "arch": {"width": 8, "cloud_width": 8, "cloud_blocks": 1}, "seed": 1,
        "data": {"dataset": "fashion-mnist", "root": str(root), "val_fraction": 0.2},
        "optim": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.01, "exit_weights": [0.5, 1.0],
                  **optim},
    })


def test_resume_reproduces_an_uninterrupted_run(toy_data, tmp_path) -> None:
    from edgecloud.train.loop import load_splits, run_training

    recipe = _toy_recipe(toy_data)
    splits = load_splits(recipe, with_test=False)
    full = run_training(recipe, tmp_path / "a", splits=splits, progress=False)
    part = run_training(recipe, tmp_path / "b", splits=splits, progress=False, stop_after=1)
    assert part.epochs == 1 and (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = run_training(recipe, tmp_path / "b", splits=splits, progress=False, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for (k, v), (_, w) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert full.history[-1]["val_accuracy"][0] > 0.8  # the toy task is learnable (edge exit)
    with pytest.raises(ValueError, match="different recipe"):
        run_training(_toy_recipe(toy_data, lr=0.02), tmp_path / "b", splits=splits, progress=False, resume=True)


def test_choose_threshold_prefers_largest_share_within_drop() -> None:
    from edgecloud.train.exitstats import choose_threshold, policy_for, routed_metrics

    class M:
        exit_names = ["edge"]

    labels = torch.tensor([0] * 50 + [1] * 50)
    cloud = torch.nn.functional.one_hot(labels, 2).float()  # the cloud is always right
    edge = cloud.clone()
    edge[:10] = torch.tensor([0.6, 0.4])   # right but unsure
    edge[90:] = torch.tensor([0.95, 0.05])  # confidently wrong: 10 % error if they exit
    edge[10:90] = cloud[10:90] * 0.999 + 0.0005  # right and sure
    t, m = choose_threshold(M(), [edge, cloud], labels, "max_prob", max_drop=5.0)
    # Letting the confidently-wrong rows exit would cost 10 points; within 5, the best is the 80 sure ones.
    assert m["accuracy"] >= 0.95 and m["edge_exit_share"] == pytest.approx(0.8)
    loose_t, loose = choose_threshold(M(), [edge, cloud], labels, "max_prob", max_drop=20.0)
    assert loose["edge_exit_share"] > 0.8
    assert routed_metrics(M(), [edge, cloud], labels, policy_for("max_prob", M(), t))["edge_exit_share"] == pytest.approx(0.8)


@pytest.mark.parametrize("family", ["fmnist_hybrid", "meanet"])
def test_simulated_routing_matches_route(family) -> None:
    from edgecloud.nets import create_model
    from edgecloud.train.exitstats import route_outputs

    torch.manual_seed(0)
    if family == "meanet":
        model = create_model("meanet", main_depth=8, cloud_depth=8, width=4, hard_classes=[1, 3, 5, 7, 9]).eval()
        x = torch.rand(24, 3, 32, 32)
    else:
        model = create_model("fmnist_hybrid", width=8, cloud_width=8, cloud_blocks=1).eval()
        x = torch.rand(24, 1, 28, 28)
    with torch.no_grad():
        probs = [torch.softmax(o, 1) for o in model(x)]
    h = -(probs[0] * probs[0].clamp_min(1e-12).log()).sum(1)
    t = float(h.median())
    policy = ExitPolicy("entropy", [t] + [None] * (len(model.exit_names) - 1))
    d = model.route(x, policy)
    assert torch.equal(d.exit_index, route_outputs(model, probs, policy))
    assert (d.exit_index == -1).any() and (d.exit_index >= 0).any()
    if family == "meanet":
        assert d.offload.shape[1:] == (3, 32, 32)
        hard = model.is_hard()[probs[0].argmax(1)]
        assert torch.equal(d.exit_index == 1, hard & (h < t))


def test_meanet_extension_stage_picks_hard_classes_and_freezes_main(toy_data) -> None:
    from edgecloud.data.dataset import ImageDataset
    from edgecloud.nets import create_model
    from edgecloud.train.recipe import DataSpec
    from edgecloud.train.stages import run_stage

    torch.manual_seed(0)
    model = create_model("meanet", main_depth=8, cloud_depth=8, width=4, num_hard=5)
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.arange(64) % 10, tuple("abcdefghij"))
    main_before = {k: v.clone() for k, v in model.main.state_dict().items()}
    ext_before = model.extension_head.fc.weight.clone()
    hist = run_stage({"kind": "meanet_extension", "epochs": 1, "batch_size": 16, "optimizer": "adamw",
                      "lr": 0.01}, model, ds, ds, seed=0, data=DataSpec(dataset="cifar10"), progress=False)
    assert len(hist[0]["hard_classes"]) == 5 and model.hard_classes.tolist() == hist[0]["hard_classes"]
    for k, v in model.main.state_dict().items():
        assert torch.equal(v, main_before[k]), k  # frozen, BN statistics included
    assert not torch.equal(model.extension_head.fc.weight, ext_before)
    with pytest.raises(ValueError, match="unknown training stage"):
        run_stage({"kind": "nope"}, model, ds, ds, seed=0, data=None, progress=False)


def test_every_shipped_recipe_builds() -> None:
    from edgecloud.nets import create_model
    from edgecloud.train.loop import exit_weights
    from edgecloud.train.recipe import list_recipes, load_recipe

    names = list_recipes()
    assert {"fmnist-hybrid", "cifar10-hybrid-binary", "cifar10-resnet20", "cifar10-meanet"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        model = create_model(recipe.family, **recipe.arch)
        exit_weights(recipe.optim, len(getattr(model, "exit_names", [])) + 1)  # raises on a mismatch
    with pytest.raises(FileNotFoundError, match="fmnist-hybrid"):
        load_recipe("no-such-recipe")


def test_cli_train_then_export(toy_data, tmp_path, capsys) -> None:
    import yaml

    from edgecloud.bundle import Bundle
    from edgecloud.cli import main

    recipe = _toy_recipe(toy_data, epochs=1).model_dump(mode="json")
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(recipe))
    rc = main(["train", str(tmp_path / "toy.yaml"), "--out", str(tmp_path / "run"), "--export",
               str(tmp_path / "models" / "toy"), "--no-progress", "--seed", "1"])
    assert rc == 0
    bundle = Bundle(tmp_path / "models" / "toy")
    m = bundle.manifest
    assert m.training["command"].startswith("edgecloud train") and m.training["seed"] == 1
    assert m.training["wall_time_s"] > 0 and len(m.training["history"]) == 1
    assert m.training["device"].startswith("cpu (") and m.training["precision_used"] == "fp32"
    assert "--device" not in m.training["command"]  # the default is not spelled out
    assert m.metrics["test_samples"] == 100 and 0 <= m.metrics["test_edge_exit_share"] <= 1
    assert m.metrics["threshold"] == m.exits[0].threshold
    assert "validation" in m.metrics["threshold_selection"]
    card = (bundle.path / "README.md").read_text()
    assert "Reproduce with" in card and "| edge |" in card
    rc = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "models" / "fixed"), "--name", "fixed",
               "--threshold", "0.5"])
    assert rc == 0
    fixed = Bundle(tmp_path / "models" / "fixed").manifest
    assert fixed.name == "fixed" and fixed.exits[0].threshold == 0.5
    # The card of a re-export names both commands: the recorded training run and the export.
    assert fixed.training["command"].startswith(m.training["command"] + " && edgecloud export ")
    assert len(fixed.training["history"]) == 1
    # Auto threshold against a reference run's validation accuracy (here: the run itself).
    rc = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "models" / "ref"), "--reference",
               str(tmp_path / "run"), "--max-drop", "100"])
    assert rc == 0
    ref = Bundle(tmp_path / "models" / "ref").manifest
    assert "validation accuracy" in ref.metrics["threshold_selection"]
    assert ref.metrics["val_edge_exit_share"] == 1.0  # a 100-point allowance lets every sample exit
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    ckpt["recipe"]["seed"] = 99  # another train/validation split
    (tmp_path / "other").mkdir()
    torch.save(ckpt, tmp_path / "other" / "checkpoint.pt")
    rc = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "models" / "bad"), "--reference",
               str(tmp_path / "other")])
    assert rc == 2 and "differs from this recipe" in capsys.readouterr().err
    # Same weights, same test split, fixed threshold -> the "alone" accuracies agree.
    assert fixed.metrics["test_accuracy_cloud_alone"] == m.metrics["test_accuracy_cloud_alone"]
    # Energy baseline: another run's network (here a wider one) instead of this one at full precision.
    from edgecloud.nets.layers import reference_macs
    from edgecloud.train.loop import run_training
    from edgecloud.train.warmstart import load_run_model

    wider = _toy_recipe(toy_data, epochs=1).model_copy(update={"arch": {"width": 16, "cloud_width": 16}})
    run_training(wider, tmp_path / "wider", progress=False)
    rc = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "models" / "based"), "--baseline",
               str(tmp_path / "wider"), "--threshold", "0.5"])
    assert rc == 0
    based = Bundle(tmp_path / "models" / "based")
    expected = reference_macs(load_run_model(tmp_path / "wider"), (1, 28, 28))
    assert based.manifest.reference_macs == expected != m.reference_macs
    assert based.manifest.reference_network == "wider" and m.reference_network == ""
    assert "the baseline network `wider`" in (based.path / "README.md").read_text()
    assert based.manifest.metrics == fixed.metrics  # the baseline changes the energy reference only


def test_export_raw_offload_family(tmp_path) -> None:
    """MEANet sends the raw input: the cloud ONNX takes INPUT [3, 32, 32] and equals torch."""
    from edgecloud.bundle import Bundle
    from edgecloud.export import export_bundle
    from edgecloud.nets import create_model

    torch.manual_seed(0)
    arch = {"main_depth": 8, "cloud_depth": 8, "width": 4, "num_hard": 5}
    model = create_model("meanet", **arch).eval()
    export_bundle(model, tmp_path / "m", name="m", family="meanet", arch=arch,
                  classes=[str(i) for i in range(10)], exits=[0.8, None])
    b = Bundle(tmp_path / "m")
    assert b.manifest.cloud.offload == "raw" and b.manifest.cloud.input_name == "INPUT"
    assert [(e.name, e.threshold) for e in b.manifest.exits] == [("main", 0.8), ("extension", None)]
    assert b.manifest.reference_macs == b.manifest.cloud.macs
    x = torch.rand(4, 3, 32, 32)
    got = ort.InferenceSession(str(b.cloud_onnx), providers=["CPUExecutionProvider"]).run(
        ["LOGITS"], {"INPUT": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, b.build_model().cloud_module()(x).numpy(), atol=1e-4, rtol=0)


# ---- offload encoding from the recipe (recipe.offload -> finalize -> export_bundle) -----------------

def _with_offload(recipe, **offload_spec):
    from edgecloud.train.recipe import Recipe

    return Recipe.model_validate({**recipe.model_dump(mode="json"), "offload": offload_spec})


def _onnx_logits(bundle, wire):
    session = ort.InferenceSession(str(bundle.cloud_onnx), providers=["CPUExecutionProvider"])
    (onnx_in,) = session.get_inputs()
    return onnx_in.type, session.run([bundle.manifest.cloud.output_name], {onnx_in.name: wire})[0]


def test_uint8_recipe_exports_a_bundle_calibrated_on_validation(toy_data, tmp_path, capsys) -> None:
    from edgecloud import offload
    from edgecloud.bundle import Bundle
    from edgecloud.cli import main
    from edgecloud.train.loop import finalize, load_splits, offloaded_features, run_training

    recipe = _with_offload(_toy_recipe(toy_data, epochs=1), encoding="uint8", percentile=99.0)
    splits = load_splits(recipe)
    result = run_training(recipe, tmp_path / "run", splits=splits, progress=False)
    model = result.model
    path, metrics = finalize(model, recipe, tmp_path / "u8", splits=splits)
    bundle = Bundle(path)
    c = bundle.manifest.cloud

    # the manifest: uint8, scale/zero point calibrated on the VALIDATION split's offloads
    val_feats, test_feats = offloaded_features(model, splits.val), offloaded_features(model, splits.test)
    assert c.encoding == "uint8" and c.input_shape == [8, 7, 7]
    assert (c.scale, c.zero_point) == offload.calibrate_uint8(val_feats, 99.0)
    assert (c.scale, c.zero_point) != offload.calibrate_uint8(test_feats, 99.0)
    assert c.scale != 1.0 and 0 < c.zero_point < 255  # the edge's residual features are signed
    record = bundle.manifest.training["offload"]
    assert record["encoding"] == "uint8" and record["percentile"] == 99.0
    assert f"all {len(splits.val)} samples" in record["calibrated_on"] and "validation" in record["calibrated_on"]

    # cloud.onnx takes the wire tensor and equals torch on the decoded features
    wire = offload.encode(test_feats.numpy(), c)
    onnx_type, got = _onnx_logits(bundle, wire)
    assert onnx_type == "tensor(uint8)"
    with torch.no_grad():
        want = model.cloud_module()(torch.from_numpy(offload.decode(wire, c))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # the measured metrics are those of what is served: the cloud exit on encoded features
    labels = splits.test.labels.numpy()
    served = round(float((got.argmax(1) == labels).mean()), 4)
    assert metrics["test_accuracy_cloud_alone"] == bundle.manifest.metrics["test_accuracy_cloud_alone"] == served
    with torch.no_grad():
        unencoded = model.cloud_module()(test_feats).numpy()
    assert metrics["test_accuracy_cloud_alone_unencoded_features"] == round(
        float((unencoded.argmax(1) == labels).mean()), 4)
    card = (path / "README.md").read_text()
    assert f"Offload per sample: {8 * 7 * 7:,} bytes as UINT8" in card and "as FP32." not in card

    # `edgecloud export`: the checkpoint's recipe says uint8; --encoding overrides it
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
    again = Bundle(tmp_path / "again").manifest
    assert (again.cloud.encoding, again.cloud.scale, again.cloud.zero_point) == ("uint8", c.scale, c.zero_point)
    assert again.metrics["test_accuracy_cloud_alone"] == served
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "f32"), "--encoding", "fp32"]) == 0
    f32 = Bundle(tmp_path / "f32")
    assert (f32.manifest.cloud.encoding, f32.manifest.cloud.scale, f32.manifest.cloud.zero_point) == ("fp32", 1.0, 0)
    assert f32.manifest.training["offload"] == {"encoding": "fp32"}
    onnx_type, got32 = _onnx_logits(f32, test_feats.numpy())
    assert onnx_type == "tensor(float)"
    np.testing.assert_allclose(got32, unencoded, atol=1e-4, rtol=0)
    assert f32.manifest.metrics["test_accuracy_cloud_alone"] == metrics["test_accuracy_cloud_alone_unencoded_features"]
    assert "test_accuracy_cloud_alone_unencoded_features" not in f32.manifest.metrics
    assert f"Offload per sample: {8 * 7 * 7 * 4:,} bytes as FP32." in (f32.path / "README.md").read_text()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "f16"), "--encoding", "fp16"]) == 0
    assert _onnx_logits(Bundle(tmp_path / "f16"), test_feats.numpy().astype(np.float16))[0] == "tensor(float16)"
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--encoding", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err

    # the encoding is export-only: a checkpoint resumes under another offload section
    resumed = run_training(_with_offload(recipe, encoding="fp16"), tmp_path / "run", splits=splits,
                           progress=False, resume=True)
    assert resumed.epochs == 1


def test_recipe_rejects_an_invalid_offload_section(tmp_path) -> None:
    import yaml

    from edgecloud.train.recipe import load_recipe

    base = yaml.safe_load((__import__("edgecloud.train.recipe", fromlist=["x"]).recipes_dir()
                           / "fmnist-hybrid.yaml").read_text())
    assert base["offload"]["encoding"] == "uint8"  # the demo bundle's recipe
    for bad, message in (({"encoding": "int4"}, r"offload\.encoding\n.*'fp32', 'fp16' or 'uint8'"),
                         ({"encoding": "uint8", "percentile": 40}, r"offload\.percentile\n.*greater than 50"),
                         ({"encoding": "uint8", "bits": 8}, r"offload\.bits\n.*Extra inputs are not permitted")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, "offload": bad}))
        with pytest.raises(ValueError, match=r"invalid recipe .*bad\.yaml") as info:
            load_recipe(path)
        assert info.match(message), str(info.value)
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "offload"}))
    assert load_recipe(path).offload.encoding == "fp32"  # the default


def test_export_bundle_encoding_arguments(tmp_path) -> None:
    from edgecloud import offload
    from edgecloud.bundle import Bundle, CloudSpec
    from edgecloud.export import export_bundle
    from edgecloud.nets import create_model

    torch.manual_seed(0)
    arch = {"width": 8, "cloud_width": 8, "cloud_blocks": 1}
    model = create_model("fmnist_hybrid", **arch).eval()
    kw = {"family": "fmnist_hybrid", "arch": arch, "classes": [str(i) for i in range(10)], "exits": [0.5]}
    feats = offload.offload_features(model, torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="calibration features"):
        export_bundle(model, tmp_path / "a", name="a", encoding="uint8", **kw)
    export_bundle(model, tmp_path / "b", name="b", encoding="uint8", calibration=feats, percentile=100.0, **kw)
    c = Bundle(tmp_path / "b").manifest.cloud
    assert (c.encoding, c.scale, c.zero_point) == ("uint8", *offload.calibrate_uint8(feats, 100.0))
    assert c.macs > 0 and c.input_name == "FEATURES"
    ready = CloudSpec(input_shape=[8, 7, 7], encoding="uint8", scale=0.125, zero_point=3)
    export_bundle(model, tmp_path / "c", name="c", cloud=ready, **kw)
    c = Bundle(tmp_path / "c").manifest.cloud
    assert (c.encoding, c.scale, c.zero_point, c.macs) == ("uint8", 0.125, 3, Bundle(tmp_path / "b").manifest.cloud.macs)
    with pytest.raises(ValueError, match="contradicts"):
        export_bundle(model, tmp_path / "d", name="d", cloud=ready, encoding="fp16", **kw)
    with pytest.raises(ValueError, match="input shape"):
        export_bundle(model, tmp_path / "d", name="d", cloud=ready.model_copy(update={"input_shape": [8, 4, 4]}), **kw)
    assert not (tmp_path / "a" / "manifest.yaml").exists() and not (tmp_path / "d" / "manifest.yaml").exists()


def test_shipped_demo_bundle_offloads_uint8() -> None:
    """models/fmnist-hybrid was trained from a recipe with ``offload: {encoding: uint8}``."""
    from edgecloud import offload
    from edgecloud.bundle import ModelRepository
    from edgecloud.train.recipe import load_recipe

    bundle = ModelRepository().get("fmnist-hybrid")
    m = bundle.manifest
    assert load_recipe("fmnist-hybrid").offload.encoding == m.cloud.encoding == "uint8"
    assert offload.bytes_per_sample(m.cloud) == 32 * 7 * 7  # 1 byte per element (FP32: 4)
    assert m.training["offload"]["scale"] == m.cloud.scale and "validation" in m.training["offload"]["calibrated_on"]
    session = ort.InferenceSession(str(bundle.cloud_onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert "Offload per sample: 1,568 bytes as UINT8" in (bundle.path / "README.md").read_text()
