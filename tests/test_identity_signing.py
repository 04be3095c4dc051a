"""Issuing and reading node identities: what `sign_identity` checks before it signs (names,
roles, which key is which, a passphrase-protected operator key), identity token files, key
fingerprints as ssh-keygen prints them, and the `medmerge identity sign` / `show` CLI, whose
errors are one line and write nothing. The token and proof themselves, and the attacks they
stop: test_identity.py.
"""

from __future__ import annotations

import subprocess

import pytest

from medmerge_core.cli import main
from medmerge_core.federation.identity import (
    IdentityError,
    fingerprint,
    inspect_token,
    new_challenge,
    prove_identity,
    read_token,
    sign_identity,
    verify_identity,
)
from tests.helpers import SSH_KEYGEN, pub
from tests.test_identity import one_line, operator_line, pub_line

needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")


def test_sign_identity_checks_before_signing(keys, tmp_path):
    op, node = keys["operator"], pub(keys["site-1"])
    cases = [
        ((op, node, "site 1", "site"), "name 'site 1'"),
        ((op, node, "../etc", "site"), "name"),
        ((op, node, "", "site"), "name"),
        ((op, node, "a" * 65, "site"), "name"),
        ((op, node, "site-1", "admin"), "role 'admin'"),
        ((op, node, "site-1", "Site"), "role"),
        ((op, keys["site-1"], "site-1", "site"), "is a private key"),
        ((op, pub(keys["ed_node"]), "site-1", "site"), "SuperNode keys are ECDSA"),
        ((op, tmp_path / "missing.pub", "site-1", "site"), "missing.pub: node public key not"),
        ((keys["site-2"], node, "site-1", "site"), "the operator key is Ed25519"),
        ((pub(op), node, "site-1", "site"), "is a public key"),
        ((tmp_path, node, "site-1", "site"), "is a folder"),
    ]
    for args, match in cases:
        with pytest.raises(IdentityError, match=match) as exc:
            sign_identity(*args)
        one_line(exc)


@needs_ssh_keygen
def test_passphrase_protected_key_is_a_one_line_error(tmp_path, keys):
    path = tmp_path / "locked"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "secret", "-f", str(path)], check=True)
    with pytest.raises(IdentityError, match="locked: operator key is passphrase-protected") as exc:
        sign_identity(path, pub(keys["site-1"]), "site-1", "site")
    one_line(exc)


def test_read_token(tmp_path, token):
    path = tmp_path / "site-1.token"
    path.write_text(token + "\n")
    assert read_token(path) == token
    with pytest.raises(IdentityError, match=r"nope\.token: identity token not found"):
        read_token(tmp_path / "nope.token")
    path.write_text("garbage\n")
    with pytest.raises(IdentityError, match=r"site-1.token: identity token: expected") as exc:
        read_token(path)
    one_line(exc)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(IdentityError, match="not ASCII"):
        read_token(path)
    with pytest.raises(IdentityError, match="is a folder"):
        read_token(tmp_path)


@needs_ssh_keygen
def test_fingerprint_matches_ssh_keygen(keys, token):
    listed = subprocess.run(
        [SSH_KEYGEN, "-lf", str(pub(keys["site-1"]))], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert inspect_token(token).fingerprint == listed == fingerprint(pub_line(keys["site-1"]))


def test_cli_sign_writes_a_token_that_verifies(keys, tmp_path, capsys):
    out = tmp_path / "tokens" / "site-2.token"
    argv = ["identity", "sign", "--operator-key", str(keys["operator"])]
    argv += ["--node-key", str(pub(keys["site-2"])), "--name", "site-2", "--role", "site"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    token = read_token(out)
    challenge = new_challenge()
    identity = verify_identity(
        token, prove_identity(token, keys["site-2"], challenge), challenge, operator_line(keys)
    )
    assert (identity.name, identity.role) == ("site-2", "site")

    assert main(["identity", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "name: site-2" in shown and "role: site" in shown
    assert identity.fingerprint in shown and "not checked" in shown
    assert main(["identity", "show", str(out), "--operator-pub", str(pub(keys["operator"]))]) == 0
    assert "operator signature: valid" in capsys.readouterr().out
    rogue = str(pub(keys["rogue_operator"]))
    assert main(["identity", "show", str(out), "--operator-pub", rogue]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "operator signature invalid" in err


@pytest.mark.parametrize(
    ("name", "role", "match"),
    [("site-1", "admin", "role 'admin'"), ("bad/name", "site", "name 'bad/name'")],
)
def test_cli_bad_role_or_name_is_one_line_and_writes_nothing(
    keys, tmp_path, capsys, name, role, match
):
    out = tmp_path / "t.token"
    argv = ["identity", "sign", "--operator-key", str(keys["operator"])]
    argv += ["--node-key", str(pub(keys["site-1"])), "--name", name, "--role", role]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_show_missing_file_is_one_line(tmp_path, capsys):
    assert main(["identity", "show", str(tmp_path / "none.token")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.token" in err
