"""Model building and source loading: enums, checkpoints, zeros, random, and bad input."""

from __future__ import annotations

import logging

import pytest
import torch

from medmerge_core.errors import InputError
from medmerge_core.models import (
    backbone_keys,
    build_model,
    head_name,
    load_source,
    save_checkpoint,
)


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("densenet121", "classifier"),
        ("resnet18", "fc"),
        ("resnet50", "fc"),
        ("vgg16_bn", "classifier.6"),
    ],
)
def test_build_model_has_new_head_and_channel_stem(arch: str, head: str) -> None:
    with torch.device("meta"):
        model = build_model(arch, 5, 1)
    assert head_name(model) == head
    assert model.get_submodule(head).out_features == 5
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1


def test_gray_and_rgb_models_run() -> None:
    for channels in (1, 3):
        model = build_model("resnet18", 3, channels).eval()
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 3)


def test_random_source_is_seeded_and_zeros_source_is_zero() -> None:
    a, b = load_source("random:3", "resnet18", 1), load_source("random:3", "resnet18", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_source("random:4", "resnet18", 1)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    zeros = load_source("zeros", "resnet18", 1)
    assert torch.count_nonzero(zeros["layer4.1.conv2.weight"]) == 0
    assert "fc.weight" not in zeros and set(zeros) == set(a)


def test_checkpoint_full_model_or_backbone_only(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 7, 1)
    save_checkpoint(tmp_path / "full.pt", model, "resnet18")
    keys = backbone_keys(model)
    torch.save({k: model.state_dict()[k] for k in keys}, tmp_path / "backbone.pt")
    full = load_source(str(tmp_path / "full.pt"), "resnet18", 1)
    backbone = load_source(str(tmp_path / "backbone.pt"), "resnet18", 1)
    for key in keys:
        assert torch.equal(full[key], model.state_dict()[key])
        assert torch.equal(backbone[key], full[key])


def test_wrong_size_head_is_dropped_with_a_note(tmp_path, caplog) -> None:
    torch.save(build_model("resnet18", 1000, 1).state_dict(), tmp_path / "in1k.pt")
    with caplog.at_level(logging.INFO):
        state = load_source(str(tmp_path / "in1k.pt"), "resnet18", 1)
    assert "fc.weight" not in state
    assert "dropped a head" in caplog.text


def test_rgb_checkpoint_is_adapted_to_gray_by_summing(tmp_path) -> None:
    model = build_model("resnet18", 2, 3)
    torch.save(model.state_dict(), tmp_path / "rgb.pt")
    state = load_source(str(tmp_path / "rgb.pt"), "resnet18", 1)
    expected = model.state_dict()["conv1.weight"].sum(1, keepdim=True)
    torch.testing.assert_close(state["conv1.weight"], expected)


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InputError, match=r"source checkpoint not found: .*nope.pt"):
        load_source(str(tmp_path / "nope.pt"), "resnet18", 1)


def test_corrupt_checkpoint_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad.pt: cannot load checkpoint"):
        load_source(str(path), "resnet18", 1)


def test_checkpoint_of_another_architecture_names_both(tmp_path) -> None:
    torch.save(build_model("resnet34", 2, 1).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(InputError, match=r"checkpoint is resnet34 but model.arch is resnet18"):
        load_source(str(tmp_path / "r34.pt"), "resnet18", 1)


def test_torchvision_weights_offline_is_a_clear_error(monkeypatch) -> None:
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(InputError, match=r"could not download .*offline"):
        load_source("torchvision:ResNet18_Weights.IMAGENET1K_V1", "resnet18", 3)
    with pytest.raises(InputError, match=r"unknown weights"):
        load_source("torchvision:NOPE", "resnet18", 3)


def test_unknown_arch_and_bad_channels() -> None:
    with pytest.raises(InputError, match=r"model.arch: unknown"):
        build_model("resnet19", 2)
    with pytest.raises(InputError, match=r"in_channels"):
        build_model("resnet18", 2, 4)
