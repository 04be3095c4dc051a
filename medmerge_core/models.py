"""torchvision CNN builders with a task head, and loading of merge sources.

A *source* is a backbone state dict (every key except the classification head) produced from a
torchvision weights enum, a local checkpoint, a pretrained CIFAR-10 ResNet file (`cifar10:`),
the ImageNet EfficientNet-Lite0 of the `imagenet` extra (`imagenet:efficientnet_lite0`),
`zeros` (the paper's Fig. 4 ablation) or a seeded random init. All sources of one merge share
one architecture. Besides torchvision's models, the CIFAR ResNets `cifar_resnet{20,32,44,56}`
(medmerge_core.cifar_resnet) and `efficientnet_lite0` (medmerge_core.efficientnet_lite) are
built and loaded the same way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from medmerge_core.cifar_resnet import (
    CIFAR10_PREFIX,
    CIFAR_ARCHS,
    cifar_resnet,
    resolve_cifar10_source,
)
from medmerge_core.data.base import normalization
from medmerge_core.efficientnet_lite import (
    CHECKPOINT_MEAN,
    CHECKPOINT_STD,
    IMAGENET_PREFIX,
    LITE_ARCHS,
    STEM_NORM,
    checkpoint_state,
    efficientnet_lite,
    fold_input_normalization,
)
from medmerge_core.errors import InputError
from medmerge_core.io import atomic_torch_save, load_torch_file

log = logging.getLogger(__name__)

# Normalisation layers: FedBN keeps them local, the probe may freeze them.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
StateDict = dict[str, torch.Tensor]

# Architectures whose head and stem we know how to swap. Any torchvision classification model
# with one of these head layouts works; these are the ones we test and can recognise.
KNOWN_ARCHS: tuple[str, ...] = (
    "densenet121",
    "densenet169",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg11_bn",
    "vgg16_bn",
    "efficientnet_b0",
    "mobilenet_v3_large",
    *CIFAR_ARCHS,
    *LITE_ARCHS,
)


def head_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer (the task head)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise InputError(f"model {type(model).__name__}: no Linear classification head found")
    return last


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def stem_conv_name(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise InputError(f"model {type(model).__name__}: no Conv2d found")


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A randomly initialised CNN (torchvision, CIFAR ResNet or EfficientNet-Lite), new C-class
    head, 1/3-ch stem."""
    cifar, lite = arch in CIFAR_ARCHS, arch in LITE_ARCHS
    known = cifar or lite or arch in torchvision.models.list_models(module=torchvision.models)
    if not known:
        raise InputError(f"model.arch: unknown torchvision classification model '{arch}'")
    if in_channels not in (1, 3):
        raise InputError(f"in_channels: must be 1 or 3, got {in_channels}")
    if num_classes < 1:
        raise InputError(f"num_classes: must be >= 1, got {num_classes}")
    # Built as published (CIFAR: 10 classes, RGB), then head and stem are swapped alike.
    if cifar:
        model: nn.Module = cifar_resnet(arch)
    elif lite:
        model = efficientnet_lite(arch)
    else:
        model = torchvision.models.get_model(arch, weights=None)
    head = head_name(model)
    old = model.get_submodule(head)
    _set_module(model, head, nn.Linear(old.in_features, num_classes))
    if in_channels != 3:
        stem = stem_conv_name(model)
        conv: nn.Conv2d = model.get_submodule(stem)
        _set_module(
            model,
            stem,
            nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                conv.bias is not None,
            ),
        )
    return model


def backbone_keys(model: nn.Module) -> list[str]:
    """State-dict keys that belong to the backbone (everything but the head)."""
    prefix = head_name(model) + "."
    return [k for k in model.state_dict() if not k.startswith(prefix)]


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a pretrained stem to in_channels, as timm does: sum RGB for grayscale."""
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if have == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and in_channels == 3:
        return weight.repeat(1, 3, 1, 1) / 3.0
    raise InputError(f"stem conv: cannot adapt {have} input channels to {in_channels}")


def identify_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which known architecture a backbone state dict belongs to (keys and shapes), if any."""
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    for arch in KNOWN_ARCHS:
        with torch.device("meta"):
            reference = build_model(arch, 2, 3)
        ref = {k: v.shape for k, v in reference.state_dict().items()}
        head = head_name(reference) + "."
        ref_backbone = {k for k in ref if not k.startswith(head) and "num_batches" not in k}
        leftover = keys - ref_backbone
        if (
            ref_backbone <= keys
            and all(k.startswith(head) for k in leftover)
            and all(
                state[k].shape[2:] == ref[k][2:] and state[k].shape[0] == ref[k][0]
                for k in ref_backbone
            )
        ):
            return arch
    return None


