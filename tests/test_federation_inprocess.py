"""The whole federation against an in-process Grid (no Flower processes): privacy, faults, resume.

These run the real ServerApp logic and the real ClientApp handlers; only transport is faked
(simulations.inprocess.InProcessGrid). The real-process path is in test_federation_network.py;
the federated merge probe's runs are in test_federation_probe.py.

Cost: one completed 2-round run (`completed`, module-scoped) serves the privacy capture, the
bit-identical reference for the resume test and the fp32 byte count for the fp16 test; every
other test adds at most one run of a 1.4M-parameter CNN on 16x16 images.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.roles import Node
from medmerge_core.federation.run import state_digest
from medmerge_core.federation.transport import ModelInfo, model_reference, parameter_keys
from medmerge_core.federation.validation import update_norm
from medmerge_core.io import read_jsonl
from medmerge_core.metrics import SCORE_BINS
from medmerge_core.models import backbone_keys, build_model
from medmerge_core.saved_model import load_saved_model
from medmerge_core.settings import InMergeSettings
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import ARCH, nodes, run_config


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> tuple[Path, InProcessGrid, list[dict[str, Any]]]:
    """One uninterrupted 2-round run: (output dir, its grid with every message, history)."""
    out = tmp_path_factory.mktemp("completed")
    rc = run_config(out)
    grid = InProcessGrid(client_app, nodes(out), rc)
    return out, grid, run_federation(grid, rc)


def test_full_run_messages_carry_only_weights_configs_and_metrics(completed) -> None:
    out, grid, history = completed
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["sites"] == 3 and h["inmerge_kernels"] > 0 for h in history)
    model = build_model(ARCH, 3, 1)
    full = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = set(backbone_keys(model))
    assert grid.sent and len(grid.received) == len(grid.sent)
    for msg in grid.sent + grid.received:
        if msg.has_error():
            raise AssertionError(msg.error.reason)
        content = msg.content
        for name, record in content.array_records.items():
            for key, array in record.items():
                # Every array is a model tensor: a known key with the model's shape (a source
                # backbone may have a 1- or 3-channel stem). Nothing else can hide images.
                assert key in full, f"{name}: unexpected array '{key}'"
                if name == "coefficients":  # the learned merge: one value per kernel and source
                    assert tuple(array.shape) == (2, full[key][0]) + (1,) * (len(full[key]) - 1)
                    continue
                if name.startswith("source-") or (key in backbone and array.shape != full[key]):
                    assert key in backbone
                    continue
                assert tuple(array.shape) == full[key], f"{name}/{key}: {array.shape}"
        for record in content.config_records.values():
            for value in record.values():
                assert not isinstance(value, bytes) and not (
                    isinstance(value, list) and len(value) > 64
                ), "a config carries a long list or raw bytes"
        for name, record in content.metric_records.items():
            if name == "pooled":  # counts over a site's whole test set, sized by the classes
                sizes = {k: len(v) for k, v in record.items()}
                assert sizes == {"confusion": 9, "positive": 3 * SCORE_BINS,
                                 "negative": 3 * SCORE_BINS}  # fmt: skip
                assert all(isinstance(c, int) and c >= 0 for v in record.values() for c in v)
                continue
            assert all(isinstance(v, int | float) for v in record.values())
    # Each node's own audit log lists every message it handled, and only model arrays.
    logs = {p.stem: read_jsonl(p) for p in (out / "audit" / "federation").glob("*.jsonl")}
    assert set(logs) == {"hospital-a", "hospital-b", "coordinator", "s1", "s2", "s3"}
    assert sum(len(lines) for lines in logs.values()) == len(grid.received)
    assert [line["message_type"] for line in logs["s1"]] == ["query.info"] + [
        "train",
        "evaluate",
    ] * 2 + ["evaluate"]  # fmt: skip  (the last one: final.pt)
    for line in (line for lines in logs.values() for line in lines):
        for side in ("received", "sent"):
            for arrays in line[side]["arrays"].values():
                assert set(arrays["keys"]) <= set(full), "an audited array is not a model tensor"
    run_dir = out / "federation"
    for name in (
        "final.pt",
        "checkpoint.pt",
        "merged.pt",
        "metrics.jsonl",
        "coefficients.npz",
        "coefficient_summary.json",
        "coefficients.png",
    ):
        assert (run_dir / name).exists(), name


def _corrupting(faults: dict[int, str]):
    """A ClientApp wrapper that corrupts some nodes' training replies."""

    def app(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        how = faults.get(context.node_id)
        if how is None or msg.metadata.message_type != "train":
            return reply
        state = reply.content["arrays"].to_torch_state_dict()
        key = next(k for k, v in state.items() if v.ndim == 4)
        if how == "nan":
            state[key][0, 0, 0, 0] = float("nan")
        elif how == "huge":
            state = {k: v * 1e4 for k, v in state.items()}
        else:
            state.pop(key)
        reply.content["arrays"] = ArrayRecord(state)
        return reply

    return app


def test_bad_replies_and_a_site_failing_mid_round_are_rejected_and_the_run_goes_on(
    tmp_path, caplog
) -> None:
    rc = run_config(tmp_path)
    faults = {4: "nan", 5: "huge", 6: "missing"}  # sites s1..s3 send bad weights
    crash = lambda node, msg: node == 7 and msg.metadata.message_type == "train"  # noqa: E731
    grid = InProcessGrid(
        _corrupting(faults), nodes(tmp_path, sites=6), rc, fail=crash
    )  # s4 crashes
    history = run_federation(grid, rc)
    bad = ["node 4 (s1)", "node 5 (s2)", "node 6 (s3)", "node 7 (s4)"]
    assert [(h["round"], h["sites"], h["rejected"]) for h in history] == [(1, 2, bad), (2, 2, bad)]
    assert "rejected reply from node 4 (s1): 'conv1.0.weight' contains NaN" in caplog.text
    assert "rejected reply from node 5 (s2): update norm" in caplog.text
    assert "rejected reply from node 6 (s3): 1 keys missing" in caplog.text
    assert "rejected reply from node 7 (s4): error reply: RuntimeError: node 7 crashed" in (
        caplog.text
    )
    assert (tmp_path / "federation" / "final.pt").exists()


def test_too_few_sites_skips_the_round_and_the_run_goes_on(tmp_path) -> None:
    rc = run_config(tmp_path, **{"min-sites": 3})
    crash = lambda node, msg: node == 5 and msg.metadata.message_type == "train"  # noqa: E731
    history = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc, fail=crash), rc)
    assert [h["skipped"] for h in history] == ["2 usable site replies, min-sites is 3"] * 2
    run = tmp_path / "federation"
    merged, final = (torch.load(run / f, weights_only=True)["state_dict"]
                     for f in ("merged.pt", "final.pt"))  # fmt: skip
    assert state_digest(merged) == state_digest(final)  # no round changed the model


