"""Secure aggregation (SecAgg+, `secagg = true`) in process: what the server holds, the mean it
gets, dropouts, DP, InMerge, the site policy, and the config refusals.

`secured` is one real federation (the project's ServerApp and ClientApp through
simulations.inprocess.InProcessGrid) with 4 sites, client-side DP and a site policy that
requires secure aggregation; in round 2 one site fails after the key exchange. Spies on the
real path record each site's update before it is masked and the mean the server unmasks.
The protocol test uses a numpy ClientApp, so it takes a fraction of a second.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

import client.client_app as client_module
import server.phases as phases_module
import server.strategy as strategy_module
from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.rounds import Noise
from medmerge_core.federation.secure_sum import apply_mean, site_delta, site_weights
from medmerge_core.federation.site_policy import check, parse_policy
from medmerge_core.federation.transport import ModelInfo, parameter_keys
from medmerge_core.io import read_jsonl
from server.secagg import secure_mean
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import ARCH, nodes, one_line_error, run_config

SECURE = {"secagg": True, "min-sites": 3, "min-cosine": -1.0, "outlier-factor": math.inf}
SEED = 20261202  # the DP noise seed, pinned so the test can regenerate the noise


def _stage(msg: Message) -> str | None:
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else str(record.get("stage"))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"dp": "server"}, "dp"),
        ({"min-cosine": 0.0}, "min-cosine"),
        ({"outlier-factor": 10.0}, "outlier-factor"),
        ({"probe-mode": "federated"}, "probe-mode"),
        ({"min-sites": 2}, "min-sites"),
        (
            {"dp": "client", "dp-clipping-norm": 2.0, "secagg-clipping-range": 1.0},
            "secagg-clipping-range",
        ),
        ({"secagg-threshold": 0.0}, "secagg-threshold"),
        ({"secagg-num-shares": 1.5}, "secagg-num-shares"),
    ],
)
def test_combinations_that_cannot_work_are_one_line_errors_naming_the_key(
    overrides: dict, key: str
) -> None:
    message = one_line_error(FederationConfig.from_run_config, {**SECURE, **overrides})
    assert key in message, message


def test_what_works_with_secagg_is_accepted() -> None:
    for extra in ({}, {"dp": "client", "dp-clipping-norm": 1.0, "secagg-clipping-range": 1.0},
                  {"fedbn": True, "fp16": True}):  # fmt: skip
        assert FederationConfig.from_run_config({**SECURE, **extra}).secagg
    assert not FederationConfig.from_run_config({"aggregation": "median"}).secagg


# ----------------------------------------------------------------------------- the protocol

toy = ClientApp()
SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (5, 4), "fc.bias": (5,)}


def toy_delta(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: 0.3 * rng.standard_normal(s) for k, s in SHAPES.items()}


def _toy_mod(msg: Message, context: Context, call_next: Any) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    client_module.use_safe_prg()  # as the project's ClientApp does: the server uses the same
    return secaggplus_mod(msg, context, call_next)


@toy.train(mods=[_toy_mod])
def _toy_train(msg: Message, context: Context) -> Message:
    weight = float(msg.content["config"]["weight"])  # type: ignore[arg-type,index]
    content = RecordDict({
        "fitres.parameters": ArrayRecord({k: Array(v) for k, v in
                                          toy_delta(context.node_id).items()}),
        "fitres.num_examples": MetricRecord({"num_examples": weight}),
        "fitres.metrics": ConfigRecord({"loss": float(context.node_id)}),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
    })  # fmt: skip
    return Message(content, reply_to=msg)


def test_secure_mean_is_the_weighted_mean_and_survives_a_dropout_after_the_key_exchange() -> None:
    """Weights 0.25/0.5/1/0.75: the unmasked result is Σwδ/Σw within the quantisation error;
    with node 2 failing in the training stage the others' mean comes back; a node lost at
    setup halts the protocol (flwr 1.41-1.42: no mean, never a wrong one), and the next round
    works."""
    weights = {1: 0.25, 2: 0.5, 3: 1.0, 4: 0.75}

    def contents() -> dict[int, RecordDict]:
        return {
            n: RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"weight": w})})
            for n, w in weights.items()
        }

    def expected(summed: list[int]) -> list[np.ndarray]:
        total = sum(weights[n] for n in summed)
        return [sum(weights[n] * toy_delta(n)[k] for n in summed) / total for k in SHAPES]

    protocol = {"num_shares": 1.0, "threshold": 0.6, "clipping_range": 2.0, "timeout": 30.0}
    step = 2 * 2.0 / 2**22  # one quantisation step of a weighted value
    previous: InProcessGrid | None = None
    for rnd, fail, summed in ((1, None, [1, 2, 3, 4]), (2, "collect_masked_vectors", [1, 3, 4]),
                              (3, "setup", None), (4, None, [1, 2, 3, 4])):  # fmt: skip
        grid = InProcessGrid(toy, [{}] * 4, {},
                             fail=lambda n, m, f=fail: n == 2 and _stage(m) == f)  # fmt: skip
        if previous is not None and rnd == 4:  # the same nodes' state after the halted round
            grid.contexts = previous.contexts
        previous = grid
        result = secure_mean(grid, rnd, contents(), **protocol)
        if summed is None:
            assert result.mean is None
            continue
        assert result.summed == summed and result.weights == {n: weights[n] for n in summed}
        bound = len(summed) * step / sum(weights[n] for n in summed)
        for got, want in zip(result.mean, expected(summed), strict=True):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= bound
        # What the server received: no array at all, and masked vectors unlike any update.
        assert all(s["array_entries"] == 0 for s in result.seen)
        masked = [np.load(io.BytesIO(b)) for r in grid.received if not r.has_error()
                  for b in r.content[RECORD_KEY_CONFIGS].get("masked_params", [])]  # fmt: skip
        assert len(masked) == len(summed) * (1 + len(SHAPES))  # q-weight + one per array
        assert max(int(m.max()) for m in masked) > 2**31  # spread over [0, 2^32)


def test_weights_the_site_checks_and_the_aggregate_check() -> None:
    assert site_weights([10, 20, 40], 1.0, private=False) == [0.25, 0.5, 1.0]
    assert site_weights([10, 20, 40], 0.5, private=True) == [1.0, 1.0, 1.0]
    sent = {"w": torch.zeros(3)}
    with pytest.raises(InputError, match="not finite") as err:
        site_delta({"w": torch.tensor([0.0, float("nan"), 0.0])}, sent, ["w"], 1.0, 8.0)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="secagg-clipping-range"):
        site_delta({"w": torch.tensor([0.0, 3.0, 0.0])}, sent, ["w"], 0.5, 1.0)
    assert site_delta({"w": torch.tensor([0.0, 3.0, 0.0])}, sent, ["w"], 0.3, 1.0)["w"][1] == 3
    assert "not finite" in apply_mean(sent, [np.array([np.inf, 0, 0])], ["w"], 3, 8.0)
    assert "shape" in apply_mean(sent, [np.zeros(4)], ["w"], 3, 8.0)
    gen = torch.Generator().manual_seed(0)
    noised = apply_mean(sent, [np.ones(3)], ["w"], 4, 8.0, Noise(["w"], 1.0, 2.0, gen))
    noise = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(noised["w"], 1 + noise * 2.0 / 4)  # N(0, (zC)^2) on the sum of 4


# ----------------------------------------------------------------------------- a real run

POLICY = '[privacy]\nrequire-secure-aggregation = true\nrequire-dp = "client"\n'


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("secured")
    policy = out / "policy.toml"
    policy.write_text(POLICY)
    rc = run_config(out, dp="client", **SECURE, **{"dp-clipping-norm": 1.0,
                    "dp-noise-multiplier": 0.5, "secagg-clipping-range": 1.0})  # fmt: skip
    configs = nodes(out, sites=4)
    for config in configs[3:]:
        config["policy"] = str(policy)
    seen: dict[str, list] = {"updates": [], "means": [], "inmerge": []}
    mp = pytest.MonkeyPatch()
    real_content, real_mean = client_module._secure_content, strategy_module.secure_mean
    real_inmerge = phases_module.apply_inmerge

    def content(msg, context, state, metrics):
        reply = real_content(msg, context, state, metrics)
        seen["updates"].append((context.node_id, int(msg.content["config"]["server-round"]),
                                msg.content["arrays"].to_torch_state_dict(),
                                reply["fitres.parameters"].to_torch_state_dict()))  # fmt: skip
        return reply

    def mean(grid, server_round, contents, **protocol):
        result = real_mean(grid, server_round, contents, **protocol)
        seen["means"].append(copy.deepcopy(result))
        return result

    def inmerge(state, *args):
        seen["inmerge"].append({k: v.clone() for k, v in state.items()})
        return real_inmerge(state, *args)

    mp.setattr(client_module, "_secure_content", content)
    mp.setattr(strategy_module, "secure_mean", mean)
    mp.setattr(phases_module, "apply_inmerge", inmerge)
    mp.setattr("server.strategy.secrets.randbits", lambda bits: SEED)

    def lost(node: int, msg: Message) -> bool:  # site s4 (node 7), round 2, after the keys
        stage = _stage(msg)
        return node == 7 and msg.metadata.group_id == "2" and stage == "collect_masked_vectors"

    grid = InProcessGrid(client_module.app, configs, rc, fail=lost)
    try:
        history = run_federation(grid, rc)
    finally:
        mp.undo()
    return {"out": out, "grid": grid, "history": history, "rc": rc, **seen}


def test_the_server_never_holds_a_site_update(secured) -> None:
    grid = secured["grid"]
    replies = [m for m in grid.received if not m.has_error()]
    train = [m for m in replies if m.metadata.message_type == "train"]
    assert len(train) == 4 * 4 + 4 + 4 + 3 + 3  # round 1: 4 stages x 4 sites; round 2: one lost
    # after the key exchange (setup and share-keys from 4, the masked vectors and shares from 3)
    for msg in train:
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())
        assert set(msg.content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.metrics",
                                                   "fitres.status"}  # fmt: skip
    # The masked vector a site sent is unrelated to its update (that only the site saw).
    updates = {(node, rnd): delta for node, rnd, _, delta in secured["updates"]}
    stage2 = [m for m in train if "masked_params" in m.content[RECORD_KEY_CONFIGS]]
    for msg in stage2[:4]:
        vectors = [np.load(io.BytesIO(b)) for b in msg.content[RECORD_KEY_CONFIGS]["masked_params"]]
        delta = updates[(msg.metadata.src_node_id, 1)]
        flat = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)
        true = np.concatenate([d.numpy().ravel() for d in delta.values()])
        assert flat.size == true.size and abs(np.corrcoef(flat, true)[0, 1]) < 0.05
    # Every site's audit log: the update before masking, and each stage's reply as it left.
    for site in ("s1", "s2", "s3", "s4"):
        lines = read_jsonl(secured["out"] / "audit" / "federation" / f"{site}.jsonl")
        left = [line for line in lines if line["message_type"].startswith("train (secagg")]
        assert len(left) == (6 if site == "s4" else 8) and all(  # s4: lost in round 2, stage 2
            not any(a["keys"] for a in line["sent"]["arrays"].values()) for line in left
        )


def test_dp_noise_goes_on_the_unmasked_sum_and_inmerge_runs_on_the_aggregate(secured) -> None:
    """Round 1: the mean the server unmasks is the mean of the 4 sites' clipped updates (each
    of norm <= C at the site); the model InMerge gets is what was sent plus that mean plus the
    server's N(0, (zC)^2) noise / n; epsilon is accounted per round as without SecAgg+."""
    history = secured["history"]
    assert [(h["round"], h["sites"], h["rejected"]) for h in history] == [
        (1, 4, []), (2, 3, ["node 7 (s4)"])]  # fmt: skip
    assert [h["dp_epsilon"] for h in history] == [epsilon(0.5, r, 1e-5) for r in (1, 2)]
    assert all(h["inmerge_kernels"] > 0 for h in history)
    info = ModelInfo(ARCH, 3, 1)
    params = parameter_keys(info)
    round_1 = [(sent, d) for _, rnd, sent, d in secured["updates"] if rnd == 1]
    assert len(round_1) == 4
    sent = round_1[0][0]
    keys = list(round_1[0][1])
    assert set(keys) == set(params) & set(sent)  # under DP: the parameters only, no BN buffers
    for _, delta in round_1:
        norm = math.sqrt(sum(float(d.double().square().sum()) for d in delta.values()))
        assert norm <= 1.0 + 1e-6  # clipped at the site
    result = secured["means"][0]
    generator = torch.Generator().manual_seed(SEED)
    aggregate = secured["inmerge"][0]
    for key, got in zip(keys, result.mean, strict=True):
        want = sum(d[key].double() for _, d in round_1) / 4
        assert np.abs(got - want.numpy()).max() <= 1e-5  # quantisation error only
        noise = torch.randn(sent[key].shape, generator=generator, dtype=torch.float64)
        model = sent[key].double() + torch.from_numpy(got) + noise * 0.5 / 4
        assert torch.allclose(aggregate[key].double(), model, atol=1e-6), key
    buffers = [k for k in aggregate if k not in set(params) and aggregate[k].is_floating_point()]
    assert buffers and all(torch.equal(aggregate[k], sent[k]) for k in buffers if k in sent)
    assert secured["means"][1].summed == sorted(secured["means"][1].summed)
    assert len(secured["means"][1].summed) == 3  # round 2: 3 of 4 summed, the round completed


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_train_message(
    secured, tmp_path
) -> None:
    """The run above went through under the sites' policy; a plain training message to the
    same site is refused, naming the rule, before it trains."""
    grid, rc = secured["grid"], secured["rc"]
    sent = next(m for m in grid.sent if _stage(m) == "collect_masked_vectors")
    plain = {k: v for k, v in sent.content.items() if k != RECORD_KEY_CONFIGS}
    (reply,) = grid.send_and_receive([Message(RecordDict(plain), dst_node_id=4,
                                              message_type="train")])  # fmt: skip
    assert reply.has_error() and "rule privacy.require-secure-aggregation" in reply.error.reason
    policy = parse_policy({"privacy": {"require-secure-aggregation": True}}, tmp_path / "p.toml")
    site = {"role": "site", "name": "s1", "data": "synthetic:target"}
    assert check(policy, {}, "train", site, rc, None, secure=True) is None
    for kind, config in (("train", rc), ("train.probe", rc), ("evaluate", {**rc, "secagg": False})):
        refusal = check(policy, {}, kind, site, config, None, secure=False)
        assert refusal is not None and refusal.rule == "privacy.require-secure-aggregation"
    assert check(policy, {}, "evaluate", site, rc, None, secure=False) is None


def test_the_run_records_what_each_stage_brought_back(secured) -> None:
    for record in secured["history"]:
        stages = record["secagg_stages"]
        assert [s["stage"] for s in stages] == ["setup", "share-keys", "collect-masked-vectors",
                                                "unmask"]  # fmt: skip
        assert all(s["array_entries"] == 0 for s in stages)
        assert record["bytes_train_up"] == sum(s["bytes_up"] for s in stages)
    assert [s["errors"] for s in secured["history"][1]["secagg_stages"]] == [0, 0, 1, 0]
    assert Path(secured["out"] / "federation" / "final.pt").exists()
