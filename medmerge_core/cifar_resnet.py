"""CIFAR-10 ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2).

Re-implemented after akamaster/pytorch_resnet_cifar10 (Yerlan Idelbayev, BSD-2-Clause), so that
its pretrained files (`resnet20-*.th`, `resnet56-*.th`) load key for key once the `module.`
prefix is removed: `conv1`, `bn1`, `layer{1,2,3}.{i}.{conv,bn}{1,2}`, `linear`. A 3x3 conv stem
with 16 channels, three stages of n basic blocks (16, 32, 64 channels; depth = 6n + 2), option-A
shortcuts (parameter-free: subsample by 2, zero-pad the channels), global average pooling and a
Linear head. Convs have no bias. Pooling is adaptive, so any input size >= 4x4 works.

Source specs `cifar10:resnet20` / `cifar10:resnet56` name those pretrained files; see
`resolve_cifar10_source` for where they are looked up (they are never shipped with the code).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medmerge_core.errors import InputError

CIFAR_DEPTHS: tuple[int, ...] = (20, 32, 44, 56)
CIFAR_ARCHS: tuple[str, ...] = tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS)
CIFAR10_PREFIX = "cifar10:"
WEIGHTS_ENV = "MEDMERGE_WEIGHTS_PATH"
SHARED_SUBDIR = Path("..") / "shared" / "weights" / "cifar10_resnet"


def _kaiming_init(module: nn.Module) -> None:
    """The reference repo's init: Kaiming-normal conv and linear weights."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class ShortcutA(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2], then `pad` zero channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-{20,32,44,56} for 32x32-like inputs, with `num_classes` and `in_channels`."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in CIFAR_DEPTHS:
            raise InputError(f"CIFAR ResNet depth must be one of {CIFAR_DEPTHS}, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(arch: str, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build `cifar_resnetNN` by arch name."""
    if arch not in CIFAR_ARCHS:
        raise InputError(
            f"model.arch: unknown CIFAR ResNet '{arch}'; expected one of {CIFAR_ARCHS}"
        )
    return CifarResNet(int(arch.removeprefix("cifar_resnet")), num_classes, in_channels)


def weight_folders() -> list[Path]:
    """Where `cifar10:` files are looked up, in order, without duplicates: every folder in
    $MEDMERGE_WEIGHTS_PATH (os.pathsep-separated), then ../shared/weights/cifar10_resnet
    relative to the current directory, then relative to the repository root."""
    env = [Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    repo_root = Path(__file__).resolve().parent.parent
    candidates = [*env, Path.cwd() / SHARED_SUBDIR, repo_root / SHARED_SUBDIR]
    out: list[Path] = []
    for folder in candidates:
        folder = folder.resolve()
        if folder not in out:
            out.append(folder)
    return out


def resolve_cifar10_source(spec: str, arch: str) -> Path:
    """The file for `cifar10:resnetNN`, checked against the model's arch.

    The first folder of `weight_folders()` holding a `resnetNN-*.th` wins; two such files in that
    folder are an error rather than a silent choice. Every problem is a one-line InputError
    naming the spec.
    """
    name = spec.removeprefix(CIFAR10_PREFIX)
    depth = name.removeprefix("resnet")
    if not (name.startswith("resnet") and depth.isdigit() and int(depth) in CIFAR_DEPTHS):
        raise InputError(
            f"source '{spec}': unknown CIFAR-10 model '{name}'; expected one of "
            f"{', '.join(CIFAR10_PREFIX + 'resnet' + str(d) for d in CIFAR_DEPTHS)}"
        )
    wanted = f"cifar_resnet{depth}"
    if arch != wanted:
        raise InputError(f"source '{spec}' is a {wanted} but model.arch is {arch}")
    folders = weight_folders()
    for folder in folders:
        found = sorted(p for p in folder.glob(f"resnet{depth}-*.th") if p.is_file())
        if len(found) > 1:
            raise InputError(
                f"source '{spec}': {len(found)} files match resnet{depth}-*.th in {folder} "
                f"({', '.join(p.name for p in found)}); keep one or pass the path instead"
            )
        if found:
            return found[0]
    raise InputError(
        f"source '{spec}': no resnet{depth}-*.th found in {', '.join(map(str, folders))}; "
        f"set {WEIGHTS_ENV} to the folder holding it or pass the file path instead"
    )
