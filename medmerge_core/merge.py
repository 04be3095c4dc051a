"""MedMerge: a learnable, kernel-level weighted merge of d >= 2 backbones (Almakky et al. 2024).

For d = 2 each merged kernel j is exactly the paper's  w_j * theta_b + (1 - w_j) * theta_c,
with w_j initialised to 0.5.

Generalisation to d > 2 (documented choice): each kernel j learns d - 1 free coefficients
w_j1..w_j(d-1); the last source gets the remainder, so the merged kernel is

    sum_{i<d} w_ji * theta_i  +  (1 - sum_{i<d} w_ji) * theta_d,

an affine combination (weights sum to one, unconstrained like the paper's w), initialised at
1/d each. At d = 2 it is exactly the paper's formula with w_j = w_j1.

Constraints (`constraint`): "none" is the paper's unconstrained w. "clamp" projects each
kernel's d coefficients onto the probability simplex after every optimiser step (at d = 2:
w clamped to [0, 1]; at d > 2: the Euclidean projection, so every coefficient is in [0, 1] and
they sum to one). "softmax" learns d logits per kernel and uses their softmax (at d = 2:
w = sigmoid(l_1 - l_2)); the learning rate then acts on the logits, and w moves about half as
far per step near w = 0.5.

What is merged: the weight (and bias, sharing the same coefficient) of every Conv2d and every
backbone Linear (VGG's fc6/fc7). BatchNorm affine parameters and running statistics start as
the mean over the sources; integer buffers (num_batches_tracked) take the maximum. The head is new.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from medmerge_core.errors import InputError
from medmerge_core.models import NORM_TYPES, StateDict, head_name, mergeable_keys
from medmerge_core.settings import CONSTRAINTS, GRANULARITIES, Constraint, Granularity

COEFFICIENT_PREFIX = "coefficient:"  # a merged tensor's coefficients in `MergedModel.probe_state`


def coefficient_shape(weight_shape: torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of one source's coefficients for a weight, broadcastable against that weight."""
    rest = (1,) * (len(weight_shape) - 1)
    if granularity == "kernel":
        return (weight_shape[0], *rest)
    if granularity == "layer":
        return (1, *rest)
    if granularity == "parameter":
        return tuple(weight_shape)
    raise InputError(f"merge.granularity: unknown '{granularity}'; expected one of {GRANULARITIES}")


def full_coefficients(free: torch.Tensor) -> torch.Tensor:
    """[d-1, ...] free coefficients -> [d, ...], the last source taking 1 - sum of the others."""
    return torch.cat([free, 1.0 - free.sum(0, keepdim=True)], dim=0)


def project_to_simplex(free: torch.Tensor) -> torch.Tensor:
    """The [d-1, ...] free coefficients whose full [d, ...] vector per element is the Euclidean
    projection onto the probability simplex (Duchi et al. 2008); at d = 2, w clamped to [0, 1]."""
    full = full_coefficients(free)
    d = full.shape[0]
    rows = full.reshape(d, -1).t()  # [n, d]
    ordered = rows.sort(dim=1, descending=True).values
    excess = ordered.cumsum(dim=1) - 1.0
    ranks = torch.arange(1, d + 1, dtype=rows.dtype, device=rows.device)
    support = (ordered - excess / ranks > 0).sum(dim=1, keepdim=True).clamp_min(1)
    shift = excess.gather(1, support - 1) / support.to(rows.dtype)
    projected = (rows - shift).clamp_min(0.0).t().reshape(full.shape)
    return projected[:-1]


