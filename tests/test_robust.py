"""Adversarial robustness on simulated hardware: the differentiable hardware model, the attacks,
the input discretiser and the ``edgecloud robust`` grid (tiny quantized ResNets, synthetic data)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecloud.cim.backend import create_backend
from edgecloud.nets import create_model
from edgecloud.nn.discretize import discretize
from edgecloud.robust import attacks
from edgecloud.robust.hardware import HardwareModel
from synthetic_cifar import write_cifar_pickles

ARCH = {"depth": 8, "num_classes": 10, "weight_bits": 8, "act_bits": 8, "widths": [8, 16, 16]}
# An ideal crossbar (exact ADC, no noise, no variation): equals the digital reference exactly.
IDEAL = {"rows": 32, "cell_bits": 1, "dac_bits": 1}
NOISY = {"preset": "typical"}


def _templates() -> torch.Tensor:
    return torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 10 classes: a fixed random template per class plus noise (learnable in seconds)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = 0.6 * _templates()[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=gen)
    return (x * 255).round() / 255, y


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A tiny 8-bit quantized ResNet trained (quantization-aware) to ~100% on the synthetic task."""
    torch.manual_seed(0)
    net = create_model("resnet_q", **ARCH)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = synthetic(320, seed=1)
    net.train()
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = F.cross_entropy(net(x[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---- the differentiable hardware model ------------------------------------------------------

def test_forward_equals_the_backend_inference(trained) -> None:
    """Forward (with or without gradients) = the backend's own inference on the same chip."""
    x, _ = synthetic(16, seed=2)
    hw = HardwareModel(trained, "crossbar", NOISY, [3])
    reference = copy.deepcopy(trained).eval()
    create_backend("crossbar", NOISY, seed=3).prepare(reference)
    with torch.no_grad():
        want = [reference(x)[0] for _ in range(2)]
        got = [hw(x)]
    got.append(hw(x.clone().requires_grad_(True)).detach())  # the BPDA path: same values
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(want[0], want[1])  # read noise: each call draws anew


def test_gradient_equals_the_digital_gradient_at_ideal_settings(trained) -> None:
    x, y = synthetic(8, seed=3)
    digital = HardwareModel(trained, "digital")
    ideal = HardwareModel(trained, "crossbar", IDEAL, [0])
    logits_d, grad_d = attacks._logits_grad(digital, x, y)
    logits_i, grad_i = attacks._logits_grad(ideal, x, y)
    torch.testing.assert_close(logits_i, logits_d)
    torch.testing.assert_close(grad_i, grad_d)
    assert grad_d.abs().sum() > 0


def test_noisy_hardware_gradient_differs_but_points_the_same_way(trained) -> None:
    x, y = synthetic(8, seed=3)
    _, grad_d = attacks._logits_grad(HardwareModel(trained, "digital"), x, y)
    _, grad_h = attacks._logits_grad(HardwareModel(trained, "crossbar", NOISY, [0]), x, y)
    assert not torch.equal(grad_h, grad_d)
    assert F.cosine_similarity(grad_h.flatten(), grad_d.flatten(), dim=0) > 0.3


def test_eot_averages_reads_and_chips(trained) -> None:
    x, _ = synthetic(4, seed=4)
    eot = HardwareModel(trained, "crossbar", NOISY, [0, 1], eot_reads=2)
    assert eot.draws == 4
    chips = [HardwareModel(trained, "crossbar", NOISY, [s]) for s in (0, 1)]
    with torch.no_grad():
        want = sum(c(x) + c(x) for c in chips) / 4
        got = eot(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_network_is_never_modified(trained) -> None:
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    hw = HardwareModel(trained, "crossbar", NOISY, [0])
    attacks.pgd(hw, *synthetic(4, seed=5), 8 / 255, steps=2)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert all(layer.mvm_fn is None for layer in trained.modules() if hasattr(layer, "mvm_fn"))


def test_unknown_output_names_the_outputs(trained) -> None:
    with pytest.raises(ValueError, match="final"):
        HardwareModel(trained, "digital", output="edge")


# ---- attacks ---------------------------------------------------------------------------------

def test_large_eps_pgd_drives_a_trained_net_to_zero(trained) -> None:
    x, y = synthetic(50, seed=6)
    digital = HardwareModel(trained, "digital")
    assert _acc(digital, x, y) >= 0.9
    adv = attacks.pgd(digital, x, y, 32 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 32 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _acc(digital, adv, y) <= 0.04
    hil = HardwareModel(trained, "crossbar", NOISY, [0])
    adv_hw = attacks.pgd(hil, x, y, 32 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert _acc(hil, adv_hw, y) <= 0.04  # hardware in loop: the gradient through BPDA still works


def test_fgsm_is_one_signed_step(trained) -> None:
    x, y = synthetic(8, seed=7)
    digital = HardwareModel(trained, "digital")
    adv = attacks.fgsm(digital, x, y, 2 / 255)
    _, grad = attacks._logits_grad(digital, x, y)
    torch.testing.assert_close(adv, (x + 2 / 255 * grad.sign()).clamp(0, 1))


def test_early_stop_keeps_every_success(trained) -> None:
    x, y = synthetic(40, seed=8)
    digital = HardwareModel(trained, "digital")
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    full = attacks.pgd(digital, x, y, 6 / 255, steps=10, generator=gen())
    early = attacks.pgd(digital, x, y, 6 / 255, steps=10, generator=gen(), stop_on_success=True)
    assert (early - x).abs().max() <= 6 / 255 + 1e-6
    assert _acc(digital, early, y) <= _acc(digital, full, y) + 0.05


def test_pgd_agrees_with_art(trained) -> None:
    """Our PGD and IBM ART's ProjectedGradientDescent reach similar accuracy (same budget, no random start)."""
    from art.attacks.evasion import ProjectedGradientDescent

    from edgecloud.robust.estimator import art_classifier

    x, y = synthetic(50, seed=9)
    digital = HardwareModel(trained, "digital")
    eps = 3 / 255
    ours = attacks.pgd(digital, x, y, eps, steps=10, random_start=False)
    art = ProjectedGradientDescent(art_classifier(digital, x.shape[1:], 10), norm=np.inf, eps=eps,
                                   eps_step=2.5 * eps / 10, max_iter=10, num_random_init=0, verbose=False)
    theirs = torch.from_numpy(art.generate(x.numpy(), y=y.numpy()))
    assert abs(_acc(digital, ours, y) - _acc(digital, theirs, y)) <= 0.1
    assert _acc(digital, ours, y) < _acc(digital, x, y)


def test_square_is_seeded_and_stays_in_the_ball(trained) -> None:
    x, y = synthetic(10, seed=10)
    digital = HardwareModel(trained, "digital")
    a = attacks.square(digital, x, y, 16 / 255, queries=20, seed=5)
    b = attacks.square(digital, x, y, 16 / 255, queries=20, seed=5)
    assert torch.equal(a, b)
    assert (a - x).abs().max() <= 16 / 255 + 1e-6


def test_square_linf_follows_the_schedule_and_beats_a_random_corner() -> None:
    from edgecloud.robust.square import p_selection

    assert p_selection(0.05, 0, 1000) == 0.05
    assert p_selection(0.05, 3, 1000) == 0.025      # 30/10000 of the run: halved once
    assert p_selection(0.05, 999, 1000) == 0.05 / 512
    assert p_selection(0.05, 10, 100) == 0.05 / 16  # the grid rescales to the iterations


def test_square_linf_fools_more_than_random_noise_and_counts_its_queries(trained) -> None:
    from edgecloud.robust.square import square_linf

    x, y = synthetic(40, seed=11)
    digital = HardwareModel(trained, "digital")
    eps = 48 / 255
    adv, used = square_linf(digital, x, y, eps, queries=60, generator=torch.Generator().manual_seed(1))
    noise = (x + eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))).clamp(0, 1)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _acc(digital, adv, y) < _acc(digital, noise, y) - 0.2
    assert int(used.max()) <= 61 and int(used.min()) >= 1  # initialisation + one per iteration
    fooled = digital(adv).argmax(1) != y
    assert bool((used[fooled] < 61).any())  # fooled images left the search early


def test_square_linf_confirms_a_noisy_read_before_an_image_leaves() -> None:
    from edgecloud.robust.square import square_linf

    class Coin(torch.nn.Module):  # right on every other read: one read proves nothing
        deterministic = False

        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.reads += 1
            logits = torch.zeros(x.shape[0], 2)
            logits[:, 0 if self.reads % 2 else 1] = 1.0
            return logits

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    _, used = square_linf(Coin(), x, y, 8 / 255, queries=5)
    assert int(used.min()) >= 2  # every "fooled" read was re-read before anything left


# ---- discretisation --------------------------------------------------------------------------

def test_discretiser_at_8_bits_is_the_identity_on_uint8_images() -> None:
    x = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(3, 16, 16) / 255
    assert torch.equal(discretize(x, 8), x)


def test_two_bit_discretiser_has_four_levels_and_an_identity_gradient() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = discretize(x, 2)
    levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    assert torch.isclose(out.detach().unsqueeze(-1), levels).any(-1).all()
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="1..16"):
        discretize(x, 0)


def test_small_perturbations_vanish_under_discretisation() -> None:
    x = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    assert torch.equal(discretize(x + 2 / 255, 2), discretize(x, 2))


# ---- the grid and the CLI --------------------------------------------------------------------

def _write_cifar(root: Path) -> Path:
    """A CIFAR-10 pickle folder of synthetic images (the synthetic task above, as uint8)."""
    return write_cifar_pickles(root)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    from edgecloud.data.classes import CIFAR10_CLASSES
    from edgecloud.export_edge import export_edge_bundle

    out = tmp_path_factory.mktemp("robust") / "tiny-q"
    return export_edge_bundle(trained, out, name="tiny-q", family="resnet_q", arch=ARCH, classes=CIFAR10_CLASSES,
                              training={"data": {"dataset": "cifar10"}, "seed": 0})


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return _write_cifar(tmp_path_factory.mktemp("cifar"))


def _config(bundle: Path, cifar_root: Path, **kw):
    from edgecloud.robust.runner import RobustConfig

    base = dict(bundle=str(bundle), data_root=str(cifar_root), limit=20, attacks=["fgsm", "pgd"],
                eps=[2 / 255, 16 / 255], steps=3, backends=["digital", "crossbar"],
                backend_options={"crossbar": NOISY}, threats=["non-adaptive", "hardware-in-loop"], chips=2,
                calib_samples=10, batch_size=10, workers=1)
    base.update(kw)
    return RobustConfig(**base)


def test_grid_rows_repeat_exactly_and_resume_from_the_cache(bundle, cifar_root, tmp_path) -> None:
    from edgecloud.robust.runner import run_robustness

    rows, info = run_robustness(_config(bundle, cifar_root), progress=False)
    again, _ = run_robustness(_config(bundle, cifar_root), progress=False)
    assert [r.__dict__ for r in rows] == [r.__dict__ for r in again]
    assert info["data"] and info["bundle"] == "tiny-q"
    kinds = {(r.backend, r.threat) for r in rows}
    assert kinds == {("digital", "clean"), ("digital", "white-box"), ("crossbar", "clean"),
                     ("crossbar", "non-adaptive"), ("crossbar", "hardware-in-loop")}
    assert len([r for r in rows if r.backend == "crossbar" and r.threat == "hardware-in-loop"]) == 2 * 2 * 2
    # 16/255 PGD takes the digital model to (near) zero; the clean accuracy is high
    acc = {(r.backend, r.threat, r.attack, r.eps, r.chip): r.accuracy for r in rows}
    assert acc[("digital", "clean", "none", 0.0, None)] >= 0.9
    assert acc[("digital", "white-box", "pgd", 16 / 255, None)] <= 0.1
    # a run stopped half way resumes: drop the last rows of one chip's cache, rerun, same rows
    cache = tmp_path / "cache"
    first, _ = run_robustness(_config(bundle, cifar_root, cache=str(cache)), progress=False)
    assert [r.__dict__ for r in first] == [r.__dict__ for r in rows]
    chip_file = next(cache.glob("*/crossbar-chip1.jsonl"))
    lines = chip_file.read_text().splitlines()
    chip_file.write_text("\n".join(lines[:3]) + "\n")
    (next(cache.glob("*/digital.jsonl"))).unlink()
    resumed, _ = run_robustness(_config(bundle, cifar_root, cache=str(cache)), progress=False)
    assert [r.__dict__ for r in resumed] == [r.__dict__ for r in rows]
    # a narrower grid (one threat, one eps, one chip) measures the same rows, and a later wider run
    # reuses them from the cache: rows do not depend on the grid around them
    narrow_cache = tmp_path / "narrow"
    narrow, _ = run_robustness(_config(bundle, cifar_root, cache=str(narrow_cache), threats=["hardware-in-loop"],
                                       eps=[16 / 255], chips=1), progress=False)
    full = {(r.backend, r.threat, r.attack, r.eps, r.chip): r.accuracy for r in rows}
    assert all(full[(r.backend, r.threat, r.attack, r.eps, r.chip)] == r.accuracy for r in narrow)
    widened, _ = run_robustness(_config(bundle, cifar_root, cache=str(narrow_cache)), progress=False)
    assert [r.__dict__ for r in widened] == [r.__dict__ for r in rows]
    assert len(list(narrow_cache.iterdir())) == 1  # one key: the grid's axes are not part of it


def test_cli_json_and_errors(bundle, cifar_root, tmp_path, capsys) -> None:
    from edgecloud.cli import main

    out = tmp_path / "out"
    code = main(["robust", str(bundle), "--data-root", str(cifar_root), "--limit", "10", "--attack", "fgsm",
                 "--eps", "4/255", "--backend", "digital", "--batch-size", "10", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["threat"] for r in summary["results"]} == {"clean", "white-box"}
    assert summary["results"][1]["eps"] == pytest.approx(4 / 255)
    assert (out / "robust.csv").is_file() and (out / "robust.png").is_file()
    for argv, message in [
        (["--eps", "two"], "--eps"), (["--attack", "cw"], "--attack"), (["--backend", "quantum"], "--backend"),
        (["--threat", "psychic"], "--threat"), (["--chips", "0"], "--chips"),
        (["--attack", "transfer"], "--transfer-from"),
    ]:
        assert main(["robust", str(bundle), "--data-root", str(cifar_root), *argv]) == 2
        assert message in capsys.readouterr().err


def test_edge_runner_discretises_requests(bundle) -> None:
    from edgecloud.bundle import Bundle
    from edgecloud.edge.runner import EdgeRunner

    b = Bundle(bundle)
    plain, defended = EdgeRunner(b), EdgeRunner(b, input_bits=2)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    assert torch.equal(plain.to_tensor(x), torch.from_numpy(x))
    assert torch.equal(defended.to_tensor(x), discretize(torch.from_numpy(x), 2))
    u8 = (x * 255).astype(np.uint8)
    assert torch.equal(EdgeRunner(b, input_bits=8).to_tensor(u8), plain.to_tensor(u8))
    with pytest.raises(ValueError, match="1..16"):
        EdgeRunner(b, input_bits=0)


def test_square_p_init_enters_the_cache_key_only_for_square_runs(bundle, cifar_root) -> None:
    pgd = _config(bundle, cifar_root).key()
    assert _config(bundle, cifar_root, square_p_init=0.05).key() == pgd  # PGD-only runs keep their keys
    square = _config(bundle, cifar_root, attacks=["square"])
    assert _config(bundle, cifar_root, attacks=["square"], square_p_init=0.05).key() != square.key()
    with pytest.raises(ValueError, match="--square-p-init"):
        _config(bundle, cifar_root, square_p_init=0.0)
    with pytest.raises(ValueError, match="--queries"):
        _config(bundle, cifar_root, queries=0)


def test_crafting_through_a_chip_resumes_from_a_checkpoint_exactly(trained, tmp_path) -> None:
    """A hardware-in-loop attack stopped between batches continues from its checkpoint and gives
    the uninterrupted run's images bit for bit (generator and read noise restored)."""
    from edgecloud.robust.runner import RobustConfig, craft

    x, y = synthetic(12, seed=12)
    calib, _ = synthetic(8, seed=13)
    config = RobustConfig(bundle="unused", queries=6, batch_size=4, square_p_init=0.3)

    def chip() -> HardwareModel:
        model = HardwareModel(trained, "crossbar", NOISY, [0])
        model.calibrate(calib)
        model.restart_reads("hardware-in-loop/square")
        return model

    class Stops(torch.nn.Module):  # the session ends during the second batch
        deterministic = False

        def __init__(self, model: HardwareModel, after: int) -> None:
            super().__init__()
            self.model, self.calls, self.after = model, 0, after
            self.read_state, self.set_read_state = model.read_state, model.set_read_state

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return self.model(xb)

    key = ("crossbar", 0, "hardware-in-loop")
    whole = craft(chip(), "square", x, y, 16 / 255, config, key)
    path = tmp_path / "unit.partial.pt.zst"
    first = chip()
    calls_per_batch = Stops(chip(), 10**9)
    craft(calls_per_batch, "square", x[:4], y[:4], 16 / 255, config, key)
    with pytest.raises(KeyboardInterrupt):
        craft(Stops(first, calls_per_batch.calls + 2), "square", x, y, 16 / 255, config, key, path)
    assert path.is_file()
    resumed = craft(chip(), "square", x, y, 16 / 255, config, key, path)
    assert torch.equal(resumed, whole)
    # a checkpoint made for other images is not used
    other = craft(chip(), "square", x.flip(0), y.flip(0), 16 / 255, config, key, path)
    assert torch.equal(other, craft(chip(), "square", x.flip(0), y.flip(0), 16 / 255, config, key))
