"""One round's arithmetic at the server, without Flower: check each site's reply, screen the
updates, and combine the accepted ones (weighted mean, median, trimmed mean or DP-FedAvg).

Nothing a site sends is trusted as sent: its example count must be a finite positive integer
no larger than what it reported at discovery and its weight is capped at a share of the
round's total (so one site cannot steer the mean by claiming a huge count); its metrics must
be finite numbers under a bounded number of plain keys, and only the keys every accepted
reply shares are averaged; its pooled evaluation counts must be consistent with each other and
with the model's classes. A reply that fails any check is rejected with a reason naming it,
and the round goes on without it, as it does for a NaN update.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.privacy import epsilon, private_mean
from medmerge_core.federation.protocol import NUM_EXAMPLES, POOLED_KEYS
from medmerge_core.federation.transport import restore_dtypes
from medmerge_core.federation.validation import screen_replies
from medmerge_core.metrics import pooled_metrics
from medmerge_core.models import StateDict

MAX_METRICS = 64  # more metric keys than this in one reply is not a site's honest report
METRIC_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SiteReply:
    """A site's reply once its wire format was checked: weights, example count, metrics."""

    state: StateDict
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Noise:
    """DP-FedAvg's settings for one round: the keys it clips and noises, the clipping norm, the
    noise multiplier, and the server's private generator."""

    keys: Sequence[str]
    clip: float
    multiplier: float
    generator: torch.Generator


@dataclass(frozen=True)
class RoundOutcome:
    """The new global state (None: nothing usable), averaged metrics, and the rejections."""

    state: StateDict | None
    metrics: dict[str, float]
    accepted: list[str]
    rejected: dict[str, str]


@dataclass(frozen=True)
class RoundSettings:
    """What one round's screening, DP and aggregation take from the run config, plus the
    round's minimum of sites and DP-FedAvg's settings (None: no DP)."""

    rule: str
    trim_fraction: float
    max_share: float
    outlier_factor: float
    min_cosine: float | None
    allow_fp16: bool
    min_sites: int
    dp: Noise | None
    dp_delta: float

    @classmethod
    def from_config(cls, cfg: FederationConfig, min_sites: int, dp: Noise | None) -> RoundSettings:
        return cls(cfg.aggregation, cfg.trim_fraction, cfg.max_weight_share, cfg.outlier_factor,
                   cfg.min_cosine, cfg.fp16, min_sites, dp, cfg.dp_delta)  # fmt: skip


@dataclass(frozen=True)
class RoundResult:
    """A finished round at the server: the new global state (`current` with the aggregate, in
    the model's dtypes; None: unchanged, `skipped` says why), the metrics of the sites it
    combined, every rejection with its reason, the round's fields for metrics.jsonl (`log`)
    and the count of DP releases so far."""

    state: StateDict | None
    metrics: dict[str, float]
    rejected: dict[str, str]
    log: dict[str, Any]
    skipped: str | None
    releases: int


def read_examples(value: Any, cap: int | None) -> int | str:
    """A reply's example count, or why it is unusable (not a finite positive integer, or more
    than `cap`, the count the site reported at discovery)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"num-examples is {type(value).__name__}, not a number"
    if not math.isfinite(value) or value != int(value) or value < 1:
        return f"num-examples must be a positive integer, got {value!r}"
    if cap is not None and value > cap:
        return f"num-examples {int(value)} exceeds the {cap} this site reported at discovery"
    return int(value)


def read_metrics(record: Mapping[str, Any]) -> dict[str, float] | str:
    """A reply's metrics as floats (without num-examples), or why they are unusable."""
    if len(record) > MAX_METRICS:
        return f"{len(record)} metric keys (at most {MAX_METRICS})"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == NUM_EXAMPLES:
            continue
        if not METRIC_KEY.match(key):
            return f"metric key {key[:40]!r} is not a plain lower-case name"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric '{key}' is {type(value).__name__}, not a number"
        if math.isinf(value):  # NaN is an undefined metric (AUROC of one class), not an attack
            return f"metric '{key}' is {value}"
        out[key] = float(value)
    return out


def read_report(record: Mapping[str, Any], cap: int | None) -> tuple[int, dict[str, float]] | str:
    """A reply's metric record as (example count, metrics), or why it is unusable."""
    if NUM_EXAMPLES not in record:
        return "reply has no num-examples"
    examples = read_examples(record[NUM_EXAMPLES], cap)
    if isinstance(examples, str):
        return examples
    metrics = read_metrics(record)
    return metrics if isinstance(metrics, str) else (examples, metrics)