def combine(stack: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Merged tensor sum_i c_i * theta_i for a stack [d, *shape] and free coefficients [d-1, ...].

    Pure and vectorised (no loop over kernels), and the very arithmetic of `MergedModel`, so a
    merge from state dicts equals the probe's bit for bit. With d = 2 and w = 1 (or 0) the
    result is source 0 (or 1) bit for bit.
    """
    shape = stack.shape[1:]
    rows = shape[0] if shape else 1
    return combine_source_major(stack.reshape(stack.shape[0], rows, -1), free).reshape(shape)


def source_major(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack d sources' [C_out, ...] tensors as one contiguous [d, C_out, K] buffer."""
    return torch.stack([t.reshape(t.shape[0], -1) for t in tensors]).contiguous()


def combine_source_major(stack: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """`combine` for a [d, C_out, K] stack: [C_out, K], without a d-times-larger product.

    One multiply and d - 1 fused multiply-adds, each reading one source: w = 1 (or 0) gives a
    source bit for bit, and w = 1/2 the exact mean. Kernel, layer and parameter coefficients
    broadcast as [C_out or 1, 1 or K]. (A batched matmul with inner size d was 7% of a
    ResNet-18 step slower on CPU.)
    """
    d, c_out = stack.shape[0], stack.shape[1]
    w = free.reshape(d - 1, 1 if free[0].numel() == 1 else c_out, -1)
    out = stack[-1] * (1.0 - w.sum(0))
    for i in range(d - 1):
        out = torch.addcmul(out, w[i], stack[i])
    return out


def check_sources(sources: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Same keys and shapes everywhere, or one error that names both mismatching sources."""
    if len(sources) < 2:
        raise InputError(f"sources: MedMerge needs at least 2 sources, got {len(sources)}")
    ref = sources[0]
    for name, source in zip(names[1:], sources[1:], strict=True):
        extra = sorted(set(source) ^ set(ref))
        if extra:
            raise InputError(
                f"sources '{names[0]}' and '{name}' have different architectures "
                f"(key '{extra[0]}' is in only one)"
            )
        for key, value in source.items():
            if value.shape != ref[key].shape:
                raise InputError(
                    f"sources '{names[0]}' and '{name}' have different architectures: '{key}' is "
                    f"{tuple(ref[key].shape)} vs {tuple(value.shape)}"
                )


def average_state(sources: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Mean of float tensors, max of integer ones (num_batches_tracked is a count)."""
    out: StateDict = {}
    for key in sources[0]:
        stack = torch.stack([s[key] for s in sources])
        out[key] = stack.mean(0) if stack.is_floating_point() else stack.max(0).values
    return out


def merge_state_dicts(
    sources: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Mapping[str, torch.Tensor],
    bias_of: Mapping[str, str],
) -> StateDict:
    """Merged backbone state: coefficients[key] is [d-1, ...] for each merged weight key.

    bias_of maps each merged bias key to its weight key; a bias without its own coefficients
    shares its weight's (kernel and layer granularity). Everything else (BN, buffers) is averaged.
    """
    out = average_state(sources)
    for key, free in coefficients.items():
        out[key] = combine(torch.stack([s[key] for s in sources]), free)
    for bias, weight in bias_of.items():
        if bias not in coefficients:  # shares its weight's coefficients
            shared = coefficients[weight].flatten(1)
            out[bias] = combine(torch.stack([s[bias] for s in sources]), shared)
    return out


def _like(merged: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """`merged` in the memory format of the weight it replaces (channels_last after
    Runtime.model), so the probe runs the very conv kernels that the baked model will."""
    if template.is_contiguous():
        return merged
    return torch.empty_like(template, dtype=merged.dtype).copy_(merged)


class MergedModel(nn.Module):
    """The MedMerge probe: frozen sources, learnable merge coefficients, BN and a new head.

    `model` is the target-task model (built by models.build_model, so its head is new). Its
    merged tensors are replaced on every forward by ones computed from the source stacks with
    torch.func.functional_call, so autograd reaches the coefficients and never the sources.
    With `learn_coefficients=False` the coefficients stay at `init` and only BN and the head
    train: the control that tells what the learnt coefficients add.
    """

    def __init__(
        self,
        model: nn.Module,
        sources: Sequence[Mapping[str, torch.Tensor]],
        source_names: Sequence[str] | None = None,
        granularity: Granularity = "kernel",
        freeze_bn: bool = False,
        init: Sequence[float] | None = None,
        constraint: Constraint = "none",
        learn_coefficients: bool = True,
    ) -> None:
        super().__init__()
        if constraint not in CONSTRAINTS:
            raise InputError(f"merge.constraint: unknown '{constraint}'; expected {CONSTRAINTS}")
        names = list(source_names or [f"source{i}" for i in range(len(sources))])
        check_sources(sources, names)
        state = model.state_dict()
        head = head_name(model) + "."
        backbone = [k for k in state if not k.startswith(head)]
        if set(backbone) != set(sources[0]):
            extra = sorted(set(backbone) ^ set(sources[0]))[0]
            raise InputError(
                f"source '{names[0]}' does not match the model's architecture (key '{extra}')"
            )
        d = len(sources)
        init_values = list(init) if init is not None else [1.0 / d] * (d - 1)
        if len(init_values) != d - 1:
            raise InputError(f"merge.init: expected {d - 1} values for {d} sources")
        init_full = [*init_values, 1.0 - sum(init_values)]
        if constraint == "clamp" and min(init_full) < 0:
            raise InputError(f"merge.init: {init_full} is not convex, as 'clamp' needs")
        if constraint == "softmax" and min(init_full) <= 0:
            raise InputError(f"merge.init: {init_full} must be > 0 for 'softmax'")
        # What each coefficient parameter holds: the free [d-1] values, or [d] softmax logits.
        stored = [float(np.log(v)) for v in init_full] if constraint == "softmax" else init_values

        self.model = model
        self.source_names = names
        self.granularity = granularity
        self.freeze_bn = freeze_bn
        self.constraint = constraint
        self.weight_keys: list[str] = []
        self.bias_keys: list[str | None] = []
        self.shapes = {k: v.shape for k, v in state.items()}
        self.bias_of: dict[str, str] = {}
        self.coefficients = nn.ParameterList()

        model.load_state_dict({**state, **average_state(sources)})
        for index, (weight, bias) in enumerate(mergeable_keys(model)):
            self.weight_keys.append(weight)
            self.bias_keys.append(bias)
            shape = coefficient_shape(state[weight].shape, granularity)
            free = torch.stack([torch.full(shape, v) for v in stored])
            self.coefficients.append(nn.Parameter(free, requires_grad=learn_coefficients))
            self.register_buffer(
                f"source_w{index}", source_major([s[weight] for s in sources]), persistent=False
            )
            targets = [weight]
            if bias is not None:
                self.register_buffer(
                    f"source_b{index}", source_major([s[bias] for s in sources]), persistent=False
                )
                if granularity == "parameter":
                    self.coefficients.append(
                        nn.Parameter(
                            torch.stack([torch.full(state[bias].shape, v) for v in stored]),
                            requires_grad=learn_coefficients,
                        )
                    )
                targets.append(bias)
            for key in targets:
                model.get_parameter(key).requires_grad_(False)
            if bias is not None:
                self.bias_of[bias] = weight
        self._set_bn_trainable(not freeze_bn)

    def _set_bn_trainable(self, trainable: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, NORM_TYPES):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(trainable)

    def train(self, mode: bool = True) -> MergedModel:
        super().train(mode)
        if self.freeze_bn:  # frozen BN keeps its averaged running statistics too
            for module in self.model.modules():
                if isinstance(module, NORM_TYPES):
                    module.eval()
        return self

    def _free(self, stored: torch.Tensor) -> torch.Tensor:
        return torch.softmax(stored, dim=0)[:-1] if self.constraint == "softmax" else stored

    def coefficient_map(self) -> dict[str, torch.Tensor]:
        """Free coefficients [d-1, ...] per merged key (biases appear only at 'parameter')."""
        out: dict[str, torch.Tensor] = {}
        coefs = iter(self.coefficients)
        for weight, bias in zip(self.weight_keys, self.bias_keys, strict=True):
            out[weight] = self._free(next(coefs))
            if bias is not None and self.granularity == "parameter":
                out[bias] = self._free(next(coefs))
        return out

    @torch.no_grad()
    def project_(self) -> None:
        """With constraint 'clamp': put every kernel's coefficients back on the simplex.

        Called after each optimiser step (projected gradient descent); a no-op otherwise.
        """
        if self.constraint == "clamp":
            for coef in self.coefficients:
                coef.copy_(project_to_simplex(coef))

    def parameter_groups(
        self, coef_lr: float, lr: float, weight_decay: float
    ) -> list[dict[str, object]]:
        """AdamW groups: the coefficients at their own rate and never decayed (decay would pull
        w towards 0, i.e. towards the last source), then BN and head with the LP settings."""
        coef_ids = {id(p) for p in self.coefficients}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in coef_ids]
        learned = [p for p in self.coefficients if p.requires_grad]  # none when held fixed
        coefficient_group = [{"params": learned, "lr": coef_lr, "weight_decay": 0.0}]
        return [*(coefficient_group if learned else []),
                {"params": others, "lr": lr, "weight_decay": weight_decay}]  # fmt: skip

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The merged conv/linear tensors, computed with a few vectorised ops per layer.

        Always in fp32, also under autocast: a bf16 product would round away coefficient moves
        below ~1e-3, and `bake` (fp32) would then differ from what the probe trained.
        """
        device_type = self.coefficients[0].device.type
        with torch.autocast(device_type, enabled=False):
            return self._merged_fp32()

    def _merged_fp32(self) -> dict[str, torch.Tensor]:
        coefs = self.coefficient_map()
        out: dict[str, torch.Tensor] = {}
        for index, weight in enumerate(self.weight_keys):
            shape = self.shapes[weight]
            merged = combine_source_major(getattr(self, f"source_w{index}"), coefs[weight])
            out[weight] = _like(merged.view(shape), self.model.get_parameter(weight))
            bias = self.bias_keys[index]
            if bias is not None:
                bias_stack = getattr(self, f"source_b{index}")
                free = coefs.get(bias, coefs[weight].flatten(1))
                out[bias] = combine_source_major(bias_stack, free).view(shape[0])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.merged_tensors(), (x,), strict=False)

    @torch.no_grad()
    def bake(self) -> nn.Module:
        """A plain torchvision model with the merged convs, the learned BN and the head."""
        baked = copy.deepcopy(self.model)
        for key, value in self.merged_tensors().items():
            baked.get_parameter(key).copy_(value)
        for param in baked.parameters():
            param.requires_grad_(True)
        baked.train(self.training)
        return baked

    def _coefficient_keys(self) -> list[str]:
        """The merged tensor each entry of `self.coefficients` belongs to, in order."""
        keys = []
        for weight, bias in zip(self.weight_keys, self.bias_keys, strict=True):
            keys.append(weight)
            if bias is not None and self.granularity == "parameter":
                keys.append(bias)
        return keys

    def probe_state(self) -> StateDict:
        """What the probe learns, on the CPU, by model key: each merged tensor's stored
        coefficients as `coefficient:<key>`, then the norm layers and the head as themselves.
        The merged convs are left out: the sources and the coefficients determine them, so a
        federated probe round sends only this (`load_probe_state` reads it back)."""
        merged = set(self.weight_keys) | {b for b in self.bias_keys if b is not None}
        out = {
            COEFFICIENT_PREFIX + key: coef.detach().cpu().clone()
            for key, coef in zip(self._coefficient_keys(), self.coefficients, strict=True)
        }
        for key, value in self.model.state_dict().items():
            if key not in merged:
                out[key] = value.detach().cpu().clone()
        return out

    def probe_parameter_keys(self) -> list[str]:
        """The keys of `probe_state` that training changes by gradient (not BN statistics)."""
        keys = [COEFFICIENT_PREFIX + k for k in self._coefficient_keys()]
        return keys + [k for k, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def load_probe_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the coefficients, norm layers and head from a full `probe_state`."""
        expected = set(self.probe_state())
        if set(state) != expected:
            key = sorted(set(state) ^ expected)[0]
            raise InputError(f"probe state: key '{key}' is missing or unexpected")
        for key, coef in zip(self._coefficient_keys(), self.coefficients, strict=True):
            coef.copy_(state[COEFFICIENT_PREFIX + key])
        rest = {k: v for k, v in state.items() if not k.startswith(COEFFICIENT_PREFIX)}
        self.model.load_state_dict(rest, strict=False)

    def num_coefficients(self) -> int:
        return sum(p.numel() for p in self.coefficients)

    @torch.no_grad()
    def coefficient_arrays(self) -> dict[str, np.ndarray]:
        """Every source's coefficient per merged key: [d, ...] float32 (the last is implied)."""
        return {
            key: full_coefficients(free.detach().float().cpu()).numpy()
            for key, free in self.coefficient_map().items()
        }
