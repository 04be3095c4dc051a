"""Unit tests of the Flower-free federation logic (medmerge_core.federation): fast, no runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medmerge_core.coerce import flat_keys
from medmerge_core.errors import InputError
from medmerge_core.federation.config import RENAMED_KEYS, FederationConfig, node_settings
from medmerge_core.federation.data import MIN_SHARD, dirichlet_shards, shard_task
from medmerge_core.federation.roles import Node, solo_threads
from medmerge_core.federation.run import FederationRun
from medmerge_core.federation.site_state import FedBNStore, site_state_dir
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    model_reference,
    restore_dtypes,
    transport_keys,
)
from medmerge_core.federation.validation import screen_replies
from medmerge_core.settings import InMergeSettings, ProbeSettings, StageSettings


def test_run_config_is_typed_and_typos_are_errors() -> None:
    cfg = FederationConfig.from_run_config({"rounds": 5, "ft-lr": 1, "sim-roles": "site, site"})
    assert cfg.rounds == 5 and cfg.ft.lr == 1.0 and cfg.sim_roles == ("site", "site")
    assert cfg.ft.epochs == 1 and cfg.pretrain == StageSettings(epochs=2, lr=1e-3)  # defaults kept
    with pytest.raises(InputError, match="unknown key 'round'"):
        FederationConfig.from_run_config({"round": 5})
    with pytest.raises(InputError, match="fedbn"):
        FederationConfig.from_run_config({"fedbn": "yes"})
    with pytest.raises(InputError, match=r"^run config inmerge-p: must be in \[0, 1\]"):
        FederationConfig.from_run_config({"inmerge-p": 2.0})
    with pytest.raises(InputError, match=r"run config local-epochs: renamed ft-epochs"):
        FederationConfig.from_run_config({"local-epochs": 2})
    with pytest.raises(InputError, match=r"weight-decay: now per phase: .*probe-weight-decay"):
        FederationConfig.from_run_config({"weight-decay": 0.01})
    switched = FederationConfig.from_run_config({"inmerge": False, "inmerge-tau": 0.1})
    assert switched.inmerge is None
    assert FederationConfig.from_run_config({"inmerge-tau": 0.1}).inmerge == InMergeSettings(
        tau=0.1
    )


PROBE_KEYS = ("steps", "epochs", "coef-lr", "granularity", "constraint", "freeze-bn", "lr",
              "weight-decay", "mode", "rounds")  # fmt: skip


@pytest.mark.parametrize("name", PROBE_KEYS)
def test_the_probes_old_merge_keys_point_to_their_probe_names(name: str) -> None:
    """The probe's settings were `merge-*`; an old key is a one-line pointer, not a typo."""
    old, new = f"merge-{name}", f"probe-{name}"
    assert new in flat_keys(FederationConfig) and RENAMED_KEYS[old] == f"renamed {new}"
    with pytest.raises(InputError, match=rf"^run config {old}: renamed {new}$") as caught:
        FederationConfig.from_run_config({old: 0.001})
    assert "\n" not in str(caught.value)


def test_roles_from_node_config_and_from_partition_id(tmp_path) -> None:
    cfg = FederationConfig(output_dir=str(tmp_path))
    site = node_settings({"role": "site", "data": "synthetic:target", "shard": "1/3"}, cfg)
    assert (site.role, site.shard) == ("site", (1, 3))
    sims = [node_settings({"partition-id": i, "num-partitions": 6}, cfg) for i in range(6)]
    assert [s.role for s in sims] == list(cfg.sim_roles)
    assert sims[1].data == "synthetic:related_b" and sims[1].checkpoint.endswith("institution-1.pt")
    assert [s.shard for s in sims[2:]] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    with pytest.raises(InputError, match="num-supernodes=6"):
        node_settings({"partition-id": 0, "num-partitions": 4}, cfg)
    with pytest.raises(InputError, match="role"):
        node_settings({"role": "hacker"}, cfg)


def test_shards_are_disjoint_and_cover_every_split(tiny_task) -> None:
    parts = [shard_task(tiny_task, i, 3, seed=0) for i in range(3)]
    images = np.concatenate([p.train.images for p in parts])
    assert len(images) == len(tiny_task.train)
    distinct = {img.tobytes() for img in tiny_task.train.images}
    assert {img.tobytes() for img in images} == distinct
    assert all(set(p.train.labels) == {0, 1} for p in parts)  # stratified


