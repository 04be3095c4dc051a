"""InMerge: in-model merging of similar convolution kernels (Wang et al. 2025).

During fine-tuning, each kernel (output channel) of a deep conv layer is, with probability ``p``,
paired with one random other kernel of the same layer; if the two are similar the kernel is pulled
towards its partner: ``K_i <- alpha * K_i + (1 - alpha) * K_j``. This reduces kernel redundancy
and acts as a regulariser; inference cost is unchanged.

Similar means (``rule``): "absolute", the paper's cosine > ``tau``; or "quantile" (the default),
a cosine above the ``q``-quantile of the layer's own pairwise cosines, taken over every kernel and
the partner drawn for it. Deep kernels of a freshly initialised or briefly trained CNN have
cosines of about N(0, 1/fan_in), within +-0.1, so the absolute rule at tau = 0.3 merges almost
nothing there; the quantile rule merges about (1 - q) of the drawn kernels of every layer,
whatever its scale, and costs one more batched cosine per layer.

Differences from the public code, on purpose:

- Conv layers are found with ``model.modules()`` (every ``nn.Conv2d``, in module registration
  order), so ResNets (basic and bottleneck blocks, including the ``downsample`` convs), DenseNets
  and VGGs are all merged; the public traversal only merges VGG.
- The in-place hook is a no-op when ``model.training`` is False, so evaluation never changes
  weights.
- Each layer is vectorised: all partners are drawn at once, one batched cosine, one masked update
  (on CPU the update touches only the merged kernels; see ``_compact_on_host``).

Which layers are deep (``deep_layers``): by default the deepest ``deep_fraction`` of the
network's *main-path* convs. Every ``nn.Conv2d`` (in ``model.modules()`` order; modules registered
twice count once) has a main-path position: its index among the convs that are not projection
shortcuts (a ``downsample`` or ``shortcut`` module in its name); a shortcut conv takes the position
of the main-path conv before it, so it goes with its block. With ``n`` main-path convs, a conv is
deep when its position is at least ``(1 - deep_fraction) * n``. This counts network depth the
same way on every architecture: ResNet-18's 17 main-path convs at 0.5 give its last two stages
(the 10 convs the paper's L_s = 10 leaves there), VGG-16's 13 at 0.25 its last 3 (the paper's
setting), DenseNet-121's 120 at 0.5 its last 60 (transition convs are on the main path). With
``skip_layers`` set instead, the paper's L_s: conv ``k`` (0-based, every Conv2d, shortcuts
included) is deep when ``k >= skip_layers``. Layers that are not deep are never touched and
consume no randomness. Only ``nn.Conv2d`` counts (not ``ConvTranspose2d``, ``Conv1d``/``3d``,
nor ``nn.Linear``). Grouped / depthwise convs are merged like any other: a kernel is one slice
``weight[i]`` whatever its groups. Conv biases are left untouched: the paper merges kernels only,
and a bias is one scalar whose "similarity" is meaningless.

Random draws (the contract the tests reproduce): for each eligible layer in order, with
``C = C_out >= 2`` and ``g`` the CPU generator::

    u = torch.rand(C, generator=g)                   # kernel i draws a partner iff u[i] < p
    r = torch.randint(0, C - 1, (C,), generator=g)   # uniform over the C - 1 other kernels
    j = r + (r >= arange(C))                         # shift so that j != i

Both draws happen for every eligible layer whatever ``p``, so the stream position depends only on
the layer shapes. Layers with ``C_out == 1`` have nothing to merge and draw nothing. Randomness is
drawn on the CPU and then moved to the weight's device, so CPU and GPU runs pick the same partners
(their merge decisions can still differ for a pair whose cosine is within rounding of ``tau``).

Numerics: the cosine and the interpolation are computed in float32 (also for fp16/bf16 weights)
and the result is cast back to the weight's dtype. The interpolation is
``torch.lerp(K_i, K_j, 1 - alpha)`` (mathematically ``alpha * K_i + (1 - alpha) * K_j``, in one
fused pass; exact at alpha = 0 and 1). Kernels whose norm is zero have cosine 0. Kernels that are
not merged stay bit for bit unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medmerge_core.errors import InputError
from medmerge_core.models import StateDict, conv_layers
from medmerge_core.settings import InMergeSettings

__all__ = [
    "InMergeSettings",
    "InMergeStats",
    "apply_inmerge",
    "deep_layers",
    "inmerge_",
    "inmerge_state_dict",
    "merge_kernels",
    "training_hook",
]

_EPS = 1e-12  # Guards the cosine against zero-norm kernels (their cosine becomes 0).


@dataclass(frozen=True)
class InMergeStats:
    """What one application did, for logs and metrics.

    layers: conv layers considered (the deep ones). kernels_drawn: kernels that drew a
    partner. kernels_merged: kernels whose partner was similar enough and that were updated.
    """

    layers: int = 0
    kernels_drawn: int = 0
    kernels_merged: int = 0

    def __add__(self, other: InMergeStats) -> InMergeStats:
        return InMergeStats(
            self.layers + other.layers,
            self.kernels_drawn + other.kernels_drawn,
            self.kernels_merged + other.kernels_merged,
        )


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator: must be a CPU torch.Generator (draws are made on the CPU so that CPU and "
            f"GPU runs agree), got device {generator.device}"
        )
    return generator


SHORTCUT_NAMES = frozenset({"downsample", "shortcut"})  # projection shortcuts, off the main path


def deep_layers(names: Sequence[str], config: InMergeSettings) -> list[bool]:
    """For conv layers named in module order, which ones InMerge may merge (module docstring)."""
    if config.skip_layers is not None:
        return [index >= config.skip_layers for index in range(len(names))]
    positions, main = [], -1
    for name in names:
        if not SHORTCUT_NAMES & set(name.split(".")):
            main += 1
        positions.append(max(main, 0))
    first = (1.0 - config.deep_fraction) * (main + 1)
    return [position >= first for position in positions]


def _compact_on_host(device: torch.device) -> bool:
    """Whether to gather just the merged kernels (CPU) or use one masked update (GPU).

    On CPU selecting the merged rows costs nothing and skips the interpolation and write-back of
    every unmerged kernel (most of them: with trained weights and tau = 0.3 few pairs pass), which
    halves the time of an application. On GPU it would need a device-to-host sync per layer, so a
    ``torch.where`` over all drawn kernels is used instead. A function so tests can force a path.
    """
    return device.type == "cpu"


def _merge_layer(
    weight: Tensor, config: InMergeSettings, generator: torch.Generator, inplace: bool
) -> tuple[Tensor, int, Tensor]:
    """Core of InMerge on one conv weight: returns (weight, kernels drawn, kernels merged).

    The merged count stays a device tensor so callers can sum over layers and synchronise a GPU
    once, not once per layer. With ``inplace`` the weight is updated and returned; otherwise a new
    tensor is returned and the input is left alone (it is returned as is when nothing was drawn).
    """
    c_out = weight.shape[0]
    if c_out < 2:
        return weight, 0, torch.zeros((), dtype=torch.int64)
    u = torch.rand(c_out, generator=generator)
    r = torch.randint(0, c_out - 1, (c_out,), generator=generator)
    partner = r + (r >= torch.arange(c_out)).to(r.dtype)
    idx = torch.nonzero(u < config.p).flatten()  # CPU: no device sync.
    drawn = int(idx.numel())
    if drawn == 0:
        return weight, 0, torch.zeros((), dtype=torch.int64)

    device = weight.device
    flat = weight.detach().reshape(c_out, -1)
    both = torch.cat([idx, partner[idx]]).to(device)
    # One gather of the pre-merge rows: reads never see this layer's updates (simultaneous).
    rows = flat.index_select(0, both).float()
    if config.rule == "quantile":
        # The layer's own similarity scale: every kernel against its drawn partner.
        cos_all = _cosine(flat.float(), flat.index_select(0, partner.to(device)).float())
        merge = cos_all.index_select(0, both[:drawn]) > torch.quantile(cos_all, config.q)
    else:
        merge = _cosine(rows[:drawn], rows[drawn:]) > config.tau
    k_i, k_j = rows[:drawn], rows[drawn:]
    dst_idx = both[:drawn]
    if _compact_on_host(weight.device):
        # The mask is host memory: keep only the merged rows and skip the rest of the work.
        keep = torch.nonzero(merge).flatten()
        if keep.numel() == 0:
            return weight, drawn, torch.zeros((), dtype=torch.int64)
        k_i, k_j, dst_idx = k_i[keep], k_j[keep], dst_idx[keep]
        new_rows = torch.lerp(k_i, k_j, 1.0 - config.alpha)
    else:
        # Device memory: one masked update, so no host sync per layer. Both paths give the same
        # bits: unmerged rows are written back unchanged.
        # lerp(K_i, K_j, 1 - alpha) == alpha * K_i + (1 - alpha) * K_j in one fused pass.
        new_rows = torch.where(merge.unsqueeze(1), torch.lerp(k_i, k_j, 1.0 - config.alpha), k_i)
    new_rows = new_rows.to(weight.dtype).reshape(-1, *weight.shape[1:])
    if inplace:
        weight.index_copy_(0, dst_idx, new_rows)
        out = weight
    else:
        out = weight.detach().index_copy(0, dst_idx, new_rows)
    return out, drawn, merge.sum()


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine in fp32. vecdot is elementwise + sum: true fp32 on GPU too (a matmul
    could run in TF32 there, moving cosines enough to flip merge decisions)."""
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return torch.linalg.vecdot(a, b) / norms.clamp_min(_EPS)


