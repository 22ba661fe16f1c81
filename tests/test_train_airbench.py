"""Airbench-style recipe options (EMA, Lookahead, alternating flips, flip TTA, two-step binary
training, the patch-whitening stem): each does what it says, resumes exactly, and is off by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _splits(n: int = 64, channels: int = 1, size: int = 28):
    """A learnable toy set (a bright patch whose place is the class), used as train and validation."""
    from edgecloud.data.dataset import ImageDataset
    from edgecloud.train.loop import Splits

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 60, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    for i in range(n):
        r, q = divmod(int(labels[i]), 4)
        images[i, :, r * 7 + 3:r * 7 + 10, q * 7:q * 7 + 7] = 230
    ds = ImageDataset(images, labels, tuple("abcdefghij"))
    return Splits(ds, ds.subset(torch.arange(16)), None)


def _recipe(data: dict | None = None, family: str = "lenet5", arch: dict | None = None, **extra):
    from edgecloud.train.recipe import Recipe

    optim = {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "schedule": "constant",
             "channels_last": False, **extra.pop("optim", {})}
    return Recipe.model_validate({
        "name": "tiny", "family": family, "arch": arch or {"weight_bits": 1, "act_bits": 1}, "seed": 2,
        "data": {"dataset": "fashion-mnist", **(data or {})}, "optim": optim, **extra,
    })


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip_wall(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "wall_time_s"} for h in history]


# ---- recipe fields -------------------------------------------------------------------------------

def test_new_fields_default_off_and_old_checkpoints_still_match() -> None:
    r = _recipe()
    assert (r.optim.ema, r.optim.lookahead, r.optim.binary_weights_from_epoch, r.data.flip) == (None, None, None, None)
    assert r.eval.tta_flip is False and r.data.flip_mode is None
    dump = r.training_dump()
    assert "eval" not in dump  # validation-only: never blocks a resume
    assert not {"ema", "lookahead", "binary_weights_from_epoch"} & set(dump["optim"]) and "flip" not in dump["data"]
    # a checkpoint written before these fields existed holds none of them: it still matches
    from edgecloud.train.recipe import training_fields

    old = r.model_dump(mode="json")
    for section, name in (("optim", "ema"), ("optim", "lookahead"), ("optim", "binary_weights_from_epoch"),
                          ("data", "flip")):
        del old[section][name]
    del old["eval"]
    assert training_fields(old) == dump
    # set, they are part of what a resume must match
    assert _recipe(optim={"ema": {"decay": 0.9}}).training_dump() != dump
    assert _recipe(data={"hflip": True}).data.flip_mode == "random"
    # flip: random is stored as hflip: true, so it is the same run and resumes its checkpoints
    assert _recipe(data={"flip": "random"}).training_dump() == _recipe(data={"hflip": True}).training_dump()
    assert _recipe(data={"flip": "alternating"}).data.flip_mode == "alternating"


def test_recipe_rejects_contradictions() -> None:
    with pytest.raises(ValueError, match="hflip"):
        _recipe(data={"hflip": True, "flip": "alternating"})
    with pytest.raises(ValueError, match="binary_weights_from_epoch"):
        _recipe(optim={"binary_weights_from_epoch": 2})  # epochs 2: nothing left for binary weights
    with pytest.raises(ValueError):
        _recipe(optim={"ema": {"decay": 1.0}})
    with pytest.raises(ValueError):
        _recipe(optim={"lookahead": {"k": 0}})


# ---- flips -----------------------------------------------------------------------------------------

def test_flip_random_is_hflip() -> None:
    from edgecloud.data.loader import Loader

    ds = _splits().train
    a = Loader(ds, 16, shuffle=True, crop_padding=2, hflip=True, seed=4)
    b = Loader(ds, 16, shuffle=True, crop_padding=2, flip="random", seed=4)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_alternating_flip_masks_complement_and_reproduce() -> None:
    from edgecloud.data.loader import Loader, alternating_flip_mask

    m0, m1, m2 = (alternating_flip_mask(1000, 5, e) for e in range(3))
    assert torch.equal(m1, ~m2) and torch.equal(m0, m2) and torch.equal(m1, ~m0)
    assert torch.equal(alternating_flip_mask(1000, 5, 1), m1)  # a function of (seed, epoch) only
    assert 400 < int(m0.sum()) < 600 and not torch.equal(alternating_flip_mask(1000, 6, 0), m0)
    # the loader applies it per image (whatever the shuffle order): epochs 1 and 2 show mirrors
    ds = _splits().train
    loader = Loader(ds, 16, shuffle=True, flip="alternating", seed=5)
    seen: dict[int, torch.Tensor] = {}
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        gen = torch.Generator().manual_seed(5 * 100_003 + epoch)
        order = torch.randperm(len(ds), generator=gen)
        xs = torch.cat([x for x, _ in loader])
        seen[epoch] = xs[order.argsort()]  # back to dataset order
    plain = ds.images.float() / 255
    mask = alternating_flip_mask(len(ds), 5, 1)
    assert torch.equal(seen[1][mask], plain[mask].flip(-1)) and torch.equal(seen[1][~mask], plain[~mask])
    assert torch.equal(seen[2], seen[1].flip(-1))


# ---- EMA and Lookahead -----------------------------------------------------------------------------

def test_ema_equals_hand_computed_average_and_copies_buffers() -> None:
    from edgecloud.train.ema import WeightEMA
    from edgecloud.train.recipe import EmaSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightEMA(model, EmaSpec(decay=0.8, every=1))
    assert not ema.ready
    snapshots = []
    for step in range(1, 4):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
        ema.step(model, step)
        snapshots.append(model[0].weight.detach().clone())
    want = snapshots[0]
    for w in snapshots[1:]:
        want = 0.8 * want + 0.2 * w
    assert ema.ready
    torch.testing.assert_close(ema.module[0].weight, want)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # BN statistics copied
    # every=2: only steps 2, 4, ... update
    ema2 = WeightEMA(model, EmaSpec(decay=0.5, every=2))
    before = ema2.module[0].weight.clone()
    ema2.step(model, 1)
    assert not ema2.ready and torch.equal(ema2.module[0].weight, before)


def test_lookahead_pulls_towards_slow_weights_every_k_steps() -> None:
    from edgecloud.train.ema import Lookahead
    from edgecloud.train.recipe import LookaheadSpec

    p = nn.Parameter(torch.zeros(2))
    la = Lookahead([p], LookaheadSpec(k=2, alpha=0.5))
    with torch.no_grad():
        p += 1.0
    la.step(1)
    assert torch.equal(p, torch.ones(2))  # not a sync step
    with torch.no_grad():
        p += 1.0  # fast = 2
    la.step(2)  # slow = 0 + 0.5 (2 - 0) = 1; fast restarts there
    assert torch.equal(p, torch.ones(2)) and torch.equal(la.slow[0], torch.ones(2))
    state = la.state_dict()
    la2 = Lookahead([nn.Parameter(torch.zeros(2))], LookaheadSpec(k=2, alpha=0.5))
    la2.load_state_dict(state)
    assert torch.equal(la2.slow[0], torch.ones(2))


def test_ema_lookahead_alternating_run_resumes_exactly(tmp_path) -> None:
    from edgecloud.train.loop import load_checkpoint, run_training

    splits = _splits()
    recipe = _recipe(data={"flip": "alternating"}, optim={"ema": {"decay": 0.7, "every": 2},
                                                         "lookahead": {"k": 3, "alpha": 0.5}},
                     eval={"tta_flip": True})
    full = run_training(recipe, tmp_path / "a", splits=splits, progress=False)
    run_training(recipe, tmp_path / "b", splits=splits, progress=False, stop_after=1)
    resumed = run_training(recipe, tmp_path / "b", splits=splits, progress=False, resume=True)
    assert _same_state(full.model.state_dict(), resumed.model.state_dict())
    assert _strip_wall(full.history) == _strip_wall(resumed.history)
    assert all(len(h["val_accuracy_tta"]) == 1 for h in full.history)
    # the checkpoint's "model" (what export, init and distill load) is the average; the trained weights
    # the resume continued from are "train_model"
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert _same_state(ckpt["model"], full.model.state_dict())
    assert not torch.equal(ckpt["train_model"]["conv1.weight"], ckpt["model"]["conv1.weight"])
    assert {"ema", "lookahead"} <= set(ckpt)
    _, loaded, _ = load_checkpoint(tmp_path / "a")
    assert _same_state(loaded.state_dict(), full.model.state_dict())


def test_default_recipe_resumes_a_checkpoint_from_before_the_options(tmp_path) -> None:
    """A checkpoint whose recipe has none of the new fields (as written before they existed) resumes,
    and gives the uninterrupted run; ``flip: random`` is the same run as ``hflip: true``."""
    from edgecloud.train.loop import run_training

    splits = _splits()
    recipe = _recipe(data={"hflip": True, "crop_padding": 2})
    full = run_training(recipe, tmp_path / "a", splits=splits, progress=False)
    run_training(recipe, tmp_path / "b", splits=splits, progress=False, stop_after=1)
    path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for key in ("ema", "lookahead", "binary_weights_from_epoch"):
        del ckpt["recipe"]["optim"][key]
    del ckpt["recipe"]["data"]["flip"], ckpt["recipe"]["eval"]
    assert "train_model" not in ckpt and "ema" not in ckpt
    torch.save(ckpt, path)
    resumed = run_training(recipe, tmp_path / "b", splits=splits, progress=False, resume=True)
    assert _same_state(full.model.state_dict(), resumed.model.state_dict())
    same = run_training(_recipe(data={"flip": "random", "crop_padding": 2}), tmp_path / "c", splits=splits,
                        progress=False)
    assert _same_state(full.model.state_dict(), same.model.state_dict())
    assert _strip_wall(full.history) == _strip_wall(same.history)


# ---- flip TTA --------------------------------------------------------------------------------------

def test_tta_accuracy_averages_the_logits_of_image_and_mirror() -> None:
    from edgecloud.data.loader import Loader
    from edgecloud.nets import create_model
    from edgecloud.train.loop import evaluate_accuracy_tta

    torch.manual_seed(0)
    model = create_model("lenet5", weight_bits=4, act_bits=4).eval()
    ds = _splits(40).val
    got = evaluate_accuracy_tta(model, ds, batch_size=7)
    x = torch.cat([b for b, _ in Loader(ds, 40)])
    with torch.no_grad():
        want = ((model(x)[0] + model(x.flip(-1))[0]).argmax(1) == ds.labels).float().mean()
    assert got == pytest.approx([float(want)])


# ---- two-step binary training ----------------------------------------------------------------------

def _binary_conv() -> "torch.nn.Module":
    from edgecloud.nn.quant import QuantConv2d

    torch.manual_seed(1)
    return QuantConv2d(3, 4, 3, padding=1, weight_bits=1, act_bits=1)


def test_real_weights_phase_uses_float_weights_then_binary() -> None:
    from edgecloud.nn.quant import set_real_weights

    conv = _binary_conv()
    x = torch.randn(2, 3, 6, 6)
    signs = F.pad(torch.where(x >= 0, 1.0, -1.0), (1, 1, 1, 1), value=-1.0)
    w = conv.weight.detach()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    binary = torch.where(centred >= 0, 1.0, -1.0) * centred.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    # default: binary weights, training (fast path) and inference (integer form) alike
    torch.testing.assert_close(conv(x), F.conv2d(signs, binary))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(signs, binary))
    assert set_real_weights(conv, True) == 1
    out = conv(x)  # phase 1: binary activations, real weights
    torch.testing.assert_close(out, F.conv2d(signs, w))
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(signs, w), rtol=1e-5, atol=1e-5)
    set_real_weights(conv, False)
    torch.testing.assert_close(conv(x), F.conv2d(signs, binary))
    # k-bit weight layers are not touched
    from edgecloud.nn.quant import QuantConv2d

    assert set_real_weights(QuantConv2d(3, 4, 3, weight_bits=4, act_bits=4), True) == 0


def test_two_step_run_switches_to_binary_weights_at_the_epoch(tmp_path) -> None:
    from edgecloud.train import loop

    splits = _splits()
    recipe = _recipe(optim={"epochs": 3, "binary_weights_from_epoch": 1})
    seen: list[bool] = []
    build = loop.build_model

    def spying_build(r):  # record, per training forward, whether conv1 ran real weights
        model = build(r)
        model.conv1.register_forward_hook(
            lambda m, i, o: seen.append(m.real_weights) if torch.is_grad_enabled() else None)
        return model

    loop.build_model = spying_build
    try:
        two = loop.run_training(recipe, tmp_path / "two", splits=splits, progress=False)
    finally:
        loop.build_model = build
    steps = len(splits.train) // 16
    assert seen == [True] * steps + [False] * 2 * steps
    assert not any(m.real_weights for m in (two.model.conv1, two.model.fc3))  # exported binary
    plain = loop.run_training(_recipe(optim={"epochs": 3}), tmp_path / "plain", splits=splits, progress=False)
    assert plain.history[0]["loss"] != two.history[0]["loss"]
    with pytest.raises(ValueError, match="binary-weight"):
        loop.run_training(_recipe(arch={"weight_bits": 4, "act_bits": 4},
                                  optim={"epochs": 2, "binary_weights_from_epoch": 1}),
                          tmp_path / "none", splits=splits, progress=False)


# ---- patch-whitening stem --------------------------------------------------------------------------

def test_whitening_stem_whitens_the_training_patches_and_stays_frozen(tmp_path) -> None:
    from edgecloud.nets import create_model
    from edgecloud.nets.resnet import PatchWhitening
    from edgecloud.train.loop import load_checkpoint, run_training

    assert not isinstance(create_model("resnet", depth=8).net.stem[0], PatchWhitening)  # default unchanged
    splits = _splits(32, channels=3, size=32)
    model = create_model("resnet", depth=8, whiten_stem=True)
    model.init_from_data(splits.train.images)
    whiten = model.net.stem[0]
    with torch.no_grad():
        z = whiten(model.net.normalize(splits.train.images.float() / 255))
    flat = z[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    second = flat @ flat.T / flat.shape[1]  # the +eigenvector half: decorrelated, unit second moment
    torch.testing.assert_close(second, torch.eye(12), atol=2e-2, rtol=0)
    torch.testing.assert_close(z[:, 12:], -z[:, :12])
    recipe = _recipe(family="resnet", arch={"depth": 8, "whiten_stem": True}, data={"dataset": "cifar10"},
                     optim={"epochs": 1, "lr": 0.02})
    res = run_training(recipe, tmp_path / "r", splits=splits, progress=False)
    assert torch.equal(res.model.net.stem[0].conv.weight, whiten.conv.weight)  # fitted at start, never trained
    _, loaded, _ = load_checkpoint(tmp_path / "r")
    assert torch.equal(loaded.net.stem[0].conv.weight, whiten.conv.weight)
