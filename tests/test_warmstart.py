"""Warm starts (init from a run, distillation, frozen parts), the binary exit branch and the
binary training fast path."""

from __future__ import annotations

import pytest
import torch

from edgecloud.nets import create_model
from tests.test_train_export import _toy_recipe, toy_data  # noqa: F401  (fixture)


@pytest.mark.parametrize("stride", [1, 2])
def test_binary_training_path_equals_the_integer_form(stride: int) -> None:
    from edgecloud.nn.quant import QuantConv2d

    torch.manual_seed(0)
    conv = QuantConv2d(8, 16, 3, stride, 1, weight_bits=1, act_bits=1)
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    fast = conv(x)  # grad enabled, digital: the fast path
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, conv.weight])
    ref = conv.quant_forward(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, conv.weight])
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref)  # inference uses the integer form itself


def _random_resnet8() -> torch.nn.Module:
    torch.manual_seed(3)
    net = create_model("resnet", depth=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def test_hybrid_exit_branch_builds_routes_and_inits_from_a_resnet() -> None:
    src = _random_resnet8()
    model = create_model("cifar_hybrid", depth=8, edge_blocks=2, exit_blocks=[[64, 2]], exit_pool=1)
    assert model.init_from(src) == []
    net = src.net
    assert torch.equal(model.stem[0].weight, net.stem[0].weight)
    assert torch.equal(model.edge[1].unit1.conv.weight, net.blocks[1].conv1.weight)
    assert torch.equal(model.edge[1].short[0].weight, net.blocks[1].short[0].weight)
    assert torch.equal(model.cloud.blocks[0].conv2.weight, net.blocks[2].conv2.weight)
    branch = model.heads[0]
    assert torch.equal(branch.blocks[0].unit2.conv.weight, net.blocks[2].conv2.weight)
    assert torch.equal(branch.head.fc.weight, net.head.fc.weight)
    model.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
        ref = net(x)
    assert [o.shape for o in outs] == [(6, 10), (6, 10)]
    assert not torch.allclose(outs[1], ref)  # the edge is binary: the cloud sees other features
    with pytest.raises(ValueError, match="blocks"):
        create_model("cifar_hybrid", depth=20, edge_blocks=2).init_from(src)


def test_distillation_freeze_and_init_in_a_training_run(toy_data, tmp_path) -> None:  # noqa: F811
    from edgecloud.train.loop import build_model, load_splits, run_training, seed_everything
    from edgecloud.train.recipe import DistillSpec, InitSpec
    from edgecloud.train.warmstart import Distiller

    teacher_recipe = _toy_recipe(toy_data, epochs=1)
    splits = load_splits(teacher_recipe, with_test=False)
    run_training(teacher_recipe, tmp_path / "teacher", splits=splits, progress=False)

    # A hybrid continues a hybrid run of its own layout (staged training): an exact copy.
    from edgecloud.train.warmstart import init_from_run, load_run_model

    again = build_model(teacher_recipe)
    assert init_from_run(again, tmp_path / "teacher") == []
    for (name, a), b in zip(load_run_model(tmp_path / "teacher").state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # A family without init_from: a clear error, not a silent fresh start.
    with pytest.raises(ValueError, match="init_from"):
        init_from_run(create_model("lenet5"), tmp_path / "teacher")
    with pytest.raises(ValueError, match="differ in layers"):  # a hybrid of another layout
        run_training(teacher_recipe.model_copy(update={"init": InitSpec(checkpoint=str(tmp_path / "teacher")),
                                                       "arch": {"width": 8, "cloud_width": 8, "cloud_blocks": 2}}),
                     tmp_path / "x", splits=splits, progress=False)
    with pytest.raises(FileNotFoundError, match="train that run first"):
        run_training(teacher_recipe.model_copy(update={"distill": DistillSpec(teacher=str(tmp_path / "none"))}),
                     tmp_path / "y", splits=splits, progress=False)

    seed_everything(teacher_recipe.seed)
    fresh = build_model(teacher_recipe)  # what run_training starts from
    cloud_before = {k: v.clone() for k, v in fresh.cloud.state_dict().items()}
    student = teacher_recipe.model_copy(update={
        "distill": DistillSpec(teacher=str(tmp_path / "teacher"), alpha=0.5, temperature=2.0),
        "freeze": ["cloud"],
    })
    result = run_training(student, tmp_path / "student", splits=splits, progress=False)
    assert result.history[0]["val_accuracy"][0] > 0.5  # the edge exit learned (from labels + teacher)
    for k, v in result.model.cloud.state_dict().items():
        assert torch.equal(v, cloud_before[k]), k  # frozen: weights and BN statistics
    with pytest.raises(ValueError, match="no submodule 'clouds'"):
        run_training(student.model_copy(update={"freeze": ["clouds"]}), tmp_path / "z", splits=splits, progress=False)

    # The distillation term vanishes when the student already matches the teacher (alpha = 1).
    d = Distiller(DistillSpec(teacher=str(tmp_path / "teacher"), alpha=1.0, temperature=3.0))
    logits = torch.randn(5, 10)
    assert float(d.loss([logits], torch.zeros(5, dtype=torch.long), logits, [1.0])) == pytest.approx(0.0, abs=1e-6)
    assert float(d.loss([torch.randn(5, 10)], torch.zeros(5, dtype=torch.long), logits, [1.0])) > 0.0


def test_meanet_takes_its_cloud_from_a_resnet_run() -> None:
    src = _random_resnet8()
    model = create_model("meanet", main_depth=8, cloud_depth=8, width=4, num_hard=5)
    left = model.init_from(src)
    assert "main" in left and "cloud" not in left
    for k, v in model.cloud.state_dict().items():
        assert torch.equal(v, src.net.state_dict()[k]), k
    with pytest.raises(ValueError, match="cloud_depth"):
        create_model("meanet", main_depth=8, cloud_depth=20, width=4).init_from(src)