class ServerKilled(BaseException):
    """Escapes every `except Exception`, like the ServerApp process being killed."""


def kill_server_in_round_2(node: int, msg: Message) -> bool:
    if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 2:
        raise ServerKilled
    return False


def test_restarted_server_resumes_without_losing_a_round(tmp_path, completed) -> None:
    rc = run_config(tmp_path, rounds=2)  # the completed run's config but for output-dir
    with contextlib.suppress(ServerKilled):
        run_federation(
            InProcessGrid(client_app, nodes(tmp_path), rc, fail=kill_server_in_round_2), rc
        )
    done = torch.load(tmp_path / "federation/checkpoint.pt", weights_only=True)
    assert done["round"] == 1
    assert not (tmp_path / "federation/final.pt").exists()
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    history = run_federation(grid, rc)
    assert [h["round"] for h in history] == [1, 2]
    types = [m.metadata.message_type for m in grid.sent]
    assert "train.merge" not in types and "query.backbone" not in types  # phases reused
    rounds = {
        int(m.content["config"]["server-round"])
        for m in grid.sent
        if m.metadata.message_type == "train"
    }
    assert rounds == {2}
    # Same result as the run that was never interrupted (the InMerge generator is restored too).
    final = [
        torch.load(d / "federation/final.pt", weights_only=True)["state_dict"]
        for d in (tmp_path, completed[0])
    ]
    assert state_digest(final[0]) == state_digest(final[1])


