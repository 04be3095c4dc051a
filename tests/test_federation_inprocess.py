"""The whole federation against an in-process Grid (no Flower processes): privacy, faults, resume.

These run the real ServerApp logic and the real ClientApp handlers; only transport is faked
(server.inprocess.InProcessGrid). The real-process path is in test_federation_network.py.
"""

from __future__ import annotations

import contextlib

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from medmerge_core.federation import ModelInfo, model_reference, state_digest
from medmerge_core.models import backbone_keys, build_model
from server.inprocess import InProcessGrid
from server.server_app import run_federation

ARCH = "shufflenet_v2_x0_5"  # 1.4M parameters: the smallest torchvision CNN with a Linear head


def run_config(tmp_path, **overrides) -> dict:
    base = {
        "output-dir": str(tmp_path), "arch": ARCH, "image-size": 16, "synthetic-n-train": 32,
        "synthetic-n-val": 16, "synthetic-n-test": 16, "rounds": 2, "merge-epochs": 1,
        "min-sites": 2, "inmerge-tau": -1.0, "batch-size": 16,
    }  # fmt: skip
    return {**base, **overrides}


def nodes(sites: int = 3) -> list[dict]:
    shards = sites + 1
    return [
        {"role": "institution", "checkpoint": "random:1", "name": "hospital-a"},
        {"role": "institution", "checkpoint": "random:2", "name": "hospital-b"},
        {"role": "coordinator", "data": "synthetic:target", "shard": f"0/{shards}"},
        *[
            {"role": "site", "data": "synthetic:target", "shard": f"{i}/{shards}", "name": f"s{i}"}
            for i in range(1, shards)
        ],
    ]


def test_full_run_messages_carry_only_weights_configs_and_metrics(tmp_path) -> None:
    rc = run_config(tmp_path)
    grid = InProcessGrid(client_app, nodes(), rc)
    history = run_federation(grid, rc)
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["sites"] == 3 and h["inmerge_kernels"] > 0 for h in history)
    model = build_model(ARCH, 3, 1)
    full = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = set(backbone_keys(model))
    for msg in grid.sent + grid.received:
        if msg.has_error():
            raise AssertionError(msg.error.reason)
        content = msg.content
        for name, record in content.array_records.items():
            for key, array in record.items():
                # Every array is a model tensor: a known key with the model's shape (a source
                # backbone may have a 1- or 3-channel stem). Nothing else can hide images.
                assert key in full, f"{name}: unexpected array '{key}'"
                if name.startswith("source-") or (key in backbone and array.shape != full[key]):
                    assert key in backbone
                    continue
                assert tuple(array.shape) == full[key], f"{name}/{key}: {array.shape}"
        for record in content.config_records.values():
            for value in record.values():
                assert not isinstance(value, bytes) and not (
                    isinstance(value, list) and len(value) > 64
                ), "a config carries a long list or raw bytes"
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
    run_dir = tmp_path / "federation"
    for name in ("final.pt", "checkpoint.pt", "merged.pt", "metrics.jsonl"):
        assert (run_dir / name).exists()


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


def test_bad_replies_are_rejected_and_the_round_goes_on(tmp_path, caplog) -> None:
    rc = run_config(tmp_path, rounds=1)
    faults = {4: "nan", 5: "huge", 6: "missing"}  # sites s1..s3 misbehave, s4 and s5 are fine
    grid = InProcessGrid(_corrupting(faults), nodes(sites=5), rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 2
    assert record["rejected"] == ["node 4 (s1)", "node 5 (s2)", "node 6 (s3)"]
    assert "rejected reply from node 4 (s1): 'conv1.0.weight' contains NaN" in caplog.text
    assert "rejected reply from node 5 (s2): update norm" in caplog.text
    assert "rejected reply from node 6 (s3): 1 keys missing" in caplog.text


def test_a_site_failing_mid_round_does_not_stop_the_run(tmp_path) -> None:
    rc = run_config(tmp_path)
    crash = lambda node, msg: node == 5 and msg.metadata.message_type == "train"  # noqa: E731
    history = run_federation(InProcessGrid(client_app, nodes(), rc, fail=crash), rc)
    assert [h["sites"] for h in history] == [2, 2]
    assert all("node 5" in h["rejected"][0] for h in history)


def test_too_few_sites_fails_the_round_but_keeps_the_checkpoint(tmp_path) -> None:
    rc = run_config(tmp_path, **{"min-sites": 3})
    crash = lambda node, msg: node == 5 and msg.metadata.message_type == "train"  # noqa: E731
    try:
        run_federation(InProcessGrid(client_app, nodes(), rc, fail=crash), rc)
    except RuntimeError as exc:
        assert "min-sites is 3" in str(exc)
    else:
        raise AssertionError("expected the round to fail")
    assert (tmp_path / "federation" / "merged.pt").exists()


class ServerKilled(BaseException):
    """Escapes every `except Exception`, like the ServerApp process being killed."""


def test_restarted_server_resumes_without_losing_a_round(tmp_path) -> None:
    rc = run_config(tmp_path / "interrupted", rounds=2)

    def kill_in_round_2(node: int, msg: Message) -> bool:
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 2:
            raise ServerKilled
        return False

    with contextlib.suppress(ServerKilled):
        run_federation(InProcessGrid(client_app, nodes(), rc, fail=kill_in_round_2), rc)
    done = torch.load(tmp_path / "interrupted/federation/checkpoint.pt", weights_only=True)
    assert done["round"] == 1
    grid = InProcessGrid(client_app, nodes(), rc)
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
    # Same result as a run that was never interrupted (the InMerge generator is restored too).
    clean_rc = run_config(tmp_path / "clean", rounds=2)
    run_federation(InProcessGrid(client_app, nodes(), clean_rc), clean_rc)
    final = [
        torch.load(tmp_path / d / "federation/final.pt", weights_only=True)["state_dict"]
        for d in ("interrupted", "clean")
    ]
    assert state_digest(final[0]) == state_digest(final[1])


def test_fedbn_keeps_norm_layers_at_the_sites_and_fp16_halves_the_bytes(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, fedbn=True, fp16=True, **{"run-name": "bn"})
    grid = InProcessGrid(client_app, nodes(), rc)
    (record,) = run_federation(grid, rc)
    _, _, norm = model_reference(ModelInfo(ARCH, 3, 1))
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    for reply in replies:
        sent = reply.content["arrays"]
        assert not set(norm) & set(sent.keys())
        assert {a.dtype for a in sent.values()} == {"float16"}
    assert all("fedbn" in c.state for c in list(grid.contexts.values())[3:])
    plain = run_config(tmp_path, rounds=1, **{"run-name": "plain"})
    (full,) = run_federation(InProcessGrid(client_app, nodes(), plain), plain)
    assert record["bytes_train_up"] < 0.55 * full["bytes_train_up"]


def test_dp_server_side_clipping_runs(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, dp="server", **{"dp-clipping-norm": 0.01})
    (record,) = run_federation(InProcessGrid(client_app, nodes(), rc), rc)
    assert record["sites"] == 3


def test_simulation_roles_from_partition_ids(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, **{"pretrain-epochs": 1})
    sim_nodes = [{"partition-id": i, "num-partitions": 6} for i in range(6)]
    grid = InProcessGrid(client_app, sim_nodes, rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 3
    assert (tmp_path / "federation" / "institution-0.pt").exists()
    assert isinstance(grid.contexts[1].state, RecordDict)