def test_screening_names_each_bad_reply() -> None:
    base = {"w": torch.zeros(4, 3), "n": torch.zeros((), dtype=torch.int64)}
    good = [{"w": torch.full((4, 3), 0.1 * (i + 1)), "n": base["n"]} for i in range(3)]
    replies = {f"node{i}": s for i, s in enumerate(good)}
    replies["nan"] = {"w": torch.full((4, 3), float("nan")), "n": base["n"]}
    replies["shape"] = {"w": torch.zeros(3, 4), "n": base["n"]}
    replies["dtype"] = {"w": torch.zeros(4, 3, dtype=torch.float64), "n": base["n"]}
    replies["keys"] = {"w": torch.zeros(4, 3)}
    replies["huge"] = {"w": torch.full((4, 3), 100.0), "n": base["n"]}
    accepted, rejected = screen_replies(replies, base, outlier_factor=10)
    assert accepted == ["node0", "node1", "node2"]
    assert "NaN" in rejected["nan"] and "shape" in rejected["shape"]
    assert "dtype" in rejected["dtype"] and "missing" in rejected["keys"]
    assert "median" in rejected["huge"]
    fp16 = {"w": torch.zeros(4, 3, dtype=torch.float16), "n": base["n"]}
    assert screen_replies({"a": fp16}, base, 10, allow_fp16=True)[0] == ["a"]


def test_screening_rejects_an_update_pointing_away_from_the_others() -> None:
    base = {"w": torch.zeros(6)}
    direction = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0, 1.5])
    replies = {f"site{i}": {"w": direction * (1 + 0.1 * i)} for i in range(3)}
    replies["flipped"] = {"w": -direction}  # same size, opposite direction
    replies["noisy"] = {"w": direction + torch.tensor([0.3, -0.2, 0.1, 0.0, 0.2, -0.1])}
    accepted, rejected = screen_replies(replies, base, outlier_factor=10, min_cosine=0.0)
    assert accepted == ["site0", "site1", "site2", "noisy"]
    assert rejected["flipped"].startswith("update direction: cosine -1.00 to the median")
    assert screen_replies(replies, base, outlier_factor=10)[0] == list(replies)  # norm only


def test_dtypes_come_from_the_model_not_the_aggregate() -> None:
    meta, conv, norm = model_reference(ModelInfo("resnet18", 3, 1))
    assert conv[0] == "conv1.weight" and "bn1.running_mean" in norm
    keys = transport_keys(meta, norm, fedbn=False)
    assert "bn1.num_batches_tracked" not in keys and "bn1.weight" in keys
    assert not set(transport_keys(meta, norm, fedbn=True)) & set(norm)
    aggregate = {
        "bn1.num_batches_tracked": torch.tensor(2.6, dtype=torch.float64),
        "conv1.weight": torch.zeros(64, 1, 7, 7, dtype=torch.float16),
    }
    fixed = restore_dtypes(aggregate, meta)
    assert fixed["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(fixed["bn1.num_batches_tracked"]) == 3
    assert fixed["conv1.weight"].dtype == torch.float32
    assert (
        compress({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.int64)}, True)["b"].dtype
        == torch.int64
    )


