"""NAX co-design (edgecloud.codesign.nax): resnet_q kernels, the elastic-kernel supernet, the cost of a
candidate, supernet training and the seeded ``edgecloud search nax`` (tiny nets, synthetic CIFAR-10)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from edgecloud.nets import create_model
from edgecloud.nets.resnet_elastic import ElasticQuantConv2d, sample_subnets
from edgecloud.nn.quant import QuantConv2d
from synthetic_cifar import write_cifar_pickles

TINY = {"depth": 8, "num_classes": 10, "weight_bits": 8, "act_bits": 8, "widths": [4, 8, 8]}
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "cifar10-resnet20-8bit"


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


# ---- resnet_q kernels ------------------------------------------------------------------------------

def test_default_kernels_keep_the_shipped_bundle_and_the_network() -> None:
    from edgecloud.bundle import Bundle

    model = Bundle(SHIPPED).build_model()  # strict load of the shipped 8-bit ResNet-20
    state = torch.load(SHIPPED / "edge.pt", map_location="cpu", weights_only=True)
    plain, explicit = create_model("resnet_q"), create_model("resnet_q", kernels=[3] * 18)
    for net in (plain, explicit):
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    explicit.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(explicit.eval()(x)[0], model(x)[0])


def test_kernels_set_each_block_conv() -> None:
    ks = [1, 5, 3, 3, 5, 1]
    net = create_model("resnet_q", **TINY, kernels=ks).eval()
    got = [(conv.kernel_size[0], conv.padding[0]) for _, conv in net.block_convs()]
    assert got == [(k, k // 2) for k in ks]
    assert net.stem.kernel_size == (3, 3) and net.blocks[1].short[0].kernel_size == (1, 1)
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32))[0].shape == (2, 10)
    with pytest.raises(ValueError, match="odd"):
        create_model("resnet_q", **TINY, kernels=[3, 3, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="needs 6 sizes"):
        create_model("resnet_q", **TINY, kernels=[3] * 5)


# ---- the elastic conv and the supernet -------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transform", [False, True])
def test_elastic_conv_equals_a_plain_conv_with_the_centre_crop(stride: int, transform: bool) -> None:
    g = torch.Generator().manual_seed(1)
    elastic = ElasticQuantConv2d(4, 6, 5, stride, weight_bits=8, act_bits=8, kernel_choices=[1, 3, 5],
                                 kernel_transform=transform).eval()
    with torch.no_grad():
        elastic.weight.copy_(torch.randn(elastic.weight.shape, generator=g))
    x = torch.rand(2, 4, 9, 9, generator=g)
    for k in (5, 3, 1):
        elastic.set_kernel(k)
        plain = QuantConv2d(4, 6, k, stride, k // 2, weight_bits=8, act_bits=8).eval()
        a = (5 - k) // 2
        with torch.no_grad():
            plain.weight.copy_(elastic.weight[:, :, a:a + k, a:a + k])
            assert torch.equal(elastic(x), plain(x)), k  # identity transforms (D = 0): the plain crop
    with pytest.raises(ValueError, match="kernel_choices"):
        elastic.set_kernel(7)


def test_extract_gives_the_resnet_q_the_supernet_computes(tmp_path: Path) -> None:
    from edgecloud.bundle import Bundle
    from edgecloud.data.classes import CIFAR10_CLASSES
    from edgecloud.export_edge import export_edge_bundle

    torch.manual_seed(0)
    sup = create_model("resnet_q_elastic", **TINY, kernel_choices=[1, 3, 5]).eval()
    _randomise_bn(sup)
    with torch.no_grad():  # trained-looking transforms: the extracted weights are the transformed crops
        for _, conv in sup.block_convs():
            for p in conv.transforms.values():
                p.normal_(0.0, 0.1)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for ks in ([5] * 6, [1] * 6, [3, 1, 5, 3, 1, 5]):
        sup.set_kernels(ks)
        net = sup.extract()
        assert type(net).__name__ == "QuantResNet" and net.kernels == ks
        with torch.no_grad():
            want = sup(x)[0]
            assert torch.equal(net(x)[0], want)
        # an ordinary resnet_q: same state_dict layout, initialisable from the supernet, exportable
        fresh = create_model("resnet_q", **TINY, kernels=ks)
        fresh.init_from(sup)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x)[0], want)
    path = export_edge_bundle(net, tmp_path / "sub", name="sub", family="resnet_q", arch={**TINY, "kernels": ks},
                              classes=CIFAR10_CLASSES)
    with torch.no_grad():
        assert torch.equal(Bundle(path).build_model()(x)[0], want)


def test_supernet_from_a_resnet_q_computes_it_at_its_kernel_and_with_a_zero_ring() -> None:
    torch.manual_seed(3)
    base = create_model("resnet_q", **TINY).eval()
    _randomise_bn(base)
    sup = create_model("resnet_q_elastic", **TINY, kernel_choices=[1, 3, 5])
    sup.init_from(base)
    sup.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = base(x)[0]
        for k in (3, 5):  # 3: the crop is the source; 5: the source zero-padded
            sup.set_kernels([k] * 6)
            assert torch.equal(sup(x)[0], want)


def test_sandwich_configurations_are_seeded_per_step() -> None:
    sup = create_model("resnet_q_elastic", **TINY, kernel_choices=[1, 3, 5])
    a = sample_subnets(sup, ["max", "min", "random", "random"], seed=0, step=7)
    assert a == sample_subnets(sup, ["max", "min", "random", "random"], seed=0, step=7)
    assert a[0] == [5] * 6 and a[1] == [1] * 6 and a[2] != a[3]
    draws = {tuple(sample_subnets(sup, ["random"], seed=0, step=s)[0]) for s in range(20)}
    assert len(draws) > 10 and {k for d in draws for k in d} == {1, 3, 5}
    with pytest.raises(ValueError, match="elastic"):
        sample_subnets(create_model("resnet_q", **TINY), ["max"], seed=0, step=0)


def test_bn_running_statistics_follow_the_largest_configuration_only() -> None:
    sup = create_model("resnet_q_elastic", **TINY, kernel_choices=[1, 3, 5]).train()
    x = torch.rand(8, 3, 32, 32)
    before = sup.blocks[0].bn1.running_mean.clone()
    sup.set_kernels([1] * 6)
    with torch.no_grad():
        sup(x)
    assert torch.equal(sup.blocks[0].bn1.running_mean, before)
    sup.set_kernels(None)  # all 5: the default
    with torch.no_grad():
        sup(x)
    assert not torch.equal(sup.blocks[0].bn1.running_mean, before)
    assert sup.blocks[0].bn1.momentum == 0.1


# ---- cost ---------------------------------------------------------------------------------------------------

def _space(net, kernels=(1, 3, 5), xbars=(32, 64, 128, 256)):
    from edgecloud.codesign.nax import SearchSpace, layer_geometry

    return SearchSpace(tuple(layer_geometry(net)), tuple(kernels), tuple(xbars))


def test_candidate_edap_is_the_cost_model_on_its_layouts() -> None:
    from edgecloud.cim.backend import create_backend
    from edgecloud.cim.cost import CostModel, LayerLayout, layouts_from_backend
    from edgecloud.codesign.nax import Candidate, candidate_cost
    from edgecloud.nets.edge_only import EdgeOnlyModel

    sup = create_model("resnet_q_elastic", **TINY, kernel_choices=[1, 3, 5]).eval()
    space = _space(sup)
    assert space.layers == ["net.stem", "net.blocks.0.conv1", "net.blocks.0.conv2", "net.blocks.1.conv1",
                            "net.blocks.1.conv2", "net.blocks.1.short.0", "net.blocks.2.conv1", "net.blocks.2.conv2",
                            "net.blocks.2.short.0", "net.fc"]
    cand = Candidate((1, 5, 3, 5, 1, 3), (32, 64, 128, 256, 32, 64, 128, 256, 32, 64))
    # by hand: K = C k^2, positions = output pixels (32x32, 16x16, 8x8), 8-bit ADCs of the typical preset
    shapes = [("net.stem", 27, 4, 1024), ("net.blocks.0.conv1", 4 * 1, 4, 1024),
              ("net.blocks.0.conv2", 4 * 25, 4, 1024),
              ("net.blocks.1.conv1", 4 * 9, 8, 256), ("net.blocks.1.conv2", 8 * 25, 8, 256),
              ("net.blocks.1.short.0", 4, 8, 256), ("net.blocks.2.conv1", 8 * 1, 8, 64),
              ("net.blocks.2.conv2", 8 * 9, 8, 64), ("net.blocks.2.short.0", 8, 8, 64), ("net.fc", 8, 10, 1)]
    layouts = [LayerLayout.plan(n, k, o, weight_bits=8, act_bits=8, rows=x, cols=x, positions=p, adc_bits=8)
               for (n, k, o, p), x in zip(shapes, cand.xbars)]
    want = CostModel().cost(layouts)
    got = candidate_cost(space, cand, {"preset": "typical"})
    assert got.edap == want.edap and got.energy_j == want.energy_j and got.area_mm2 == want.area_mm2
    # and the layouts are those the crossbar backend programs for that candidate
    model = EdgeOnlyModel(sup.extract(list(cand.kernels))).eval()
    backend = create_backend("crossbar", {"preset": "typical", "layers": space.hardware(cand)}, seed=0)
    backend.prepare(model)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert layouts_from_backend(backend) == layouts
    assert space.layouts(cand) == layouts


def test_bigger_crossbars_give_lower_edap_for_the_same_kernels() -> None:
    from edgecloud.codesign.nax import candidate_cost

    space = _space(create_model("resnet_q_elastic", kernel_choices=[1, 3, 5]))  # the real ResNet-20 shapes
    assert len(space.layers) == 22 and len(space.kernel_layers) == 18
    for k in (1, 3, 5):
        edap = [candidate_cost(space, space.uniform(k, x), {"preset": "typical"}).edap for x in (32, 64, 128)]
        assert edap[0] > edap[1] > edap[2], (k, edap)
    # and larger kernels cost more on the same crossbars
    assert candidate_cost(space, space.uniform(5, 64)).edap > candidate_cost(space, space.uniform(3, 64)).edap


def test_tail_quantiles_equal_torch_quantile_bit_for_bit() -> None:
    from edgecloud.cim.adc import tail_quantiles

    g = torch.Generator().manual_seed(0)
    for n, j in ((4096, 7), (1, 3), (9, 4), (1000, 5)):
        x = torch.randn(n, j, generator=g, dtype=torch.float64)
        if n == 1000:
            x = x.mul(3).round()  # ties
        for p in (99.9, 99.0, 100.0):
            want = torch.quantile(x, torch.tensor([1 - p / 100, p / 100], dtype=torch.float64), dim=0)
            lo, hi = tail_quantiles(x, 1 - p / 100, p / 100)
            assert torch.equal(lo, want[0]) and torch.equal(hi, want[1])


# ---- supernet training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar_pickles(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def supernet_run(cifar_root, tmp_path_factory) -> Path:
    """A tiny supernet trained one epoch with the sandwich rule (also the training-loop test)."""
    from edgecloud.train.loop import finalize, load_splits, run_training
    from edgecloud.train.recipe import Recipe

    out = tmp_path_factory.mktemp("supernet")
    recipe = Recipe.model_validate({
        "name": "tiny-supernet", "family": "resnet_q_elastic", "arch": {**TINY, "kernel_choices": [1, 3]},
        "data": {"dataset": "cifar10", "root": str(cifar_root), "val_fraction": 0.2, "crop_padding": 2, "hflip": True},
        "supernet": {"sandwich": ["max", "min", "random"]},
        "optim": {"epochs": 1, "batch_size": 20, "optimizer": "adamw", "lr": 3e-3, "channels_last": False},
    })
    splits = load_splits(recipe)
    result = run_training(recipe, out, splits=splits, progress=False)
    assert result.model.active_kernels() == [3] * 6  # between steps: the largest kernels
    moved = [float(p.detach().abs().sum()) for _, conv in result.model.block_convs() for p in conv.transforms.values()]
    assert all(m > 0 for m in moved)  # the smallest sub-network trained the 3 -> 1 transforms
    finalize(result.model, recipe, out / "bundle", splits=splits)
    return out


# ---- the search --------------------------------------------------------------------------------------------

def _search_args(supernet: Path, cifar_root: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "nax", str(supernet), "--trials", "3", "--population", "2", "--chips", "1",
            "--val-limit", "10", "--xbars", "32,64", "--kernels", "1,3", "--bn-images", "20",
            "--calib-images", "10", "--data-root", str(cifar_root), "--out", str(out), "--no-progress",
            "--threads", "1", *extra]


def test_search_cli_end_to_end(supernet_run, cifar_root, tmp_path, capsys) -> None:
    from edgecloud.bundle import Bundle
    from edgecloud.cim.backend import create_backend
    from edgecloud.cli import main
    from edgecloud.train.recipe import load_recipe

    out = tmp_path / "nax"
    assert main(_search_args(supernet_run / "bundle", cifar_root, out, "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trials"] == 3 and len(summary["references"]) == 2 and summary["pareto"]
    with open(summary["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["kind"] for r in rows] == ["reference"] * 2 + ["trial"] * 3
    # warm start: the first trials are the uniform 3x3 networks at each crossbar size; the one the
    # reference already measured is the same measurement
    kcols = [c for c in rows[0] if c.startswith("k:")]
    xcols = [c for c in rows[0] if c.startswith("xbar:")]
    for row, x in zip(rows[2:4], ("32", "64")):
        assert {row[c] for c in kcols} == {"3"} and {row[c] for c in xcols} == {x}
    assert rows[3]["accuracy_chips"] == rows[0]["accuracy_chips"] and rows[3]["edap"] == rows[0]["edap"]
    assert summary["chosen"]["trial"] != 1  # a reference is never the pick
    assert {"accuracy_mean", "accuracy_std", "energy_j", "latency_s", "area_mm2", "edap", "k:blocks.0.conv1",
            "xbar:stem", "xbar:fc"} <= set(rows[0])
    assert Path(summary["png"]).stat().st_size > 0 and Path(summary["pareto_csv"]).is_file()
    choice = yaml.safe_load(Path(summary["choice_yaml"]).read_text())
    assert choice["family"] == "resnet_q" and len(choice["arch"]["kernels"]) == 6
    layers = choice["hardware"]["crossbar"]["layers"]
    assert len(layers) == 10 and all(v["rows"] == v["cols"] in (32, 64) for v in layers.values())
    # the chosen sub-network is an ordinary bundle that the crossbar runs with the chosen layout
    chosen = Bundle(Path(summary["chosen_bundle"]))
    model = chosen.build_model()
    assert chosen.manifest.family == "resnet_q" and chosen.manifest.arch["kernels"] == choice["arch"]["kernels"]
    create_backend("crossbar", {"preset": "typical", "layers": layers}, seed=0).prepare(model)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32))[0].shape == (2, 10)
    for key in ("retrain_chosen", "retrain_reference"):
        recipe = load_recipe(summary[key])
        assert recipe.family == "resnet_q" and recipe.init is not None and recipe.data.root == str(cifar_root)
    assert load_recipe(summary["retrain_reference"]).arch["kernels"] == [3] * 6
    assert load_recipe(summary["retrain_chosen"]).hardware == choice["hardware"]
    # the retrained bundle keeps the chosen layout: eval --backend crossbar runs it as the search scored it
    assert main(["train", summary["retrain_chosen"], "--epochs", "1", "--limit", "64", "--no-progress",
                 "--out", str(tmp_path / "retrain"), "--export", str(tmp_path / "retrained")]) == 0
    retrained = Bundle(tmp_path / "retrained")
    assert retrained.manifest.hardware == choice["hardware"]
    assert "Hardware defaults" in (tmp_path / "retrained" / "README.md").read_text()
    # a run folder works as well, and errors are one line
    assert main(_search_args(supernet_run, cifar_root, tmp_path / "run", "--no-export", "--trials", "1")) == 0
    capsys.readouterr()
    assert main(_search_args(supernet_run, cifar_root, tmp_path / "bad", "--kernels", "1,3,5")) == 2
    assert "trained for kernels [1, 3] only" in capsys.readouterr().err


def test_seeded_search_repeats_exactly_and_resumes_from_its_cache(supernet_run, cifar_root, tmp_path) -> None:
    from edgecloud.codesign.nax import NaxConfig, run_search, write_outputs

    def search(out: Path):
        config = NaxConfig(supernet=str(supernet_run / "bundle"), out=str(out), trials=5, population=2, chips=2,
                           val_limit=10, xbars=(32, 64), kernels=(1, 3), bn_images=20, calib_images=10,
                           data_root=str(cifar_root), seed=3)
        result = run_search(config, progress=False)
        write_outputs(result, out, export=False)
        return result, (out / "trials.csv").read_text()

    first, csv_a = search(tmp_path / "a")
    second, csv_b = search(tmp_path / "b")
    assert csv_a == csv_b
    assert [r.accuracy_chips for r in first.rows] == [r.accuracy_chips for r in second.rows]
    assert len({(r.kernels, r.xbars) for r in first.rows}) > 1
    again, csv_c = search(tmp_path / "a")  # the same folder: every measurement from the cache
    assert csv_c == csv_a and again.info["measured"] == 0 and again.info["cache_hits"] > 0
