"""DP-FedAvg's pieces (federation.privacy) and metrics pooled over sites (metrics.pooled_*)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.privacy import clip_update, epsilon, private_mean
from medmerge_core.federation.transport import pack_counts, unpack_counts
from medmerge_core.federation.validation import update_norm
from medmerge_core.metrics import SCORE_BINS, pooled_metrics, pooling_counts, softmax


def _base() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, 4), "bn.running_var": torch.ones(4)}


def test_clip_update_scales_the_parameter_update_only() -> None:
    base = _base()
    state = {"w": torch.full((3, 4), 2.0), "bn.running_var": torch.full((4,), 5.0)}
    clipped = clip_update(state, base, ["w"], clip=1.0)
    assert update_norm(clipped, base, ["w"]) == pytest.approx(1.0)
    assert torch.allclose(clipped["w"], torch.full((3, 4), 1 / math.sqrt(12)))
    assert torch.equal(clipped["bn.running_var"], state["bn.running_var"])
    small = {"w": torch.full((3, 4), 0.01), "bn.running_var": torch.ones(4)}
    assert torch.equal(clip_update(small, base, ["w"], clip=1.0)["w"], small["w"])


def test_private_mean_without_noise_is_the_uniform_mean_of_clipped_updates() -> None:
    base = _base()
    a = {"w": torch.full((3, 4), 10.0), "bn.running_var": torch.full((4,), -3.0)}
    b = {"w": torch.full((3, 4), 0.1), "bn.running_var": torch.full((4,), 7.0)}
    out = private_mean([a, b], base, ["w"], 1.0, 0.0, torch.Generator().manual_seed(0))
    expected = (clip_update(a, base, ["w"], 1.0)["w"] + b["w"]) / 2  # equal weights
    assert torch.allclose(out["w"], expected)
    assert torch.equal(out["bn.running_var"], base["bn.running_var"])  # buffers never averaged


def test_private_mean_noise_has_the_calibrated_spread() -> None:
    base = {"w": torch.zeros(200_000)}
    sites = [{"w": torch.zeros(200_000)} for _ in range(4)]
    out = private_mean(sites, base, ["w"], 0.5, 2.0, torch.Generator().manual_seed(0))
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)  # z * C / m
    again = private_mean(sites, base, ["w"], 0.5, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(out["w"], again["w"])  # seeded: a resumed run draws the same noise


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(0.0, 3, 1e-5) == math.inf
    eps = [epsilon(1.0, r, 1e-5) for r in (1, 3, 10)]
    assert eps == sorted(eps) and eps[0] > 0
    assert epsilon(4.0, 10, 1e-5) < eps[-1]
    # Gaussian mechanism, one release: RDP conversion is within a factor ~2 of the classic
    # bound sigma = sqrt(2 ln(1.25/delta)) / eps for eps < 1.
    sigma = 10.0
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / sigma
    assert classic / 2 < epsilon(sigma, 1, 1e-5) < classic * 1.5


def test_dp_config_checks() -> None:
    with pytest.raises(InputError, match="aggregation: 'median' with dp='server'"):
        FederationConfig(dp="server", aggregation="median")
    with pytest.raises(InputError, match="dp-delta"):
        FederationConfig(dp="client", dp_delta=0.0)
    with pytest.raises(InputError, match="dp-clipping-norm"):
        FederationConfig(dp="server", dp_clipping_norm=0.0)
    FederationConfig(dp="client", fedbn=True)  # clipping at the site works with FedBN


def _sites(rng: np.random.Generator, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for n in (40, 7, 90):
        labels = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
        out.append((softmax(logits), labels))
    return out


@pytest.mark.parametrize("k", [2, 4])
def test_pooled_metrics_equal_those_of_the_pooled_test_sets(k: int) -> None:
    sites = _sites(np.random.default_rng(k), k)
    packed = [pack_counts(pooling_counts(p, y)) for p, y in sites]  # what travels
    counts = [unpack_counts(record) for record in packed]
    summed = {key: sum(c[key] for c in counts) for key in counts[0]}
    pooled = pooled_metrics(**summed)
    probs = np.concatenate([p for p, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    assert pooled["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean(), abs=1e-12)
    assert pooled["macro_f1"] == pytest.approx(
        f1_score(labels, probs.argmax(1), average="macro"), abs=1e-12
    )
    exact = (
        roc_auc_score(labels, probs[:, 1])
        if k == 2
        else roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert pooled["auroc"] == pytest.approx(exact, abs=0.01)  # ties within a 1/100 bin
    centred = (np.floor(probs * SCORE_BINS) + 0.5) / SCORE_BINS  # scores on bin centres
    one_vs_rest = [roc_auc_score(labels == c, centred[:, c]) for c in ([1] if k == 2 else range(k))]
    binned = pooled_metrics(**pooling_counts(centred, labels))
    assert binned["auroc"] == pytest.approx(np.mean(one_vs_rest), abs=1e-12)  # exact then


def test_flower_secagg_plus_needs_a_legacy_context_and_a_fitres_reply() -> None:
    """Pins what docs/privacy.md ("Secure aggregation") says SecAgg+ needs in Flower 1.42 (the
    adapter in server/secagg.py supplies both); a Flower upgrade that changes it fails here."""
    import flwr.serverapp.strategy as strategies
    from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
    from flwr.compat.common import recorddict_compat
    from flwr.server.workflow import SecAggPlusWorkflow

    assert not [name for name in dir(strategies) if "secagg" in name.lower()]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TypeError, match="LegacyContext"):
        SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)(None, context)
    # The client mod reads the reply as a legacy FitRes; a Message-API reply has no such fields.
    reply = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                        "metrics": MetricRecord({"num-examples": 4})})  # fmt: skip
    with pytest.raises(KeyError):
        recorddict_compat.recorddict_to_fitres(reply, keep_input=True)