def test_write_node_config_checks_every_key_before_writing(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "deploy" / "write_node_config.sh"
    out = tmp_path / "node" / "site.toml"
    run = subprocess.run(
        [
            "bash",
            str(script),
            str(out),
            "role=site",
            "name=s1",
            "data=synthetic:target",  # a site needs data
            "state-dir=/srv/medmerge",
            "audit-dir=/srv/audit",
            "in-channels=1",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    written = out.read_text()
    assert 'state-dir="/srv/medmerge"' in written and 'audit-dir="/srv/audit"' in written
    assert "in-channels=1" in written
    bad = tmp_path / "bad" / "site.toml"
    run = subprocess.run(
        ["bash", str(script), str(bad), "role=site", "colour=red"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "unknown node config key 'colour'" in run.stderr
    assert not bad.parent.exists()  # nothing written


def test_a_run_folder_refuses_a_different_config(tmp_path) -> None:
    FederationRun(FederationConfig(output_dir=str(tmp_path), rounds=2))
    FederationRun(FederationConfig(output_dir=str(tmp_path), rounds=5))  # more rounds: resume
    with pytest.raises(InputError, match=r"differs in ft\.lr\)"):
        FederationRun(FederationConfig(output_dir=str(tmp_path), ft=StageSettings(1, 0.5)))


def test_a_site_keeps_its_fedbn_layers_per_round_on_its_own_disk(tmp_path) -> None:
    cfg = FederationConfig(output_dir=str(tmp_path / "runs"), run_name="trial")
    deployed = node_settings({"role": "site", "name": "s1"}, cfg)  # the hospital's own disk
    assert site_state_dir(deployed, cfg) == Path("~/.medmerge/site-state/trial/s1").expanduser()
    simulated = node_settings({"partition-id": 3, "num-partitions": 6}, cfg)  # one shared disk
    assert site_state_dir(simulated, cfg) == tmp_path / "runs/trial/sites/site-1"
    chosen = node_settings({"role": "site", "name": "s1", "state-dir": str(tmp_path / "s")}, cfg)
    store = FedBNStore(site_state_dir(chosen, cfg))
    assert store.dir == tmp_path / "s/trial/s1" and store.latest(5) is None
    for server_round in (1, 2, 3):
        store.save(server_round, {"bn.weight": torch.full((2,), float(server_round))})
    assert store.rounds() == [2, 3]  # the newest two: a resumed round 3 needs round 2's
    assert store.latest(2)["bn.weight"].tolist() == [2.0, 2.0]
    assert store.latest(9)["bn.weight"].tolist() == [3.0, 3.0]
    assert store.latest(1) is None
    (store.dir / "fedbn-round3.pt").write_bytes(b"truncated")
    with pytest.raises(InputError, match=r"fedbn-round3\.pt: unreadable FedBN layers"):
        store.latest(3)


def test_a_corrupt_run_file_names_itself_and_says_how_to_recover(tmp_path) -> None:
    run = FederationRun(FederationConfig(output_dir=str(tmp_path)))
    (run.dir / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(InputError, match=r"checkpoint\.pt: unreadable round checkpoint .*; delete"):
        run.load_checkpoint()


def test_label_skewed_shards_are_disjoint_deterministic_and_skewed() -> None:
    labels = np.repeat([0, 1, 2], 100)
    shards = dirichlet_shards(labels, 4, alpha=0.5, seed=3)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))
    assert all(len(s) >= MIN_SHARD for s in shards)
    again = dirichlet_shards(labels, 4, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = dirichlet_shards(labels, 4, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))
    shares = np.array([np.bincount(labels[s], minlength=3) / len(s) for s in shards])
    assert shares.max() - shares.min() > 0.5  # far from the stratified 1/3 each
    even = np.array([np.bincount(labels[s], minlength=3) / len(s)
                     for s in dirichlet_shards(labels, 4, alpha=1e4, seed=3)])  # fmt: skip
    assert np.abs(even - 1 / 3).max() < 0.1  # a large alpha is close to stratified
    with pytest.raises(InputError, match=r"label-skew 0\.01"):
        dirichlet_shards(np.repeat([0, 1], 6), 4, alpha=0.01, seed=0)


def test_only_the_training_split_is_label_skewed(tiny_task) -> None:
    skewed = [shard_task(tiny_task, i, 2, seed=0, label_skew=0.3) for i in range(2)]
    plain = [shard_task(tiny_task, i, 2, seed=0) for i in range(2)]
    for a, b in zip(skewed, plain, strict=True):
        assert np.array_equal(a.val.labels, b.val.labels)
        assert np.array_equal(a.test.labels, b.test.labels)
    assert sum(len(p.train) for p in skewed) == len(tiny_task.train)


def test_probe_mode_rounds_and_label_skew_are_checked() -> None:
    cfg = FederationConfig.from_run_config({"probe-mode": "federated", "probe-rounds": 2})
    assert (cfg.probe_mode, cfg.probe_rounds) == ("federated", 2)
    # A site's round gets the probe's budget spread over the rounds, rounded up.
    assert ProbeSettings(steps=300).per_round(7).steps == 43
    assert ProbeSettings(epochs=3).per_round(2) == ProbeSettings(epochs=2)
    site = Node.from_configs({"role": "site", "data": "synthetic:target"},
                             {"probe-mode": "federated", "probe-rounds": 10})  # fmt: skip
    assert site.probe.steps == 30
    with pytest.raises(InputError, match=r"^run config probe-mode: expected one of"):
        FederationConfig.from_run_config({"probe-mode": "central"})
    with pytest.raises(InputError, match="probe-rounds: must be >= 1"):
        FederationConfig.from_run_config({"probe-rounds": 0})
    with pytest.raises(InputError, match="label-skew: must be >= 0"):
        FederationConfig.from_run_config({"label-skew": -1.0})


def test_solo_work_gets_the_cores_the_other_nodes_leave_free(monkeypatch) -> None:
    """The coordinator probes while every other node waits: all the cores. The simulated
    institutions pretrain side by side: the cores shared. `node-threads` overrides both."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    cfg = FederationConfig()  # 2 institutions, 1 coordinator, 3 sites
    roles = [node_settings({"partition-id": i, "num-partitions": 6}, cfg) for i in range(3)]
    assert [solo_threads(s, cfg) for s in roles] == [4, 4, 8]
    deployed = node_settings({"role": "institution", "name": "a"}, cfg)
    assert solo_threads(deployed, cfg) == 8  # its own machine
    assert solo_threads(deployed, FederationConfig(node_threads=3)) == 3


def test_the_pyproject_run_config_is_federation_config_defaults() -> None:
    """Each default is declared twice (the app's run config and the dataclass): kept equal."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    run_config = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    assert FederationConfig.from_run_config(run_config["config"]) == FederationConfig()