def read_counts(
    record: Mapping[str, Any], num_classes: int, examples: int
) -> dict[str, np.ndarray] | str:
    """A site's pooled-evaluation counts (`metrics.pooling_counts`, flattened), or why they are
    unusable: shapes that do not fit `num_classes`, negative or non-integer counts, or totals
    that disagree with each other or with the site's `examples` test images."""
    if set(record) != set(POOLED_KEYS):
        return f"pooled counts have keys {sorted(record)}"
    arrays = {}
    for key, value in record.items():
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return f"pooled '{key}' is not a list of integers"
        arrays[key] = np.asarray(value, dtype=np.int64)
        if (arrays[key] < 0).any():
            return f"pooled '{key}' has negative counts"
    k = num_classes
    if arrays["confusion"].size != k * k:
        return f"pooled confusion has {arrays['confusion'].size} cells for {k} classes"
    bins, rest = divmod(arrays["positive"].size, k)
    if rest or bins < 1 or arrays["negative"].size != arrays["positive"].size:
        return "pooled score histograms do not have one row per class"
    confusion = arrays["confusion"].reshape(k, k)
    positive, negative = arrays["positive"].reshape(k, bins), arrays["negative"].reshape(k, bins)
    per_class = confusion.sum(1)
    if int(confusion.sum()) != examples:
        return f"pooled confusion counts {int(confusion.sum())} images, the reply {examples}"
    if (positive.sum(1) != per_class).any() or (negative.sum(1) != examples - per_class).any():
        return "pooled score histograms disagree with the confusion counts"
    return {"confusion": confusion, "positive": positive, "negative": negative}


def capped_weights(examples: Sequence[int], max_share: float) -> list[float]:
    """Example counts as weights, each at most `max_share` of their total (water-filling: the
    capped weights are equal and the rest keep their proportions). Equal weights when the cap
    cannot be met (fewer than 1 / max_share sites)."""
    weights = [float(n) for n in examples]
    if not weights or max_share >= 1.0:
        return weights
    if len(weights) * max_share <= 1.0:
        return [1.0] * len(weights)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in capped]
        free_total = sum(weights[i] for i in free)
        # capped sites share `max_share` each of the total T: T = free_total + c * max_share * T
        total = free_total / (1.0 - len(capped) * max_share)
        over = [i for i in free if weights[i] > max_share * total]
        if not over:
            return [max_share * total if i in capped else weights[i] for i in range(len(weights))]
        capped.update(over)


def combine_updates(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rule: str,
    trim_fraction: float,
) -> StateDict:
    """The aggregate of the sites' states, key by key in float64: the weighted mean, the
    coordinate-wise median, or the mean after cutting `int(trim_fraction * n)` values at each
    end of every coordinate (as Flower's FedMedian / FedTrimmedAvg, unweighted)."""
    out: StateDict = {}
    w = torch.tensor(weights, dtype=torch.float64)
    for key in states[0]:
        stack = torch.stack([s[key].double() for s in states])
        if rule == "median":
            out[key] = stack.median(dim=0).values if len(states) % 2 else _even_median(stack)
        elif rule == "trimmed-mean":
            cut = int(trim_fraction * len(states))
            ordered = stack.sort(dim=0).values
            out[key] = ordered[cut : len(states) - cut].mean(dim=0)
        else:
            shape = (-1,) + (1,) * (stack.ndim - 1)
            out[key] = (stack * w.view(shape)).sum(dim=0) / w.sum()
    return out


def _even_median(stack: torch.Tensor) -> torch.Tensor:
    ordered = stack.sort(dim=0).values
    middle = len(stack) // 2
    return 0.5 * (ordered[middle - 1] + ordered[middle])


def mean_metrics(replies: Sequence[SiteReply], weights: Sequence[float]) -> dict[str, float]:
    """Weighted means of the metric keys every reply has (keys only some sent are dropped),
    over the replies where the metric is defined (NaN where it is nowhere)."""
    if not replies:
        return {}
    shared = set.intersection(*(set(r.metrics) for r in replies))
    out = {}
    for key in sorted(shared):
        pairs = [(w, r.metrics[key]) for r, w in zip(replies, weights, strict=True)]
        defined = [(w, v) for w, v in pairs if not math.isnan(v)]
        total = sum(w for w, _ in defined)
        out[key] = sum(w * v for w, v in defined) / total if total > 0 else math.nan
    return out