def test_fedbn_keeps_norm_layers_at_the_sites_and_fp16_halves_the_bytes(
    tmp_path, completed
) -> None:
    rc = run_config(tmp_path, rounds=1, fedbn=True, fp16=True, **{"run-name": "bn"})
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    (record,) = run_federation(grid, rc)
    _, _, norm = model_reference(ModelInfo(ARCH, 3, 1))
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    for reply in replies:
        sent = reply.content["arrays"]
        assert not set(norm) & set(sent.keys())
        assert {a.dtype for a in sent.values()} == {"float16"}
    for site in ("s1", "s2", "s3"):  # each site keeps its own norm layers on its own disk
        saved = torch.load(tmp_path / f"site-state/bn/{site}/fedbn-round1.pt", weights_only=True)
        assert set(saved) == set(norm)
    full = completed[2][0]  # round 1 of the same run with fp32 weights and no FedBN
    assert record["bytes_train_up"] < 0.55 * full["bytes_train_up"]


def test_fedbn_site_layers_survive_a_server_restart(tmp_path) -> None:
    """A restarted ServerApp is a new Flower run with fresh node Contexts: each site reloads its
    own norm layers from disk, so the resumed run equals one that was never interrupted."""

    def run(out: Path, fail=None) -> list[dict]:  # a fresh grid: fresh Contexts, as a new run
        rc = run_config(out, fedbn=True)
        grid = InProcessGrid(client_app, nodes(out), rc, fail=fail)
        return run_federation(grid, rc)

    def comparable(history: list[dict]) -> list[str]:  # JSON: NaN == NaN; timings left out
        return [
            json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
            for r in history
        ]

    reference = comparable(run(tmp_path / "whole"))
    with contextlib.suppress(ServerKilled):
        run(tmp_path / "parts", fail=kill_server_in_round_2)
    shutil.copytree(tmp_path / "parts", tmp_path / "lost")
    shutil.rmtree(tmp_path / "lost/site-state")  # as if the sites had lost their disks
    assert comparable(run(tmp_path / "parts")) == reference
    assert comparable(run(tmp_path / "lost")) != reference  # the files carried the layers
    finals = [
        torch.load(tmp_path / d / "federation/final.pt", weights_only=True)["state_dict"]
        for d in ("whole", "parts")
    ]
    assert state_digest(finals[0]) == state_digest(finals[1])


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_runs_with_inmerge_on_top(tmp_path, aggregation) -> None:
    rc = run_config(tmp_path, rounds=1, aggregation=aggregation, **{"trim-fraction": 0.34})
    (record,) = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    assert record["sites"] == 3 and record["inmerge_kernels"] > 0
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_site_side_inmerge_runs_the_training_option_at_every_local_step(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, inmerge=False, **{"inmerge-local": True,
                                                           "inmerge-local-p": 0.5})  # fmt: skip
    site = Node.from_configs(nodes(tmp_path)[3], rc)
    assert site.inmerge == InMergeSettings(p=0.5)  # the same settings as the training option
    (record,) = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    assert record["sites"] == 3 and "inmerge_kernels" not in record  # none on the aggregate


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_dp_noises_parameters_only_reports_epsilon_and_survives_a_failed_site(
    tmp_path, monkeypatch
) -> None:
    """DP on at a noise level that ruined BN under Flower's wrappers (noise 1, clip 1): buffers
    are never noised, the final model is finite, epsilon is reported after every round, and a
    crashed site is rejected as without DP while the round goes on. The noise seed comes from
    the CSPRNG; here it is pinned so that the resumed run can be compared with the whole one
    (a resume that drew new noise would repeat round 1's noise in round 2)."""
    monkeypatch.setattr("server.strategy.secrets.randbits", lambda bits: 20261202)
    rc = run_config(tmp_path, dp="server", **{"dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0})
    crash = lambda node, msg: node == 6 and msg.metadata.message_type == "train"  # noqa: E731
    history = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc, fail=crash), rc)
    assert [(h["sites"], h["rejected"]) for h in history] == [(2, ["node 6 (s3)"])] * 2
    assert [h["dp_epsilon"] for h in history] == [epsilon(1.0, r, 1e-5) for r in (1, 2)]
    run = tmp_path / "federation"
    merged, final = _state(run / "merged.pt"), _state(run / "final.pt")
    params = set(parameter_keys(ModelInfo(ARCH, 3, 1)))
    buffers = [k for k in final if k not in params]
    assert any(k.endswith("running_var") for k in buffers)
    for key in buffers:  # the merged model's statistics, untouched by noise and by averaging
        assert torch.equal(final[key], merged[key]), key
    noised = [k for k in params if not torch.equal(final[k], merged[k])]
    assert len(noised) == len(params)  # every parameter got noise
    model = build_model(ARCH, 3, 1)
    model.load_state_dict(final)
    assert torch.isfinite(model.eval()(torch.randn(4, 1, 16, 16))).all()

    # A ServerApp killed in round 2 and restarted: the same noise, the same epsilon.
    cut = run_config(tmp_path / "cut", **{k: rc[k] for k in rc if k.startswith("dp")})
    with contextlib.suppress(ServerKilled):
        run_federation(InProcessGrid(client_app, nodes(tmp_path / "cut"), cut, fail=lambda n, m:
                                     crash(n, m) or kill_server_in_round_2(n, m)), cut)  # fmt: skip
    resumed = run_federation(InProcessGrid(client_app, nodes(tmp_path / "cut"), cut, fail=crash),
                             cut)  # fmt: skip
    assert [h["dp_epsilon"] for h in resumed] == [h["dp_epsilon"] for h in history]
    assert state_digest(_state(tmp_path / "cut/federation/final.pt")) == state_digest(final)


