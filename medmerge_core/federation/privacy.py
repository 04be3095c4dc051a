"""Differential privacy for the fine-tuning rounds: DP-FedAvg with site-level guarantees.

The mechanism (McMahan et al. 2018, "Learning differentially private recurrent language
models", with every site taking part in every round):

- each site's update, over the trainable floating-point *parameters* only, is clipped to L2 norm
  `clip` (at the site with `dp = "client"`, so the raw update never leaves it; the server clips
  again, a no-op for a compliant site);
- the server adds N(0, (noise_multiplier * clip)^2) to the *sum* of the clipped updates and
  divides by the number of sites summed. One site changes that sum by at most `clip`, whatever
  its example count, so every site weighs the same (example weighting would scale one site's
  influence by its share of the examples, and the noise would no longer bound it);
- buffers (BatchNorm running statistics and counters) are neither clipped nor noised nor
  aggregated: noise made running variances negative, and un-noised statistics would be an
  unprotected release of each site's feature moments. The global model keeps the statistics it
  started from (the merged model's); with `fedbn = true` each site keeps its own;
- anything that runs on the aggregate afterwards (server-side InMerge) is post-processing.

The privacy loss over the rounds is accounted with Google's `dp-accounting` (Renyi DP of the
Gaussian mechanism, composed once per round that released an aggregate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from medmerge_core.federation.validation import update_norm
from medmerge_core.models import StateDict


def _clipped_deltas(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    clip: float,
) -> dict[str, torch.Tensor]:
    """(state - base) on `keys` in float64, scaled down to L2 norm <= `clip`."""
    deltas = {k: state[k].double() - base[k].double() for k in keys}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in deltas.items()}


def clip_update(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    clip: float,
) -> StateDict:
    """`state` with its update on `keys` scaled down to L2 norm <= `clip` (other keys as is)."""
    if update_norm(state, base, keys) <= clip:
        return dict(state)
    deltas = _clipped_deltas(state, base, keys, clip)
    return {**state, **{k: (base[k].double() + d).to(state[k].dtype) for k, d in deltas.items()}}


def private_mean(
    states: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> StateDict:
    """`base` plus the noised mean of the sites' clipped updates on `keys`; every other key of
    `base` unchanged. Noise is drawn on the CPU from `generator` (reproducible, resumable)."""
    if not states:
        raise ValueError("private_mean: no site updates")
    clipped = [_clipped_deltas(s, base, keys, clip) for s in states]
    out = dict(base)
    for k in keys:
        noise = torch.randn(base[k].shape, generator=generator, dtype=torch.float64)
        total = sum(d[k] for d in clipped) + noise * (noise_multiplier * clip)
        out[k] = (base[k].double() + total / len(clipped)).to(base[k].dtype)
    return out


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Site-level epsilon at `delta` after `rounds` releases of the Gaussian mechanism (every
    site in every round, so no subsampling amplification), by Renyi DP accounting."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))