def aggregate_round(
    replies: Mapping[str, SiteReply],
    current: Mapping[str, torch.Tensor],
    *,
    rule: str,
    trim_fraction: float,
    max_share: float,
    outlier_factor: float,
    min_cosine: float | None,
    allow_fp16: bool,
    min_sites: int,
    dp: Noise | None = None,
) -> RoundOutcome:
    """Screen the replies against `current` (what the sites were sent; under DP only the keys
    DP covers), then combine the accepted ones. With `dp`, DP-FedAvg: every site weighs the
    same, and clipping bounds each site, so the norm and direction screens are off. With
    fewer than `min_sites` accepted there is no new state."""
    states = {name: r.state for name, r in replies.items()}
    if dp is None:
        accepted, rejected = screen_replies(states, current, outlier_factor, allow_fp16,
                                            min_cosine)  # fmt: skip
    else:
        accepted, rejected = screen_replies(states, current, math.inf, allow_fp16, None)
    if len(accepted) < min_sites:
        return RoundOutcome(None, {}, accepted, rejected)
    chosen = [replies[n] for n in accepted]
    weights = capped_weights([r.examples for r in chosen], max_share)
    if dp is not None:
        state = private_mean([r.state for r in chosen], current, dp.keys, dp.clip,
                             dp.multiplier, dp.generator)  # fmt: skip
        weights = [1.0] * len(chosen)
    else:
        state = combine_updates([r.state for r in chosen], weights, rule, trim_fraction)
    return RoundOutcome(state, mean_metrics(chosen, weights), accepted, rejected)


def combine_round(
    replies: Mapping[str, SiteReply],
    unreadable: Mapping[str, str],
    current: Mapping[str, torch.Tensor],
    meta: Mapping[str, torch.Tensor],
    settings: RoundSettings,
    releases: int,
) -> RoundResult:
    """One plain (not secure-aggregated) round from the replies whose format was read:
    `aggregate_round` against `current` (what the sites were sent; under DP only the keys DP
    covers), each release accounted (epsilon after `releases` + 1), and the aggregate merged
    into `current` in the dtypes of `meta`. `unreadable`: replies already rejected (errors,
    malformed formats) by name, listed with the screening's rejections."""
    dp = settings.dp
    sent = current if dp is None else {k: current[k] for k in dp.keys}
    outcome = aggregate_round(
        replies,
        sent,
        rule=settings.rule,
        trim_fraction=settings.trim_fraction,
        max_share=settings.max_share,
        outlier_factor=settings.outlier_factor,
        min_cosine=settings.min_cosine,
        allow_fp16=settings.allow_fp16,
        min_sites=settings.min_sites,
        dp=dp,
    )
    rejected = {**unreadable, **outcome.rejected}
    log: dict[str, Any] = {"sites": len(outcome.accepted), "rejected": sorted(rejected)}
    if outcome.state is None:
        skipped = f"{len(outcome.accepted)} usable site replies, min-sites is {settings.min_sites}"
        return RoundResult(None, {}, rejected, log, skipped, releases)
    if dp is not None:
        releases += 1
        log["dp_epsilon"] = epsilon(dp.multiplier, releases, settings.dp_delta)
    state = {**current, **restore_dtypes(outcome.state, meta)}
    return RoundResult(state, outcome.metrics, rejected, log, None, releases)


def pool_evaluations(
    reports: Sequence[tuple[SiteReply, Mapping[str, np.ndarray]]],
) -> dict[str, float] | None:
    """The sites' evaluations (reply, pooled counts) as one: example-weighted means of the
    metrics they share, with accuracy, macro-F1 and AUROC computed over all their test images
    when they sent counts. None when no site's evaluation was usable."""
    if not reports:
        return None
    sums: dict[str, np.ndarray] = {}
    for _, counts in reports:
        for key, value in counts.items():
            sums[key] = sums[key] + value if key in sums else value
    replies = [reply for reply, _ in reports]
    metrics = mean_metrics(replies, [float(r.examples) for r in replies])
    if sums:
        metrics.update(pooled_metrics(sums["confusion"], sums["positive"], sums["negative"]))
    return metrics


def check_rule(rule: str, trim_fraction: float, sites: int, min_cosine: float) -> list[str]:
    """Refuse a robust rule that cannot work with the `sites` discovered (InputError: the
    median of 2 is their mean; a trimmed mean that trims nothing is the mean); returns the
    warnings to log (the direction screen needs 3 sites and is then skipped)."""
    if rule == "median" and sites < 3:
        raise InputError(f"aggregation: 'median' needs 3 or more sites (of 2 it is the mean); "
                         f"{sites} discovered")  # fmt: skip
    if rule == "trimmed-mean" and int(trim_fraction * sites) == 0:
        need = (f"{math.ceil(1 / trim_fraction)} sites or more" if trim_fraction > 0
                else "a trim-fraction above 0")  # fmt: skip
        raise InputError(f"aggregation: 'trimmed-mean' with trim-fraction {trim_fraction:g} trims "
                         f"nothing at {sites} sites; it needs {need}")  # fmt: skip
    if min_cosine > -1.0 and sites < 3:
        return [f"min-cosine: the direction screen needs 3 or more sites, not {sites}; skipped"]
    return []