def merge_kernels(
    weight: Tensor, config: InMergeSettings, generator: torch.Generator
) -> tuple[Tensor, int, int]:
    """InMerge on a single conv weight ``[C_out, ...]``, whatever its depth.

    Returns ``(new_weight, kernels_drawn, kernels_merged)``; the input is not modified. Exposed
    for custom traversals; ``inmerge_`` and ``inmerge_state_dict`` share the same core.
    """
    _check_generator(generator)
    if weight.dim() < 2:
        raise ValueError(f"weight: expected at least 2 dimensions, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        out, drawn, merged = _merge_layer(weight, config, generator, inplace=False)
    return out, drawn, int(merged.item())


def inmerge_(model: nn.Module, config: InMergeSettings, generator: torch.Generator) -> InMergeStats:
    """Apply InMerge in place to every eligible Conv2d of ``model``; call before a training step.

    A no-op (zero stats, no randomness consumed) when ``model.training`` is False, so evaluation
    can never change weights. Runs under ``torch.no_grad``; works on any device and memory format.
    Frozen conv weights (``requires_grad=False``) are merged too: freeze by merging fewer layers.
    """
    _check_generator(generator)
    if not model.training:
        return InMergeStats()
    layers, drawn_total = 0, 0
    merged_total = torch.zeros((), dtype=torch.int64)
    convs = list(conv_layers(model))
    deep = deep_layers([name for name, _ in convs], config)
    with torch.no_grad():
        for (_, conv), eligible in zip(convs, deep, strict=True):
            if not eligible:
                continue
            layers += 1
            _, drawn, merged = _merge_layer(conv.weight, config, generator, inplace=True)
            drawn_total += drawn
            if drawn:
                merged_total = merged_total.to(merged.device) + merged
    return InMergeStats(layers, drawn_total, int(merged_total.item()))


def inmerge_state_dict(
    state: Mapping[str, Tensor],
    conv_weight_keys: Sequence[str],
    config: InMergeSettings,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Return a new state dict with InMerge applied to the listed conv weights (in that order).

    For the federated strategy, which holds weights rather than a module. Deep layers are found
    from the keys' names in the order given (use ``conv_weight_keys(model)`` for module order). The
    input is never modified; merged weights are new tensors, other entries are passed through as
    the same objects. Same seed and same keys give the same result as ``inmerge_`` on the model.
    """
    _check_generator(generator)
    out = dict(state)
    seen: set[str] = set()
    for key in conv_weight_keys:
        if key in seen:
            raise InputError(f"{key}: listed twice in conv_weight_keys")
        seen.add(key)
        tensor = state.get(key)
        if not isinstance(tensor, Tensor):
            raise InputError(f"{key}: conv weight missing from the state dict")
        if tensor.dim() != 4 or not tensor.is_floating_point():
            raise InputError(
                f"{key}: expected a 4-D floating conv weight, got shape {tuple(tensor.shape)} "
                f"and dtype {tensor.dtype}"
            )
    deep = deep_layers([key.removesuffix(".weight") for key in conv_weight_keys], config)
    with torch.no_grad():
        for key, eligible in zip(conv_weight_keys, deep, strict=True):
            if not eligible:
                continue
            out[key], _, _ = _merge_layer(state[key], config, generator, inplace=False)
    return out


def training_hook(config: InMergeSettings, seed: int) -> Callable[[nn.Module, int], None]:
    """The `before_step` hook of `train.fit` that applies InMerge before every optimiser step
    from `config.start_epoch` on. Its draws depend on (seed, epoch) only, so a resumed run
    draws exactly what an uninterrupted one would."""
    generator = torch.Generator()
    seeded_for = [-1]

    def hook(model: nn.Module, epoch: int) -> None:
        if seeded_for[0] != epoch:
            generator.manual_seed(seed * 1_000_003 + epoch)
            seeded_for[0] = epoch
        if epoch >= config.start_epoch:
            inmerge_(model, config, generator)

    return hook


def apply_inmerge(
    state: Mapping[str, torch.Tensor],
    conv_keys: Sequence[str],
    config: InMergeSettings,
    generator: torch.Generator,
) -> tuple[StateDict, int]:
    """InMerge on an aggregate; returns (new state, kernels changed) for the round log."""
    merged = inmerge_state_dict(state, conv_keys, config, generator)
    changed = sum(
        int((merged[k] != state[k]).flatten(1).any(1).sum()) for k in conv_keys if k in state
    )
    return merged, changed
