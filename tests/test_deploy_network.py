"""The deploy/ scripts on their own: node configs, connections, keys, the start scripts'
refusals and the locks that refuse a second SuperNode or SuperExec on one key or state folder.
They start real Flower processes on loopback, so they run with the other network tests."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib

import pytest

from tests.consortium import (
    BIN,
    DEPLOY,
    HOST,
    PUBLIC,
    flwr_env,
    free_port,
    sh,
    stop_group,
)

pytestmark = pytest.mark.network


def test_write_connection_replaces_its_section(tmp_path) -> None:
    """Running write_connection.sh again with the same NAME replaces [superlink.NAME]
    (a duplicate table would make config.toml unreadable for `flwr`); the rest stays."""
    env = flwr_env(tmp_path, "flwr")
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here\n")
    write = str(DEPLOY / "write_connection.sh")
    sh(write, "hospitals", f"{HOST}:9093", str(ca), env=env)
    sh(write, "backup", f"{HOST}:9193", str(ca), env=env)
    sh(write, "hospitals", f"{HOST}:19093", str(ca), env=env)
    sh(write, "hospitals", f"{HOST}:29093", str(ca), env=env)
    config = tmp_path / "flwr" / "config.toml"
    text = config.read_text()
    assert text.count("[superlink.hospitals]") == 1 and "\n\n\n" not in text, text
    assert tomllib.loads(text)["superlink"] == {
        "default": "hospitals",
        "backup": {"address": f"{HOST}:9193", "root-certificates": str(ca)},
        "hospitals": {"address": f"{HOST}:29093", "root-certificates": str(ca)},
    }
    listed = sh(str(BIN / "flwr"), "config", "list", env=env)  # flwr itself parses it
    assert "hospitals (default)" in listed and "backup" in listed, listed
    for bad in (["a b", f"{HOST}:1", str(ca)], ["x", f"{HOST}:1", str(tmp_path / "none")]):
        done = subprocess.run([write, *bad], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert config.read_text() == text  # a refused call leaves the file as it was


def test_start_superlink_refuses_bad_arguments_in_one_line(tmp_path) -> None:
    """Usage errors are one line, exit 2, and nothing starts: above all, no extra argument
    may move the SuperLink off 127.0.0.1 or turn TLS off."""
    env = flwr_env(tmp_path, "flwr")
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("")
    script = str(DEPLOY / "start_superlink.sh")
    state = str(tmp_path / "state")
    for args in (
        [],
        [str(certs)],
        [str(certs), f"{PUBLIC}:9092"],  # no STATE_DIR: the state would be lost
        [str(tmp_path / "none"), f"{PUBLIC}:9092", state],
        [str(certs), "9092", state],
        [str(certs), f"{PUBLIC}:99999", state],
        [str(certs), f"{PUBLIC}:9092", "9093"],  # the old argument order
        [str(certs), f"{PUBLIC}:9092", state, "9092"],
        [str(certs), f"{PUBLIC}:9092", state, "--host", "0.0.0.0"],
        [str(certs), f"{PUBLIC}:9092", state, "9093", "--hos=0.0.0.0"],
        [str(certs), f"{PUBLIC}:9092", state, "--port", "9000"],
        [str(certs), f"{PUBLIC}:9092", state, "--insecure"],
        [str(certs), f"{PUBLIC}:9092", state, "--control-api-address", "0.0.0.0:9093"],
        [str(certs), f"{PUBLIC}:9092", state, "--allow-runtime-dependency-installation"],
        [str(certs), f"{PUBLIC}:9092", state, "--database", ":flwr-in-memory:"],
        [str(certs), f"{PUBLIC}:9092", state, "--isolation=subprocess"],
    ):
        done = subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == "", (args, done.stderr)
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_write_node_config_refuses_a_bad_pair_in_one_line_and_writes_nothing(tmp_path) -> None:
    """What a hospital can get wrong in its node config is caught when it is written: the
    role, the name, a quote, a relative path, data or a checkpoint that is not there."""
    data = tmp_path / "site1.npz"
    data.write_bytes(b"")
    script = str(DEPLOY / "write_node_config.sh")
    good = ["role=site", "name=site-1", f"data={data}"]
    out = tmp_path / "nodes" / "site-1.toml"
    for pairs in (
        ["role=hospital", "name=site-1", f"data={data}"],
        ["name=site-1", f"data={data}"],
        ["role=site", f"data={data}"],
        ["role=site", "name=../site-1", f"data={data}"],
        ["role=site", 'name=site"1', f"data={data}"],
        ["role=site", "name=site-1"],  # a site needs data
        ["role=site", "name=site-1", "data=site1.npz"],
        ["role=site", "name=site-1", f"data={tmp_path / 'none.npz'}"],
        ["role=site", "name=site-1", f"data={tmp_path}"],
        ["role=institution", "name=a"],
        ["role=institution", "name=a", f"checkpoint={tmp_path / 'none.pt'}"],
        ["role=institution", "name=a", "checkpoint=a.pt", "data=synthetic:related_a"],
        [*good, "state-dir=state"],
        [*good, "audit-dir=audit"],
        [*good, "identity=tokens/site-1.token", f"identity-key={tmp_path}/k"],
        [*good, f"identity={tmp_path}/t"],  # and no identity-key to prove it
        [*good, "shard=2/2"],
        [*good, "device=gpu"],
        [*good, "in-channels=three"],
        [*good, "role=site"],
        [*good, "colour=red"],
    ):
        done = subprocess.run([script, str(out), *pairs], capture_output=True, text=True)
        assert done.returncode == 2, (pairs, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == "", (pairs, done.stderr)
        assert not out.parent.exists(), pairs
    for pairs in (  # specs need no file; an institution with data pretrains into checkpoint
        ["role=site", "name=site-1", "data=synthetic:target", "shard=0/2"],
        ["role=institution", "name=a", "checkpoint=random:1"],
        ["role=institution", "name=a", "checkpoint=torchvision:DEFAULT"],
        ["role=institution", "name=a", f"checkpoint={tmp_path}/a.pt", "data=synthetic:related_a"],
        [*good, f"identity={tmp_path}/t", f"identity-key={tmp_path}/k", "device=cuda:1"],
    ):
        sh(script, str(out), *pairs, env=os.environ.copy())
        text = out.read_text()
        assert all(f'{p.split("=", 1)[0]}="{p.split("=", 1)[1]}"' in text for p in pairs), text
        sh(script, str(out), *pairs, env=os.environ.copy())
        assert out.read_text() == text  # idempotent


def test_each_hospital_makes_its_own_key_once(tmp_path) -> None:
    """make_node_keys.sh KEY_DIR NAME prints the public key to send; a second run keeps the
    key; a key that is not ECDSA P-384 is refused. make_certs.sh keeps its CA the same way."""
    env = os.environ.copy()
    keys = tmp_path / "keys"
    sent = sh(str(DEPLOY / "make_node_keys.sh"), str(keys), "site-1", env=env).strip()
    assert sent == str(keys / "site-1.pub") and (keys / "site-1").stat().st_mode & 0o077 == 0
    key = (keys / "site-1").read_bytes()
    assert sh(str(DEPLOY / "make_node_keys.sh"), str(keys), "site-1", env=env).strip() == sent
    assert (keys / "site-1").read_bytes() == key
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "ed"), env=env)
    done = subprocess.run([str(DEPLOY / "make_node_keys.sh"), str(keys), "ed"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "not an ECDSA P-384 key" in done.stderr, done.stderr
    certs = tmp_path / "certs"
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", env=env)
    made = {p.name: p.read_bytes() for p in certs.iterdir()}
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", env=env)
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == made
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", "DNS:superlink", env=env)
    assert (certs / "ca.crt").read_bytes() == made["ca.crt"]  # the same CA, a new server cert
    assert (certs / "server.pem").read_bytes() != made["server.pem"]


def test_a_second_supernode_or_superexec_on_the_same_key_or_state_is_refused(tmp_path) -> None:
    """Two SuperNodes with one key would take each other's messages, and two SuperExecs would
    both start ServerApps: the start scripts hold a lock and refuse a second start in one line.
    Nothing listens on the SuperLink address here; both retry until they are stopped."""
    env = flwr_env(tmp_path, "flwr")
    sh(str(DEPLOY / "make_certs.sh"), str(tmp_path / "certs"), env=env)
    sh(str(DEPLOY / "make_node_keys.sh"), str(tmp_path / "keys"), "site-1", env=env)
    config = tmp_path / "site-1.toml"
    sh(str(DEPLOY / "write_node_config.sh"), str(config), "role=site", "name=site-1",
       "data=synthetic:target", env=env)  # fmt: skip
    closed = free_port()
    node = [str(DEPLOY / "start_supernode.sh"), str(config), f"{HOST}:{closed}",
            str(tmp_path / "certs" / "ca.crt"), str(tmp_path / "keys" / "site-1")]  # fmt: skip
    exe = [str(DEPLOY / "start_superexec.sh"), str(tmp_path / "certs"), str(tmp_path / "state"),
           str(closed)]  # fmt: skip
    first = {
        "supernode": [*node, str(free_port(closed))],
        "superexec": exe,
    }
    procs = {}
    try:
        for name, cmd in first.items():
            log = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(cmd, env={**env, "LOG_FILE": str(log)},
                                           start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        for name in procs:  # each has written its first line (and holds its lock)
            log = tmp_path / f"{name}.log"
            while not (log.exists() and "Connection attempt failed" in log.read_text()):
                assert time.monotonic() < deadline and procs[name].poll() is None, name
                time.sleep(0.2)
        for cmd, text in (([*node, str(free_port(closed))], "another SuperNode is running"),
                          (exe, "another SuperExec is running")):  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 2 and text in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1
    finally:
        for proc in procs.values():
            stop_group(proc)
