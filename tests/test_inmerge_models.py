"""InMerge on the real architectures: which convs merge and how many. The public InMerge code's
traversal merges nothing in ResNets/DenseNets; here every Conv2d of torchvision's ResNet-18/50,
DenseNet-121 and VGG-16-BN counts, in module order (downsample shortcuts included), and only
the layers after the skipped ones change. `deep_fraction` picks its deep layers along each
network's main path, and the default quantile rule merges kernels at random init, where the
paper's tau = 0.3 merges almost nothing. The exact semantics on hand-built layers, the
state-dict version and the settings are in test_inmerge.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, nn

from medmerge_core.inmerge import InMergeStats, deep_layers, inmerge_
from medmerge_core.models import build_model, conv_layers, conv_weight_keys
from medmerge_core.settings import InMergeSettings
from tests.test_inmerge import (
    _changed_layers,
    _conv_weights,
    _gen,
    _one_thread,  # noqa: F401  (autouse: one torch thread here too)
)

# --- torchvision CNNs (the public code's traversal merges nothing in ResNet/DenseNet) ----------

CONV_COUNTS = {"resnet18": 20, "resnet50": 53, "densenet121": 120, "vgg16_bn": 13}


def _build(name: str) -> nn.Module:
    """The torchvision architecture with random conv weights, without initialising the rest.

    Only the Conv2d weights are read here, and VGG's 120M-parameter classifier init alone takes
    seconds on 2 cores, so the model is built on the meta device, given uninitialised storage,
    and only its convs get torchvision's own init (Kaiming normal, fan_out).
    """
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    model = model.to_empty(device="cpu").train()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _restore(model: nn.Module, weights: list[Tensor]) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, w in zip(convs, weights, strict=True):
            conv.weight.copy_(w)


@pytest.mark.parametrize("name", list(CONV_COUNTS))
def test_torchvision_models(name: str) -> None:
    model = _build(name)
    keys = conv_weight_keys(model)
    assert len(keys) == CONV_COUNTS[name]
    if name == "resnet50":
        assert "layer1.0.downsample.0.weight" in keys  # Downsample convs count, in module order.
        assert keys.index("layer1.0.downsample.0.weight") == keys.index("layer1.0.conv3.weight") + 1
    before = _conv_weights(model)
    eligible = sum(w.shape[0] for w in before[10:])

    # p=1, tau=-1: every kernel of every layer from the 11th on merges; the first 10 never do.
    stats = inmerge_(
        model, InMergeSettings(rule="absolute", p=1.0, tau=-1.0, skip_layers=10), _gen(0)
    )
    changed = _changed_layers(before, model)
    assert sum(changed) == CONV_COUNTS[name] - 10
    assert changed[:10] == [False] * 10 and changed[-1]
    assert stats == InMergeStats(CONV_COUNTS[name] - 10, eligible, eligible)

    # Default p. Random-init kernels are nearly orthogonal: cos ~ N(0, 1/(C_in*k*k)), std <=
    # 0.125 here, so the paper's tau = 0.3 (meant for trained, redundant kernels) would merge
    # almost nothing. tau = 0 keeps the gate meaningful (it rejects about half of the drawn
    # pairs) while deep layers change: ~p/2 = 15% of eligible kernels should merge.
    _restore(model, before)
    stats = inmerge_(
        model, InMergeSettings(rule="absolute", p=0.3, tau=0.0, alpha=0.8, skip_layers=10), _gen(0)
    )
    after = _conv_weights(model)
    changed = _changed_layers(before, model)
    assert changed[:10] == [False] * 10
    assert changed[-1]
    assert sum(changed[10:]) >= 0.9 * (len(changed) - 10)
    assert 0.25 * eligible < stats.kernels_drawn < 0.35 * eligible
    assert 0.3 * stats.kernels_drawn < stats.kernels_merged < 0.7 * stats.kernels_drawn
    rows_changed = sum(
        int((b != a).flatten(1).any(dim=1).sum()) for b, a in zip(before, after, strict=True)
    )
    assert rows_changed == stats.kernels_merged


# --- the deep layers, along each network's main path ----------------------------------------------


@pytest.mark.parametrize(
    ("arch", "fraction", "deep", "first"),
    [
        ("resnet18", 0.5, 10, "layer3.0.conv1"),  # last two stages: the paper's L_s = 10 there
        ("vgg16_bn", 0.25, 3, "features.34"),  # the paper's VGG-16 setting: last 3 of 13
        ("densenet121", 0.5, 60, "features.denseblock3.denselayer11.conv2"),  # 120 main-path
        ("resnet50", 0.25, 13, "layer3.5.conv1"),  # 12 of 49 main-path convs + a downsample
        ("cifar_resnet56", 0.5, 27, "layer2.4.conv2"),
    ],
)
def test_deep_layers_count_depth_along_the_main_path(
    arch: str, fraction: float, deep: int, first: str
) -> None:
    with torch.device("meta"):
        model = build_model(arch, 2, 3)
    names = [name for name, _ in conv_layers(model)]
    chosen = deep_layers(names, InMergeSettings(deep_fraction=fraction))
    assert sum(chosen) == deep and names[chosen.index(True)] == first
    assert chosen == sorted(chosen)  # a suffix of the network: nothing shallow after it
    shortcuts = [n for n in names if "downsample" in n]
    for name in shortcuts:  # a shortcut conv goes with its block's first conv
        block = name.split(".downsample")[0]
        assert chosen[names.index(name)] == chosen[names.index(block + ".conv1")]
    by_count = deep_layers(names, InMergeSettings(skip_layers=4))  # the paper's L_s
    assert by_count == [i >= 4 for i in range(len(names))]


# --- the default settings (the quantile rule) at random init -------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_default_settings_merge_kernels_in_every_application_at_random_init(name: str) -> None:
    """The paper's tau = 0.3 merges almost nothing at init (cosines ~ N(0, 1/fan_in)); the
    default quantile rule merges about (1 - q) * p of the eligible kernels every time."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=3).train()
    fresh = copy.deepcopy(model)
    config = InMergeSettings()  # the defaults: no threshold chosen by hand
    counts = [inmerge_(model, config, _gen(seed)) for seed in range(3)]
    for stats in counts:
        assert stats.kernels_merged > 0
        expected = (1 - config.q) * stats.kernels_drawn
        assert 0.5 * expected < stats.kernels_merged < 1.5 * expected
    paper = InMergeSettings(rule="absolute", tau=0.3)
    assert inmerge_(fresh, paper, _gen(0)).kernels_merged < counts[0].kernels_merged / 10