def test_dp_client_clips_each_update_at_the_site(tmp_path) -> None:
    clip = 0.05
    rc = run_config(tmp_path, rounds=1, dp="client", fedbn=True,
                    **{"dp-clipping-norm": clip})  # fmt: skip
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 3 and record["dp_epsilon"] == float("inf")  # no noise: no DP
    params = set(parameter_keys(ModelInfo(ARCH, 3, 1)))
    sent = next(m for m in grid.sent if m.metadata.message_type == "train")
    base = sent.content["arrays"].to_torch_state_dict()
    for reply in (m for m in grid.received if m.metadata.message_type == "train"):
        state = reply.content["arrays"].to_torch_state_dict()
        assert update_norm(state, base, [k for k in state if k in params]) <= clip * (1 + 1e-6)


def test_final_model_is_evaluated_pooled_and_fedbn_sites_keep_their_own(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, fedbn=True)
    history = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    final = [r for r in read_jsonl(tmp_path / "federation/metrics.jsonl") if r["phase"] == "final"]
    assert len(final) == 1 and {"accuracy", "macro_f1", "auroc"} <= set(final[0])
    assert final[0]["accuracy"] == pytest.approx(history[-1]["eval_accuracy"])
    _, _, norm = model_reference(ModelInfo(ARCH, 3, 1))
    shared = _state(tmp_path / "federation/final.pt")
    for site in ("s1", "s2", "s3"):  # final.pt's shared layers, this site's own norm layers
        own = _state(tmp_path / f"site-state/federation/{site}/final.pt")
        layers = torch.load(tmp_path / f"site-state/federation/{site}/fedbn-round1.pt",
                            weights_only=True)  # fmt: skip
        assert all(torch.equal(own[k], layers[k]) for k in norm)
        assert all(torch.equal(own[k], shared[k]) for k in shared if k not in norm)
    for path in (tmp_path / "federation/final.pt", tmp_path / "site-state/federation/s1/final.pt"):
        saved = load_saved_model(path)  # what `medmerge evaluate` / `export` read
        assert (saved.arch, saved.image_size, saved.in_channels) == (ARCH, 16, 1)


def test_simulation_roles_from_partition_ids(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, **{"pretrain-epochs": 1})
    sim_nodes = [{"partition-id": i, "num-partitions": 6} for i in range(6)]
    grid = InProcessGrid(client_app, sim_nodes, rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 3
    assert (tmp_path / "federation" / "institution-0.pt").exists()
    assert isinstance(grid.contexts[1].state, RecordDict)
