"""The federated merge probe against an in-process Grid: with `probe-mode = "federated"` the
sites, not the coordinator, learn the merge coefficients on their own data. As in
test_federation_inprocess.py, the real ServerApp logic and ClientApp handlers run and only
transport is faked: one site and one round equal the coordinator's merge bit for bit, the
sources go down once and only what the probe learns travels, a server killed mid-probe resumes
after its last probe round, a site lost in a probe round gets the sources again, DP accounts the
probe and fine-tuning releases together, and FedBN keeps the probe's norm layers at the sites.
One 2-round probe run (`probed`, module-scoped) serves the traffic check and the resume test.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from client.client_app import app as client_app
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.roles import Node
from medmerge_core.federation.run import state_digest
from medmerge_core.federation.transport import ModelInfo, model_reference
from medmerge_core.io import read_jsonl
from medmerge_core.merge import COEFFICIENT_PREFIX
from medmerge_core.models import backbone_keys, build_model, mergeable_keys
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import ARCH, nodes, run_config
from tests.test_federation_inprocess import ServerKilled, _state


def probe_config(tmp_path, **overrides) -> dict:
    return run_config(tmp_path, **{"probe-mode": "federated", "probe-rounds": 2, "rounds": 1,
                                   **overrides})  # fmt: skip


def _types(grid: InProcessGrid, kind: str) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == kind]


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, InProcessGrid, list[dict[str, Any]]]:
    """One uninterrupted run with a 2-round federated probe over 3 sites, then 1 round."""
    out = tmp_path_factory.mktemp("probed")
    rc = probe_config(out)
    grid = InProcessGrid(client_app, nodes(out), rc)
    return out, grid, run_federation(grid, rc)


def test_federated_probe_with_one_site_and_one_round_equals_the_coordinators(tmp_path) -> None:
    disk = {"state-dir": str(tmp_path / "site-state"), "audit-dir": str(tmp_path / "audit")}
    one = [  # the coordinator and the single site hold the same data
        *nodes(tmp_path)[:2],
        {"role": "coordinator", "data": "synthetic:target", **disk},
        {"role": "site", "data": "synthetic:target", "name": "s1", **disk},
    ]
    merged = {}
    for mode in ("coordinator", "federated"):
        same_threads = {"node-threads": torch.get_num_threads()}  # as the site's, bit for bit
        rc = probe_config(tmp_path / mode, rounds=0, **{"probe-mode": mode, "probe-rounds": 1,
                                                       "min-sites": 1, **same_threads})  # fmt: skip
        grid = InProcessGrid(client_app, one, rc)
        run_federation(grid, rc)
        assert len(_types(grid, "train.merge" if mode == "coordinator" else "train.probe")) == 1
        merged[mode] = _state(tmp_path / mode / "federation/merged.pt")
    coordinator, federated = merged.values()
    floats = [k for k, v in coordinator.items() if v.is_floating_point()]
    assert all(torch.equal(coordinator[k], federated[k]) for k in floats)
    coefficients = [np.load(tmp_path / m / "federation/coefficients.npz") for m in merged]
    assert all(np.array_equal(coefficients[0][k], coefficients[1][k]) for k in coefficients[0])


def test_federated_probe_sends_sources_once_and_only_what_the_probe_learns(probed) -> None:
    out, grid, _ = probed
    model = build_model(ARCH, 3, 1)
    full = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = set(backbone_keys(model))
    merged_keys = {w for w, _ in mergeable_keys(model)}
    probes = _types(grid, "train.probe")
    assert len(probes) == 2 * 3 and not _types(grid, "train.merge")
    with_sources = [m.metadata.dst_node_id for m in probes if "source-0" in m.content]
    assert sorted(with_sources) == [4, 5, 6]  # once per site, in round 1
    assert all(m.content["config"]["server-round"] == 1 for m in probes if "source-0" in m.content)
    replies = [m for m in grid.received if m.metadata.reply_to_message_id in
               {p.metadata.message_id for p in probes}]  # fmt: skip
    for msg in probes + replies:
        assert not msg.has_error(), msg.error.reason
        for name, record in msg.content.array_records.items():
            for key, array in record.items():
                if name.startswith("source-"):
                    assert key in backbone
                elif key.startswith(COEFFICIENT_PREFIX):  # one value per kernel (d - 1 free)
                    weight = key.removeprefix(COEFFICIENT_PREFIX)
                    assert weight in merged_keys
                    assert tuple(array.shape) == (1, full[weight][0]) + (1,) * (
                        len(full[weight]) - 1
                    )
                else:  # norm layers and head, never a merged conv
                    assert key in full and key not in merged_keys
                    assert tuple(array.shape) == full[key]
        assert set(msg.content.metric_records) <= {"metrics"}
    records = read_jsonl(out / "federation/metrics.jsonl")
    rounds = [r for r in records if r["phase"] == "probe-round"]
    assert [(r["round"], r["sites"]) for r in rounds] == [(1, 3), (2, 3)]
    assert rounds[0]["bytes_sources_down"] > 0 and "bytes_sources_down" not in rounds[1]
    assert rounds[1]["mbytes"] < rounds[0]["mbytes"] / 5
    (merge,) = [r for r in records if r["phase"] == "merge"]
    assert merge["mode"] == "federated" and merge["probe_mbytes"] < merge["model_mbytes"] / 5
    for name in ("probe-checkpoint.pt", "merged.pt", "coefficients.npz", "final.pt"):
        assert (out / "federation" / name).exists(), name
    logs = {p.stem: read_jsonl(p) for p in (out / "audit" / "federation").glob("*.jsonl")}
    assert [line["message_type"] for line in logs["s1"]][:4] == [
        "query.info", "query.target", "train.probe", "train.probe"]  # fmt: skip
    assert [line["message_type"] for line in logs["coordinator"]] == ["query.info"]


def kill_server_in_probe_round_2(node: int, msg: Message) -> bool:
    if msg.metadata.message_type == "train.probe" and msg.content["config"]["server-round"] == 2:
        raise ServerKilled
    return False


def test_a_server_killed_mid_probe_resumes_after_its_last_probe_round(tmp_path, probed) -> None:
    rc = probe_config(tmp_path)
    with contextlib.suppress(ServerKilled):
        grid = InProcessGrid(client_app, nodes(tmp_path), rc, fail=kill_server_in_probe_round_2)
        run_federation(grid, rc)
    saved = torch.load(tmp_path / "federation/probe-checkpoint.pt", weights_only=True)
    assert saved["round"] == 1 and not (tmp_path / "federation/merged.pt").exists()
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)  # a new run: fresh node Contexts
    run_federation(grid, rc)
    probes = _types(grid, "train.probe")
    assert {m.content["config"]["server-round"] for m in probes} == {2}
    assert sum("source-0" in m.content for m in probes) == 3  # the new run sends them again
    assert state_digest(_state(tmp_path / "federation/final.pt")) == state_digest(
        _state(probed[0] / "federation/final.pt")
    )


def test_a_site_lost_in_a_probe_round_is_rejected_and_gets_the_sources_again(tmp_path) -> None:
    rc = probe_config(tmp_path)
    crash = lambda node, msg: (  # noqa: E731
        node == 5
        and msg.metadata.message_type == "train.probe"
        and msg.content["config"]["server-round"] == 1
    )
    grid = InProcessGrid(client_app, nodes(tmp_path), rc, fail=crash)
    run_federation(grid, rc)
    rounds = [r for r in read_jsonl(tmp_path / "federation/metrics.jsonl")
              if r["phase"] == "probe-round"]  # fmt: skip
    assert [(r["sites"], r["rejected"]) for r in rounds] == [(2, ["node 5 (s2)"]), (3, [])]
    sources = [
        m.metadata.dst_node_id for m in _types(grid, "train.probe") if "source-0" in m.content
    ]
    assert sorted(sources) == [4, 5, 5, 6]


def test_dp_accounts_the_probe_and_fine_tuning_releases_together(tmp_path) -> None:
    rc = probe_config(tmp_path, dp="server", **{"dp-noise-multiplier": 1.0})
    history = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    records = read_jsonl(tmp_path / "federation/metrics.jsonl")
    probe = [r["dp_epsilon"] for r in records if r["phase"] == "probe-round"]
    assert probe == [epsilon(1.0, r, 1e-5) for r in (1, 2)]
    assert history[0]["dp_epsilon"] == epsilon(1.0, 3, 1e-5)  # two probe rounds, then one


def test_fedbn_keeps_the_probe_norm_layers_at_the_sites(tmp_path) -> None:
    rc = probe_config(tmp_path, fedbn=True, **{"probe-rounds": 1})
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    run_federation(grid, rc)
    _, _, norm = model_reference(ModelInfo(ARCH, 3, 1))
    for msg in _types(grid, "train.probe"):
        assert not set(norm) & set(msg.content["arrays"].keys())
        assert set(msg.content["local-init"].keys()) == set(norm)
    site = Node.from_configs(nodes(tmp_path)[3], rc)
    probe_norms = site.local_norm(1, None, phase="probe")
    assert probe_norms is not None and set(probe_norms) == set(norm)
    assert site.local_norm(0, None) is not None  # fine-tuning round 1 starts from them
    assert all(torch.equal(site.local_norm(0, None)[k], probe_norms[k]) for k in norm)
