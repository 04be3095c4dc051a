"""Attacks on the DP guarantee, as a curious site would make them.

- The noise replay: a site that holds the run config (every node does) regenerates the noise
  and subtracts its own update from the released aggregate. With the noise seeded from the
  run config this recovered the other site's update to 1e-7; seeded from the server's CSPRNG,
  the other update stays hidden under the full noise.
- What leaves a site under DP is what the mechanism covers: no BN statistics, no metrics, no
  pooled counts unless the run config opts in.
- The budget: a run stops, with the last model within budget, before epsilon would pass
  `dp-max-epsilon`.
"""

from __future__ import annotations

import math

import torch

from client.client_app import app as client_app
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.transport import ModelInfo, parameter_keys
from medmerge_core.io import read_jsonl
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import ARCH, nodes, run_config

NOISE, CLIP = 1.0, 1.0
INFO = ModelInfo(ARCH, 3, 1)  # the tiny federation's model (3 classes, gray)


def _two_site_round(tmp_path) -> tuple[InProcessGrid, dict]:
    rc = run_config(tmp_path, rounds=1, dp="server", inmerge=False, seed=0,
                    **{"dp-noise-multiplier": NOISE, "dp-clipping-norm": CLIP})  # fmt: skip
    grid = InProcessGrid(client_app, nodes(tmp_path, sites=2), rc)
    run_federation(grid, rc)
    return grid, rc


def _replay(grid: InProcessGrid, tmp_path, noise_seed: int) -> tuple[float, float]:
    """Site 1's attack: (how far its estimate of site 2's clipped update is from the truth,
    the norm of that update). Site 1 knows the aggregate, the base, its own update, the
    mechanism, and the seed it guesses."""
    sent = next(m for m in grid.sent if m.metadata.message_type == "train")
    base = sent.content["arrays"].to_torch_state_dict()
    replies = {m.metadata.src_node_id: m.content["arrays"].to_torch_state_dict()
               for m in grid.received if m.metadata.message_type == "train"}  # fmt: skip
    keys = list(next(iter(replies.values())))  # under DP: the parameters only
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)["state_dict"]

    def clipped(state: dict) -> dict:
        deltas = {k: state[k].double() - base[k].double() for k in keys}
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
        return {k: d * min(1.0, CLIP / norm) for k, d in deltas.items()}

    own, other = clipped(replies[4]), clipped(replies[5])
    generator = torch.Generator().manual_seed(noise_seed)
    error = truth = 0.0
    for k in keys:  # the server draws the noise key by key, in this order
        noise = torch.randn(base[k].shape, generator=generator, dtype=torch.float64)
        released = 2 * (final[k].double() - base[k].double())  # the noised sum
        estimate = released - own[k] - noise * NOISE * CLIP
        error += float((estimate - other[k]).square().sum())
        truth += float(other[k].square().sum())
    return math.sqrt(error), math.sqrt(truth)


def test_noise_replay_from_the_run_config_recovers_nothing(tmp_path) -> None:
    grid, rc = _two_site_round(tmp_path)
    seed = int(rc["seed"])
    dims = sum(p.numel() for _, p in INFO.build().named_parameters())
    full_noise = NOISE * CLIP * math.sqrt(dims)  # the norm of the noise on the sum
    for guess in (seed, seed + 1, seed + 2, 0, 1, 2):  # the old seeds, and nearby ones
        error, truth = _replay(grid, tmp_path, guess)
        assert truth <= CLIP + 1e-9
        assert error > 0.9 * full_noise, (guess, error, full_noise)  # hidden under the noise


def test_the_replay_works_when_the_seed_is_known(tmp_path, monkeypatch) -> None:
    """The control: had the attacker the server's seed, the attack would succeed (so the test
    above would fail for the old seeding)."""
    monkeypatch.setattr("server.strategy.secrets.randbits", lambda bits: 1)
    grid, _ = _two_site_round(tmp_path)
    error, truth = _replay(grid, tmp_path, 1)
    assert truth > 0 and error < 1e-3 * truth


def test_under_dp_replies_carry_only_what_the_mechanism_covers(tmp_path) -> None:
    """dp = client: train replies carry the clipped parameters and the example count only (no
    BN running statistics, no metrics); evaluation replies carry the count only (no pooled
    histograms). With dp-release-metrics the metrics leave, as the run config asked."""
    rc = run_config(tmp_path, rounds=1, dp="client", **{"dp-noise-multiplier": 1.0})
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 3 and "eval_macro_f1" not in record
    params = set(parameter_keys(INFO))
    for reply in grid.received:
        kind, content = reply.metadata.message_type, reply.content
        if kind == "train":
            keys = set(content["arrays"])
            assert keys <= params and not any("running" in k for k in keys)
            assert dict(content["metrics"]) == {"num-examples": 8}
        if kind == "evaluate":
            assert set(content) == {"metrics"} and set(content["metrics"]) == {"num-examples"}

    rc = run_config(tmp_path / "opt-in", rounds=1, dp="client",
                    **{"dp-noise-multiplier": 1.0, "dp-release-metrics": True})  # fmt: skip
    grid = InProcessGrid(client_app, nodes(tmp_path / "opt-in"), rc)
    (record,) = run_federation(grid, rc)
    assert "eval_macro_f1" in record and "val_macro_f1" in record
    train = next(m for m in grid.received if m.metadata.message_type == "train")
    assert set(train.content["arrays"]) <= params  # BN statistics stay home even then


def test_the_run_stops_before_the_budget_is_spent(tmp_path) -> None:
    """dp-max-epsilon between the epsilons after 2 and 3 releases: 2 rounds run, the third is
    not, and final.pt is the round-2 model, evaluated as usual."""
    limit = (epsilon(NOISE, 2, 1e-5) + epsilon(NOISE, 3, 1e-5)) / 2
    rc = run_config(tmp_path, rounds=5, dp="server",
                    **{"dp-noise-multiplier": NOISE, "dp-max-epsilon": limit})  # fmt: skip
    history = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    assert [h["round"] for h in history] == [1, 2]
    assert history[-1]["dp_epsilon"] <= limit
    records = read_jsonl(tmp_path / "federation/metrics.jsonl")
    (stop,) = [r for r in records if r["phase"] == "dp-budget"]
    assert stop["round"] == 3 and stop["dp_epsilon_next"] > limit >= stop["dp_epsilon"]
    assert records[-1]["phase"] == "final"
    checkpoint = torch.load(tmp_path / "federation/checkpoint.pt", weights_only=False)
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)["state_dict"]
    assert checkpoint["round"] == 2
    assert all(torch.equal(final[k], checkpoint["state_dict"][k]) for k in final)
