"""EfficientNet-Lite0 under the project's methods: the MedMerge probe (depthwise and 1x1
kernels alike), InMerge on its deep convs, export, one federation round, and `medmerge run`
with the `imagenet:efficientnet_lite0` source. The architecture itself, its checkpoint and
the photographs are tests/test_efficientnet_lite.py.

Without the `imagenet` extra a second random init stands in for the ImageNet source, and the
`medmerge run` test skips.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmerge_core.cli import main
from medmerge_core.data.base import preprocessing_record
from medmerge_core.efficientnet_lite import EfficientNetLite
from medmerge_core.errors import InputError
from medmerge_core.inmerge import apply_inmerge, training_hook
from medmerge_core.io import load_torch_file
from medmerge_core.models import (
    build_model,
    conv_weight_keys,
    load_source,
    norm_keys,
    save_checkpoint,
)
from medmerge_core.probe import seeded_probe
from medmerge_core.saved_model import load_saved_model
from medmerge_core.settings import InMergeSettings, ProbeSettings
from tests.test_efficientnet_lite import ARCH, SPEC, needs_checkpoint


def imagenet_or_random(channels: int) -> tuple[dict[str, torch.Tensor], str]:
    try:
        return load_source(SPEC, ARCH, channels), "imagenet"
    except InputError:  # without the imagenet extra a second random init stands in
        return load_source("random:7", ARCH, channels), "random:7"


def test_probe_trains_and_bakes_to_its_own_outputs_on_gray_32px() -> None:
    source, name = imagenet_or_random(1)
    sources = [source, load_source("random:1", ARCH, 1)]
    settings = ProbeSettings(steps=2)
    merged = seeded_probe(ARCH, 3, 1, sources, [name, "random"], settings, seed=0)
    assert merged.num_coefficients() == 8960 + 12048
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    groups = merged.parameter_groups(settings.coef_lr, 1e-3, 0.0)
    optimizer = torch.optim.AdamW(groups)
    before = [c.detach().clone() for c in merged.coefficients]
    merged.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(merged(x), y).backward()
        optimizer.step()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in merged.coefficients)
    moved = [not torch.equal(a, c) for a, c in zip(before, merged.coefficients, strict=True)]
    assert all(moved)  # depthwise and 1x1 kernels alike
    merged.eval()
    baked = merged.bake().eval()
    assert type(baked) is EfficientNetLite
    with torch.no_grad():
        torch.testing.assert_close(baked(x), merged(x), rtol=0, atol=1e-5)
    assert set(merged.probe_state()) >= set(norm_keys(merged.model))


def test_inmerge_runs_on_the_deep_convs_depthwise_included() -> None:
    source, _ = imagenet_or_random(3)
    model = build_model(ARCH, 2, 3).train()
    model.load_state_dict(source, strict=False)
    keys = conv_weight_keys(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = InMergeSettings(rule="absolute", p=1.0, tau=-1.0)  # the deepest half by default
    training_hook(config, seed=0)(model, 0)
    state = model.state_dict()
    changed = [not torch.equal(state[k], before[k]) for k in keys]
    assert changed == [i >= 25 for i in range(49)]  # 49 main-path convs, the last 24 deep
    deep_depthwise = [k for k in keys[25:] if "conv_depthwise" in k]
    assert len(deep_depthwise) == 8
    # On an aggregate (the federation's path): kernels changed, the shallow half untouched.
    merged, count = apply_inmerge(source, keys, config, torch.Generator().manual_seed(0))
    deep = sum(source[k].shape[0] for k in keys[25:])
    assert 0.9 * deep <= count <= deep
    assert all(torch.equal(merged[k], source[k]) for k in keys[:25])


def test_export_round_trips_and_onnx_gives_the_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(ARCH, 3, 1)
    source, _ = imagenet_or_random(1)
    model.load_state_dict(source, strict=False)
    model.eval()
    checkpoint = tmp_path / "lite.pt"
    save_checkpoint(checkpoint, model, ARCH, preprocessing=preprocessing_record(32, 1))
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    meta = json.loads((out / "model.json").read_text())
    assert (meta["arch"], meta["in_channels"], meta["image_size"]) == (ARCH, 1, 32)
    assert meta["state_dict"]["head"] == "classifier" and meta["stem"]["module"] == "conv_stem"
    assert meta["builder"].startswith("medmerge_core.efficientnet_lite.efficientnet_lite(")
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        expected = load_saved_model(checkpoint).build()(x)
        torch.testing.assert_close(expected, model(x), rtol=0, atol=0)
    if not (out / "model.onnx").exists():
        pytest.importorskip("onnx")
        pytest.fail("onnx is installed but model.onnx was not written")
    ort = pytest.importorskip("onnxruntime")
    (got,) = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x.numpy()})
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_the_federation_runs_on_it(tmp_path) -> None:
    """Collect, the coordinator's merge (re-baked and checked at the server), one round of
    fine-tuning with InMerge on the aggregate, on EfficientNet-Lite0 at 16x16 gray images."""
    from client.client_app import app as client_app
    from server.server_app import run_federation
    from simulations.inprocess import InProcessGrid
    from tests.helpers import nodes, run_config

    rc = run_config(tmp_path, arch=ARCH, rounds=1)
    (record,) = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    assert record["sites"] == 3 and record["rejected"] == [] and record["inmerge_kernels"] > 0
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)
    assert final["arch"] == ARCH and final["in-channels"] == 1


@needs_checkpoint
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_medmerge_run_trains_every_method_on_the_imagenet_source(tmp_path, rgb) -> None:
    """`medmerge run` with the ImageNet source merged with a second one: the baselines, the
    controls and MedMerge on a gray and on an RGB target (the stem adapts to the gray one)."""
    import yaml

    from medmerge_core.io import atomic_savez

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    atomic_savez(tmp_path / "target.npz", arrays)
    methods = ["ft", "lp_ft", "average_ft", "average_probe", "interpolate", "medmerge"]
    config = {
        "name": "lite",
        "output_dir": str(tmp_path / "runs"),
        "data": {"format": "medmnist", "path": str(tmp_path / "target.npz")},
        "sources": {"a": "imagenet:efficientnet_lite0", "b": "random:1"},
        "model": {"arch": ARCH, "image_size": 16},
        "pipelines": methods,
        "lp": {"epochs": 1, "lr": 1e-3},
        "ft": {"epochs": 1, "lr": 1e-4},
        "merge": {"steps": 1},
        "batch_size": 12,
        "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "runs/lite/results.json").read_text(encoding="utf-8"))
    assert sorted(results) == sorted(["ft:a", "ft:b", "lp_ft:a", "lp_ft:b", *methods[2:]])
    assert all(math.isfinite(r["test"]["loss"]) for r in results.values())
    saved = load_torch_file(tmp_path / "runs/lite/checkpoints/medmerge.pt", "checkpoint")
    assert saved["arch"] == ARCH and saved["in_channels"] == (3 if rgb else 1)
