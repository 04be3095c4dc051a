"""The arithmetic around secure aggregation (SecAgg+), without Flower: what a site puts into
the masked sum, what the server does with the unmasked mean, and a mask generator that uses
the whole seed.

Under SecAgg+ the server receives one number per coordinate, the weighted mean of the sites'
updates, and nothing per site. So every check that needs one site's update moves: the
finite / in-range check to the site (`site_delta`, before its update is masked; a NaN would
corrupt the sum silently), and what is left at the server to the aggregate (`apply_mean`).
The protocol, its thresholds and what it protects: docs/secure-aggregation.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from medmerge_core.errors import InputError
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.rounds import (
    Noise,
    RoundResult,
    RoundSettings,
    SiteReply,
    capped_weights,
    mean_metrics,
    read_metrics,
)
from medmerge_core.federation.transport import compress, restore_dtypes
from medmerge_core.models import StateDict


def site_weights(examples: Sequence[int], max_share: float, private: bool) -> list[float]:
    """Each site's weight in the masked sum, at most 1 (SecAgg+'s `max_weight`): example counts
    capped at `max_share` of the total (as the plain rounds weigh them), scaled so the largest
    is 1; all 1 under DP, whose noise is calibrated to an unweighted sum."""
    if private or not examples:
        return [1.0] * len(examples)
    weights = capped_weights(examples, max_share)
    top = max(weights)
    return [w / top for w in weights]


def site_delta(
    state: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    weight: float,
    clipping_range: float,
) -> dict[str, np.ndarray]:
    """A site's update (`state - sent` on `keys`, float64, in that order), checked before it is
    masked: every value finite and, once weighted, within ±`clipping_range` (SecAgg+ would clip
    it silently, so a larger update would be averaged wrong). InputError otherwise: the site
    drops out of the round instead."""
    out: dict[str, np.ndarray] = {}
    for key in keys:
        delta = (state[key].double() - sent[key].double()).numpy()
        if not np.isfinite(delta).all():
            raise InputError(f"secagg: the update of '{key}' is not finite; not sent")
        peak = float(np.abs(delta).max(initial=0.0)) * weight
        if peak > clipping_range:
            raise InputError(
                f"secagg-clipping-range: the weighted update of '{key}' reaches {peak:.3g} > "
                f"{clipping_range:g}; not sent"
            )
        out[key] = delta
    return out


def apply_mean(
    sent: Mapping[str, torch.Tensor],
    mean: Sequence[np.ndarray],
    keys: Sequence[str],
    sites: int,
    bound: float,
    dp: Noise | None = None,
) -> StateDict | str:
    """`sent` plus the unmasked mean update on `keys` (in the order the sites sent them), or
    why it is unusable (wrong arrays, not finite, or beyond ±`bound`, what a mean of in-range
    weighted updates can reach: the only screen left). With `dp`, DP-FedAvg on the sum as
    `privacy.private_mean` does it: the sites clipped their own updates, the server adds
    N(0, (z·C)²) to `mean · sites` and divides by `sites`."""
    if len(mean) != len(keys):
        return f"{len(mean)} aggregated arrays for {len(keys)} keys"
    out: StateDict = {}
    for key, value in zip(keys, mean, strict=True):
        if tuple(value.shape) != tuple(sent[key].shape):
            return f"aggregate '{key}' has shape {tuple(value.shape)}, not {tuple(sent[key].shape)}"
        if not np.isfinite(value).all() or np.abs(value).max(initial=0.0) > bound:
            return f"aggregate '{key}' is not finite or outside ±{bound:.3g}"
        delta = torch.from_numpy(np.asarray(value, dtype=np.float64))
        if dp is not None and key in dp.keys:
            noise = torch.randn(delta.shape, generator=dp.generator, dtype=torch.float64)
            delta = (delta * sites + noise * (dp.multiplier * dp.clip)) / sites
        out[key] = sent[key].double() + delta
    return out


def combine_secure_round(
    current: Mapping[str, torch.Tensor],
    meta: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    mean: Sequence[np.ndarray] | None,
    weights: Mapping[int, float],
    metrics: Mapping[int, Mapping[str, Any]],
    settings: RoundSettings,
    clipping_range: float,
    releases: int,
) -> RoundResult:
    """One secure-aggregated round from what SecAgg+ gave the server: the unmasked weighted
    `mean` update on `keys` (None: the protocol halted), the sites summed with their weights
    (`weights`, node -> weight) and their plaintext `metrics`. `apply_mean` adds it (and any DP
    noise) to what the sites were sent, checked against the bound in-range updates can reach;
    each release is accounted; the result is merged into `current` in the dtypes of `meta`."""
    summed = list(weights)
    if mean is None or len(summed) < settings.min_sites:
        skipped = (
            f"secure aggregation summed {len(summed)} site(s), min-sites is {settings.min_sites}"
        )
        return RoundResult(None, {}, {}, {}, skipped, releases)
    sent = restore_dtypes(compress({k: current[k] for k in keys}, settings.allow_fp16), meta)
    bound = clipping_range / min(weights[n] for n in summed)
    new = apply_mean(sent, mean, keys, len(summed), bound, settings.dp)
    if isinstance(new, str):
        return RoundResult(None, {}, {}, {}, f"secure aggregate refused: {new}", releases)
    log: dict[str, Any] = {}
    if settings.dp is not None:
        releases += 1
        log["dp_epsilon"] = epsilon(settings.dp.multiplier, releases, settings.dp_delta)
    reports = {n: read_metrics(metrics.get(n, {})) for n in summed}
    usable = {n: m for n, m in reports.items() if not isinstance(m, str)}
    averaged = mean_metrics([SiteReply({}, 1, m) for m in usable.values()],
                            [weights[n] for n in usable])  # fmt: skip
    state = {**current, **restore_dtypes(new, meta)}
    return RoundResult(state, averaged, {}, log, None, releases)


def safe_pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """A drop-in for Flower 1.41's SecAgg+ mask generator (flwr issue #7522): Flower's folds
    the 32-byte seed to 32 bits for numpy's Mersenne Twister, so a server that learns the
    private seeds in the unmask stage could search a pairwise seed (2^32) and unmask a site.
    Here the whole seed keys AES-256-CTR. Server and sites must use the same one."""
    if num_range & (num_range - 1) or not 0 < num_range <= 2**32:
        raise ValueError("num_range must be a power of 2, at most 2**32")
    key = hashlib.sha256(b"secaggplus-mask" + seed).digest()
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(stream.update(b"\0" * (4 * sum(sizes))), dtype="<u4")
    out, pos = [], 0
    for dims, n in zip(dimensions_list, sizes, strict=True):
        vals = (words[pos : pos + n] & np.uint32(num_range - 1)).astype(np.int64)
        out.append(vals.reshape(dims) if len(dims) else np.array(vals[0], dtype=np.int64))
        pos += n
    return out