def unwrap_checkpoint(obj: object, path: Path) -> tuple[StateDict, str | None]:
    """Accept a raw state dict or our checkpoint dict {'arch', 'state_dict', ...}."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state, arch = obj["state_dict"], obj.get("arch")
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        state, arch = obj["model"], obj.get("arch")
    else:
        state, arch = obj, None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, arch if isinstance(arch, str) else None


def _load_checkpoint(path: Path, arch: str, reference: nn.Module, in_channels: int) -> StateDict:
    if not path.is_file():
        raise InputError(f"source checkpoint not found: {path}")
    obj = load_torch_file(path, "cannot load checkpoint")
    state, saved_arch = unwrap_checkpoint(obj, path)
    found = saved_arch or identify_arch(state)
    if found is not None and found != arch:
        raise InputError(f"{path}: checkpoint is {found} but model.arch is {arch}")
    out = fit_backbone(state, arch, in_channels, str(path), reference)
    head = head_name(reference) + "."
    dropped = [k for k in state if k.startswith(head)]
    expected = reference.state_dict()
    if dropped and any(state[k].shape != expected[k].shape for k in dropped if k in expected):
        log.info("%s: dropped a head of the wrong size (%s); a new head is used", path, dropped[0])
    return out


def fit_backbone(
    state: Mapping[str, torch.Tensor],
    arch: str,
    in_channels: int,
    where: str,
    reference: nn.Module | None = None,
) -> StateDict:
    """The backbone part of `state` for `arch` with `in_channels` input channels: stem adapted,
    every key present with the model's shape and dtype (a missing step counter is filled in),
    or a one-line InputError naming `where`."""
    if reference is None:
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays untouched
            reference = build_model(arch, 2, in_channels)
    expected = reference.state_dict()
    wanted = backbone_keys(reference)
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(
            f"{where}: not a {arch} backbone ({len(missing)} keys missing, e.g. '{missing[0]}')"
        )
    stem = stem_conv_name(reference) + ".weight"
    out: StateDict = {}
    for key in wanted:
        if key not in state:
            out[key] = expected[key].clone()
            continue
        value = state[key]
        if key == stem:
            value = adapt_stem(value, in_channels)
        if value.shape != expected[key].shape:
            raise InputError(
                f"{where}: '{key}' has shape {tuple(value.shape)}, {arch} expects "
                f"{tuple(expected[key].shape)}"
            )
        out[key] = value.to(expected[key].dtype)
    return out


def is_source_spec(text: str) -> bool:
    """Whether `load_source` reads `text` as a spec rather than as a checkpoint path."""
    prefixes = ("random:", "torchvision:", CIFAR10_PREFIX, IMAGENET_PREFIX)
    return text in ("zeros", "random") or text.startswith(prefixes)


def _load_torchvision_weights(name: str, arch: str, in_channels: int) -> StateDict:
    """Resolve 'DenseNet121_Weights.IMAGENET1K_V1' (or 'IMAGENET1K_V1' / 'DEFAULT') and fetch."""
    if arch in CIFAR_ARCHS:
        raise InputError(
            f"source '{name}': torchvision has no {arch} weights; use cifar10:resnetNN"
        )
    if arch in LITE_ARCHS:
        raise InputError(
            f"source '{name}': torchvision has no {arch} weights; use {IMAGENET_PREFIX}{arch}"
        )
    try:
        enum = torchvision.models.get_model_weights(arch)
        member = name.split(".")[-1]
        if "." in name and name.split(".")[0] != enum.__name__:
            raise InputError(f"source '{name}': weights are for another model than {arch}")
        weights = enum[member]
    except KeyError as exc:
        raise InputError(f"source '{name}': unknown weights for {arch}") from exc
    try:
        full = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, HTTPError offline
        raise InputError(
            f"source '{name}': could not download {weights.url} ({type(exc).__name__}); "
            "this machine may be offline: download it elsewhere and pass the .pth path instead"
        ) from exc
    reference = build_model(arch, 2, in_channels)
    head = head_name(reference) + "."
    state = {k: v for k, v in full.items() if not k.startswith(head)}
    stem = stem_conv_name(reference) + ".weight"
    state[stem] = adapt_stem(state[stem], in_channels)
    return state


def _load_imagenet_source(
    spec: str, arch: str, in_channels: int, reference: nn.Module
) -> StateDict:
    """`imagenet:efficientnet_lite0`: the TF ImageNet checkpoint of the `imagenet` extra, its
    stem adapted to `in_channels` and its input normalisation folded into the stem, so that it
    sees the project's inputs (data.base.normalize_batch: ImageNet statistics, their mean for
    gray) as the checkpoint saw its own ((pixel - 127) / 128); see efficientnet_lite."""
    name = spec.removeprefix(IMAGENET_PREFIX)
    if name not in LITE_ARCHS:
        raise InputError(
            f"source '{spec}': unknown ImageNet model '{name}'; expected one of "
            f"{', '.join(IMAGENET_PREFIX + a for a in LITE_ARCHS)}"
        )
    if arch != name:
        raise InputError(f"source '{spec}' is an {name} but model.arch is {arch}")
    state = fit_backbone(checkpoint_state(spec), arch, in_channels, f"source '{spec}'", reference)
    expected = (CHECKPOINT_MEAN[:in_channels], CHECKPOINT_STD[:in_channels])
    stem = stem_conv_name(reference) + ".weight"
    return fold_input_normalization(state, stem, STEM_NORM, expected, normalization(in_channels))


def load_source(spec: str, arch: str, in_channels: int = 3) -> StateDict:
    """Backbone state dict for a source spec.

    Specs: `zeros`; `random` or `random:SEED`; `torchvision:ENUM` (e.g.
    `torchvision:DenseNet121_Weights.IMAGENET1K_V1`); `cifar10:resnet20` / `cifar10:resnet56`
    (a pretrained file found by cifar_resnet.resolve_cifar10_source); `imagenet:efficientnet_lite0`
    (the `imagenet` extra's checkpoint, normalisation folded in); otherwise a checkpoint path.
    """
    reference = build_model(arch, 2, in_channels)
    keys = backbone_keys(reference)
    if spec == "zeros":
        state = reference.state_dict()
        # Zero conv/linear weights, but keep BN identity-like so the network is well defined.
        return {
            k: (torch.zeros_like(state[k]) if state[k].ndim >= 2 else state[k].clone())
            for k in keys
        }
    if spec == "random" or spec.startswith("random:"):
        seed_text = spec.partition(":")[2] or "0"
        try:
            seed = int(seed_text)
        except ValueError as exc:
            raise InputError(f"source '{spec}': seed must be an integer") from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(arch, 2, in_channels)
        state = model.state_dict()
        return {k: state[k] for k in keys}
    if spec.startswith("torchvision:"):
        return _load_torchvision_weights(spec.removeprefix("torchvision:"), arch, in_channels)
    if spec.startswith(CIFAR10_PREFIX):
        return _load_checkpoint(resolve_cifar10_source(spec, arch), arch, reference, in_channels)
    if spec.startswith(IMAGENET_PREFIX):
        return _load_imagenet_source(spec, arch, in_channels, reference)
    return _load_checkpoint(Path(spec).expanduser(), arch, reference, in_channels)


def save_checkpoint(path: Path, model: nn.Module, arch: str, **meta: object) -> None:
    """Write {'arch', 'state_dict', **meta} atomically (tmp file, then os.replace)."""
    atomic_torch_save({"arch": arch, "state_dict": model.state_dict(), **meta}, path)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(a copy of the model whose head is Identity, the model's own head) for cached LP."""
    name = head_name(model)
    head = model.get_submodule(name)
    backbone = copy.deepcopy(model)
    _set_module(backbone, name, nn.Identity())
    return backbone, head


def mergeable_keys(model: nn.Module) -> list[tuple[str, str | None]]:
    """(weight key, bias key or None) of every Conv2d and backbone Linear, in module order."""
    head = head_name(model)
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != head:
            bias = f"{name}.bias" if module.bias is not None else None
            pairs.append((f"{name}.weight", bias))
    return pairs


def conv_layers(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` with its qualified name, in ``model.modules()`` order (InMerge order)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            yield name, module


def conv_weight_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the Conv2d weights in InMerge layer order, for ``inmerge_state_dict``.

    Keys follow ``model.state_dict()`` naming; a parametrized conv weight (whose state-dict key is
    ``...parametrizations.weight.original``) is not supported and raises a ValueError.
    """
    keys = []
    for name, module in conv_layers(model):
        if "weight" not in module._parameters:
            raise ValueError(f"{name}: conv weight is not a plain parameter (parametrized?)")
        keys.append(f"{name}.weight" if name else "weight")
    return keys


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every normalisation layer (affine params and running stats)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys
