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
