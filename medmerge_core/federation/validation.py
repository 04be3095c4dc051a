"""Reply screening: keys, shapes, dtypes, NaN/Inf and update-norm outliers, naming the node."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from medmerge_core.federation.transport import ModelInfo, model_reference, restore_dtypes
from medmerge_core.models import StateDict, backbone_keys, build_model, stem_conv_name


def check_update(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    allow_fp16: bool = False,
) -> str | None:
    """Why a reply's weights are unusable (keys, shapes, dtypes, NaN/Inf), or None if fine."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        key = (missing or extra)[0]
        what = "missing" if missing else "unexpected"
        return f"{len(missing)} keys missing, {len(extra)} unexpected ({what} '{key}')"
    for key, ref in reference.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        ok = value.dtype == ref.dtype or (
            allow_fp16 and ref.is_floating_point() and value.dtype == torch.float16
        )
        if not ok:
            return f"'{key}' has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"'{key}' contains NaN or Inf"
    return None


def check_backbone(
    state: Mapping[str, torch.Tensor], arch: str, allow_fp16: bool = False
) -> str | None:
    """check_update for an institution's backbone (1- or 3-channel stem, no head)."""
    with torch.device("meta"):
        probe = build_model(arch, 2, 3)
    stem = stem_conv_name(probe) + ".weight"
    channels = int(state[stem].shape[1]) if stem in state and state[stem].ndim == 4 else 3
    if channels not in (1, 3):
        return f"'{stem}' has {channels} input channels; expected 1 or 3"
    with torch.device("meta"):
        model = build_model(arch, 2, channels)
    keys = set(backbone_keys(model))
    reference = {k: v for k, v in model.state_dict().items() if k in keys}
    return check_update(state, reference, allow_fp16)


def check_coefficients(
    coefficients: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor], sources: int
) -> str | None:
    """Why the coordinator's learned coefficients are unusable, or None: each must belong to a
    weight or bias of the merged model, hold one [sources, ...] value per kernel (or layer or
    parameter) broadcastable to it, and be finite."""
    for key, value in coefficients.items():
        if key not in reference:
            return f"coefficients for unknown key '{key}'"
        shape, ref = tuple(value.shape), tuple(reference[key].shape)
        fits = len(shape) == len(ref) + 1 and all(
            c in (1, r) for c, r in zip(shape[1:], ref, strict=True)
        )
        if shape[:1] != (sources,) or not fits:
            return (
                f"coefficients '{key}' have shape {shape} for a {ref} tensor of {sources} sources"
            )
        if not np.isfinite(value).all():
            return f"coefficients '{key}' contain NaN or Inf"
    return None


def update_norm(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None = None,
) -> float:
    """L2 norm of (state - base) over `keys` (default: the floating-point tensors), in float64."""
    if keys is None:
        keys = [k for k, v in state.items() if v.is_floating_point()]
    squares = (float((state[k].double() - base[k].double()).square().sum()) for k in keys)
    return math.sqrt(sum(squares))


def screen_replies(
    replies: Mapping[str, Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    outlier_factor: float,
    allow_fp16: bool = False,
    min_cosine: float | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(accepted node names, {rejected node: reason}).

    A reply is rejected for bad keys / shapes / dtypes / NaN / Inf; when its update norm
    (against `reference`, the weights the node was sent) exceeds `outlier_factor` times the
    median norm of the *other* well-formed replies; or, with `min_cosine` and at least two
    others left, when its update's cosine to the coordinate-wise median update of the others
    (those passing the checks above) is below `min_cosine` (a sign-flipped or unrelated
    update). With one reply both comparisons are skipped.
    """
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for node, state in replies.items():
        reason = check_update(state, reference, allow_fp16)
        if reason is None:
            norms[node] = update_norm(state, reference)
        else:
            rejected[node] = reason
    for node, norm in norms.items():
        others = [v for k, v in norms.items() if k != node]
        if not others:
            continue
        median = float(np.median(others))
        if median > 0 and norm > outlier_factor * median:
            rejected[node] = (
                f"update norm {norm:.3g} is {norm / median:.1f}x the median of the others "
                f"({median:.3g}; limit {outlier_factor:g}x)"
            )
    sized = [n for n in norms if n not in rejected]  # direction among the plausible ones
    if min_cosine is not None and len(sized) >= 3:
        for node, cosine in _cosines_to_median(replies, sized, reference).items():
            if cosine < min_cosine:
                rejected[node] = (
                    f"update direction: cosine {cosine:.2f} to the median update of the others "
                    f"(limit {min_cosine:g})"
                )
    accepted = [n for n in replies if n not in rejected]
    return accepted, rejected


def _cosines_to_median(
    replies: Mapping[str, Mapping[str, torch.Tensor]],
    nodes: list[str],
    reference: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Each node's update against the coordinate-wise median update of the other nodes."""
    dot = dict.fromkeys(nodes, 0.0)
    own = dict.fromkeys(nodes, 0.0)
    theirs = dict.fromkeys(nodes, 0.0)
    for key, base in reference.items():
        if not base.is_floating_point():
            continue
        updates = torch.stack([replies[n][key].float() - base.float() for n in nodes])
        for i, node in enumerate(nodes):
            others = torch.cat([updates[:i], updates[i + 1 :]]).sort(dim=0).values
            middle = len(others) // 2  # the median; the mean of the two middle values if even
            median = (
                others[middle] if len(others) % 2 else 0.5 * (others[middle - 1] + others[middle])
            )
            dot[node] += float((updates[i].double() * median.double()).sum())
            own[node] += float(updates[i].double().square().sum())
            theirs[node] += float(median.double().square().sum())
    return {
        n: dot[n] / math.sqrt(own[n] * theirs[n]) if own[n] * theirs[n] > 0 else 1.0 for n in nodes
    }


def accept_merged(
    state: Mapping[str, torch.Tensor],
    coefficients: Mapping[str, np.ndarray],
    info: ModelInfo,
    sources: int,
    allow_fp16: bool = False,
) -> StateDict:
    """The coordinator's merged model in the model's own dtypes, after checking it and its
    learned coefficients; RuntimeError naming the problem otherwise."""
    meta = model_reference(info)[0]
    reason = check_update(state, meta, allow_fp16) or check_coefficients(
        coefficients, meta, sources
    )
    if reason is not None:
        raise RuntimeError(f"merge: unusable merged model from the coordinator: {reason}")
    return restore_dtypes(state, meta)
