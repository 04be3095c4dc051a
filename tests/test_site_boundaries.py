"""A site's disk, words and name stay its own.

- every name that becomes a path (run-name, a node's name) is one safe path component;
- a failure leaves the site as a generic reason, with the detail in the site's audit log;
- the audit log records the hash of every array record and the metric values that left;
- with the operator's key, a node's role and name are the identity the operator signed for its
  SuperNode key, proved at discovery; an impostor or a node without one is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import pytest

from client.client_app import app as client_app
from medmerge_core.federation.audit import record_digest
from medmerge_core.federation.config import FederationConfig, node_settings
from medmerge_core.federation.identity import sign_identity
from medmerge_core.io import read_jsonl
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import nodes, one_line_error, run_config


@pytest.mark.parametrize("name", ["../../..", "/etc", "a/b", "..", ".hidden", "x" * 65, ""])
def test_names_that_become_paths_must_be_one_safe_component(name) -> None:
    message = one_line_error(FederationConfig.from_run_config, {"run-name": name})
    assert "run-name:" in message and "not a safe name" in message
    node = {"role": "site", "name": name, "data": "synthetic:target"}
    assert one_line_error(node_settings, node, FederationConfig()).startswith("node config name:")


def test_a_site_without_its_data_fails_discovery_with_a_generic_reason(tmp_path, caplog) -> None:
    """s3's data path is wrong: the server is told 's3: data unavailable' and never the path;
    s3 is not admitted, and the run goes on with s1 and s2. The detail is in s3's audit log."""
    missing = tmp_path / "private" / "patients.npz"
    configs = nodes(tmp_path)
    configs[5] = {**configs[5], "data": str(missing)}
    rc = run_config(tmp_path, rounds=1)
    grid = InProcessGrid(client_app, configs, rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 2
    (failed,) = [m for m in grid.received if m.has_error()]
    assert failed.error.reason.endswith("s3: data unavailable")
    server_log = "\n".join(r.getMessage() for r in caplog.records if r.name == "flwr")
    assert "s3: data unavailable" in server_log and str(missing) not in server_log
    (line,) = [x for x in read_jsonl(tmp_path / "audit/federation/s3.jsonl") if "failed" in x]
    assert line["message_type"] == "query.info" and "patients.npz" in line["failed"]


def test_the_audit_log_hashes_every_array_record_and_keeps_the_metric_values(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1)
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)
    run_federation(grid, rc)
    lines = read_jsonl(tmp_path / "audit/federation/s1.jsonl")
    train = next(x for x in lines if x["message_type"] == "train")
    reply = next(m for m in grid.received
                 if m.metadata.message_type == "train" and m.metadata.src_node_id == 4)  # fmt: skip
    assert train["sent"]["arrays"]["arrays"]["sha256"] == record_digest(reply.content["arrays"])
    sent = json.dumps(train["sent"]["metrics"]["metrics"], sort_keys=True)  # NaN != NaN
    assert sent == json.dumps(dict(reply.content["metrics"]), sort_keys=True)
    assert len(train["received"]["arrays"]["arrays"]["sha256"]) == 64
    digest = hashlib.sha256()  # the hash is of the array bytes as they travel
    for key in sorted(reply.content["arrays"]):
        data = reply.content["arrays"][key].data
        digest.update(key.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert digest.hexdigest() == train["sent"]["arrays"]["arrays"]["sha256"]


def _keygen(path: Path, kind: str) -> Path:
    args = ["-t", "ed25519"] if kind == "ed25519" else ["-t", "ecdsa", "-b", "384"]
    subprocess.run(["ssh-keygen", "-q", *args, "-N", "", "-f", str(path)], check=True)
    return path


def test_roles_and_names_come_from_the_operators_signed_identities(tmp_path, caplog) -> None:
    """Every node has a SuperNode key and an identity the operator signed for it, except:
    node 6 holds s1's token (it cannot prove s1's key), and node 7 has none: neither is
    admitted. Node 5 calls itself 'site-1' in its node config, but its token says s2: it is s2."""
    caplog.set_level(logging.INFO, logger="flwr")
    operator = _keygen(tmp_path / "operator", "ed25519")
    configs = nodes(tmp_path, sites=4)
    tokens = {}
    for i, config in enumerate(configs[:6]):
        key = _keygen(tmp_path / f"node{i}", "ecdsa")
        name = config.get("name", config["role"])
        tokens[name] = tmp_path / f"{name}.token"
        tokens[name].write_text(sign_identity(operator, key.with_suffix(".pub"), name,
                                              config["role"]))  # fmt: skip
        config.update({"identity": str(tokens[name]), "identity-key": str(key)})
    configs[5]["identity"] = str(tokens["s1"])  # node 6 presents s1's token with its own key
    configs[4]["name"] = "site-1"  # node 5's own words count for nothing
    rc = run_config(tmp_path, rounds=1, **{"operator-key": operator.with_suffix(".pub")
                                           .read_text().strip()})  # fmt: skip
    grid = InProcessGrid(client_app, configs, rc)
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 2  # s1 and s2
    assert "discover: node 6 (?) failed" in caplog.text  # it could not make the proof
    assert "discover: node 7 refused: no signed identity" in caplog.text
    assert "4: 'site s1', 5: 'site s2'}" in caplog.text
    infos = [m for m in grid.received if m.metadata.message_type == "query.info"]
    proved = {m.metadata.src_node_id for m in infos
              if not m.has_error() and "identity-proof" in m.content["info"]}  # fmt: skip
    assert proved == {1, 2, 3, 4, 5}
