"""CIFAR-10 ResNets (He et al. 2016, §4.2): architecture, `cifar10:` sources, MedMerge, InMerge.

Tests that read the real pretrained files (akamaster/pytorch_resnet_cifar10) skip when
../shared/weights/cifar10_resnet is missing; the rest build everything in the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmerge_core.cifar_resnet import CifarResNet, resolve_cifar10_source, weight_folders
from medmerge_core.errors import InputError
from medmerge_core.inmerge import inmerge_
from medmerge_core.merge import MergedModel
from medmerge_core.models import (
    backbone_keys,
    build_model,
    head_name,
    identify_arch,
    load_source,
    mergeable_keys,
    stem_conv_name,
)
from medmerge_core.settings import InMergeSettings

WEIGHTS = (Path(__file__).resolve().parents[1] / ".." / "shared/weights/cifar10_resnet").resolve()
FILES = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def needs_weights() -> pytest.MarkDecorator:
    """Skip unless both shared pretrained files are present."""
    present = all((WEIGHTS / name).is_file() for name in FILES.values())
    return pytest.mark.skipif(not present, reason=f"pretrained CIFAR-10 ResNets not in {WEIGHTS}")


def file_state(depth: int) -> dict[str, torch.Tensor]:
    obj = torch.load(WEIGHTS / FILES[depth], map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                module.weight.copy_(torch.rand(c, generator=g) + 0.5)
                module.bias.copy_(torch.randn(c, generator=g) * 0.1)


def reference_forward(state: dict[str, torch.Tensor], depth: int, x: torch.Tensor) -> torch.Tensor:
    """The manifest's architecture written out functionally (eval mode), not via the module."""

    def bn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            h,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    h = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        for i in range((depth - 2) // 6):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            out = F.relu(
                bn(F.conv2d(h, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if stride == 2:
                sub = h[:, :, ::2, ::2]
                extra = out.shape[1] - sub.shape[1]
                zeros = sub.new_zeros(sub.shape[0], extra // 2, *sub.shape[2:])
                h = torch.cat([zeros, sub, zeros], dim=1)
            h = F.relu(out + h)
    return F.linear(h.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_keys_match_the_published_layout(depth: int) -> None:
    with torch.device("meta"):
        model = build_model(f"cifar_resnet{depth}", 5, 1)
    n = (depth - 2) // 6
    expected = {"conv1.weight", "linear.weight", "linear.bias"}
    expected |= {f"bn1.{s}" for s in ("weight", "bias", "running_mean", "running_var")}
    for stage in (1, 2, 3):
        for i in range(n):
            for j in (1, 2):
                expected.add(f"layer{stage}.{i}.conv{j}.weight")
                for s in ("weight", "bias", "running_mean", "running_var"):
                    expected.add(f"layer{stage}.{i}.bn{j}.{s}")
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == expected
    assert head_name(model) == "linear" and model.linear.out_features == 5
    assert stem_conv_name(model) == "conv1" and model.conv1.in_channels == 1
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_forward_matches_the_written_out_architecture_at_several_sizes() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20, 10, 3)
    randomise_bn(model, 1)
    model.eval()
    state = model.state_dict()
    for size in (16, 28, 32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(out, reference_forward(state, 20, x), rtol=1e-4, atol=1e-5)


def test_kernel_and_conv_counts() -> None:
    for depth, convs, kernels in ((20, 19, 688), (56, 55, 2032)):
        arch = f"cifar_resnet{depth}"
        model = build_model(arch, 3, 1)
        pairs = mergeable_keys(model)
        assert len(pairs) == convs
        assert all(bias is None for _, bias in pairs)
        assert sum(model.get_parameter(w).shape[0] for w, _ in pairs) == kernels
        assert sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) == kernels
        sources = [load_source(f"random:{s}", arch, 1) for s in (1, 2)]
        assert MergedModel(model, sources, ["a", "b"]).num_coefficients() == kernels


def test_probe_forward_backward_and_bake_agree_at_16px_gray() -> None:
    torch.manual_seed(0)
    arch = "cifar_resnet20"
    sources = [load_source(f"random:{s}", arch, 1) for s in (1, 2)]
    merged = MergedModel(build_model(arch, 3, 1), sources, ["a", "b"])
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainable = [p for p in merged.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    before = [p.detach().clone() for p in trainable]
    merged.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(merged(x), y).backward()
        optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    merged.eval()
    baked = merged.bake().eval()
    assert type(baked) is CifarResNet
    with torch.no_grad():
        torch.testing.assert_close(baked(x), merged(x), rtol=0, atol=1e-5)


def test_inmerge_changes_deep_kernels_only() -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 2, 1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = InMergeSettings(rule="absolute", p=1.0, tau=-1.0)  # the deepest half by default
    stats = inmerge_(model, config, torch.Generator().manual_seed(0))
    convs = [w for w, _ in mergeable_keys(model)]
    assert stats.layers == len(convs) - 10 == 9  # 19 main-path convs, no shortcut convs
    assert stats.kernels_drawn == 32 + 64 + 6 * 64
    assert stats.kernels_merged > 0.9 * stats.kernels_drawn
    state = model.state_dict()
    for index, key in enumerate(convs):
        changed = not torch.equal(state[key], before[key])
        assert changed == (index >= 10), key
    assert not torch.equal(state["layer3.2.conv2.weight"], before["layer3.2.conv2.weight"])


def test_identify_arch_tells_the_depths_apart() -> None:
    for arch in ("cifar_resnet20", "cifar_resnet56"):
        state = build_model(arch, 10, 3).state_dict()
        assert identify_arch(state) == arch


def write_th(path: Path, depth: int, seed: int) -> dict[str, torch.Tensor]:
    """A file in the published format: {'best_prec1', 'state_dict'}, `module.` keys, no counters."""
    torch.manual_seed(seed)
    state = CifarResNet(depth).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"best_prec1": 50.0, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path
    )
    return state


def test_spec_is_looked_up_on_the_env_path_first(tmp_path, monkeypatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    written = write_th(second / "resnet20-aaaa.th", 20, 0)
    (first / "unrelated").mkdir(parents=True)
    monkeypatch.setenv("MEDMERGE_WEIGHTS_PATH", f"{first}{os.pathsep}{second}")
    assert weight_folders()[:2] == [first.resolve(), second.resolve()]
    assert (
        resolve_cifar10_source("cifar10:resnet20", "cifar_resnet20")
        == (second / "resnet20-aaaa.th").resolve()
    )
    state = load_source("cifar10:resnet20", "cifar_resnet20", 3)
    assert set(state) == set(backbone_keys(build_model("cifar_resnet20", 2, 3)))
    for key, value in written.items():
        if not key.startswith("linear."):
            assert torch.equal(state[key], value), key
    gray = load_source("cifar10:resnet20", "cifar_resnet20", 1)
    torch.testing.assert_close(gray["conv1.weight"], written["conv1.weight"].sum(1, keepdim=True))


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_bad_specs_and_wrong_arch_are_one_line_errors(tmp_path, monkeypatch) -> None:
    for spec in ("cifar10:resnet18", "cifar10:", "cifar10:vgg16", "cifar10:resnet20x"):
        one_line_error(lambda s=spec: load_source(s, "cifar_resnet20", 1), f"'{spec}'")
    one_line_error(
        lambda: load_source("cifar10:resnet56", "cifar_resnet20", 1),
        "'cifar10:resnet56'",
        "cifar_resnet20",
    )
    one_line_error(lambda: load_source("cifar10:resnet20", "resnet18", 1), "'cifar10:resnet20'")
    one_line_error(lambda: load_source("torchvision:DEFAULT", "cifar_resnet20", 1), "cifar10:")
    # No resnet44 file anywhere: the message names the spec and every folder searched.
    monkeypatch.setenv("MEDMERGE_WEIGHTS_PATH", str(tmp_path / "empty"))
    message = one_line_error(
        lambda: load_source("cifar10:resnet44", "cifar_resnet44", 1), "'cifar10:resnet44'"
    )
    for folder in weight_folders():
        assert str(folder) in message
    # Two candidate files in one folder: no silent choice.
    write_th(tmp_path / "two" / "resnet20-aaaa.th", 20, 0)
    write_th(tmp_path / "two" / "resnet20-bbbb.th", 20, 1)
    monkeypatch.setenv("MEDMERGE_WEIGHTS_PATH", str(tmp_path / "two"))
    one_line_error(lambda: load_source("cifar10:resnet20", "cifar_resnet20", 1), "2 files")
    # A .th path of the wrong depth is recognised, not loaded as a prefix of the deeper net.
    write_th(tmp_path / "deep.th", 32, 0)
    one_line_error(
        lambda: load_source(str(tmp_path / "deep.th"), "cifar_resnet20", 1), "cifar_resnet32"
    )
    with pytest.raises(InputError, match="unknown torchvision"):
        build_model("cifar_resnet18", 2, 1)


@needs_weights()
@pytest.mark.parametrize("depth", [20, 56])
def test_shared_pretrained_files_load_as_sources(depth: int, monkeypatch) -> None:
    monkeypatch.setenv("MEDMERGE_WEIGHTS_PATH", str(WEIGHTS))
    arch = f"cifar_resnet{depth}"
    original = file_state(depth)
    assert identify_arch(original) == arch
    for spec in (f"cifar10:resnet{depth}", str(WEIGHTS / FILES[depth])):
        state = load_source(spec, arch, 3)
        assert set(state) == set(backbone_keys(build_model(arch, 2, 3)))
        for key, value in original.items():
            if not key.startswith("linear."):
                assert torch.equal(state[key], value), key
    gray = load_source(f"cifar10:resnet{depth}", arch, 1)
    torch.testing.assert_close(gray["conv1.weight"], original["conv1.weight"].sum(1, keepdim=True))
    # A task model (new 4-class head, gray stem) runs with the source loaded.
    model = build_model(arch, 4, 1)
    model.load_state_dict(gray, strict=False)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 1, 28, 28))).all()
    # The full published model, 10-class head included, matches the written-out architecture.
    full = build_model(arch, 10, 3)
    missing, unexpected = full.load_state_dict(original, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - mean) / std
    with torch.no_grad():
        logits = full.eval()(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference_forward(original, depth, x), rtol=1e-4, atol=1e-4)
    assert torch.softmax(logits, 1).sum(1).allclose(torch.ones(4))
