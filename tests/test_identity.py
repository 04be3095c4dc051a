"""Node identities: an operator-signed token plus proof of the SuperNode key, and the attacks
they must stop (edited tokens, foreign operators, stolen tokens, replayed proofs, garbage)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medmerge_core.cli import main
from medmerge_core.errors import InputError
from medmerge_core.federation.identity import (
    IdentityError,
    NodeIdentity,
    fingerprint,
    inspect_token,
    new_challenge,
    prove_identity,
    read_token,
    sign_identity,
    verify_identity,
    verify_token,
)

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")
CURVES = {256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}


def keygen(folder: Path, name: str, kind: str = "ecdsa", bits: int = 384) -> Path:
    """A key pair as deployments make it: `folder/name` (OpenSSH private) + `folder/name.pub`.
    Uses ssh-keygen where installed (the real formats), else cryptography's same formats."""
    path = folder / name
    if SSH_KEYGEN is not None:
        size = ["-b", str(bits)] if kind == "ecdsa" else []
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", kind, *size, "-N", "", "-C", name, "-f", str(path)],
            check=True,
        )
        return path
    key = (
        Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else ec.generate_private_key(CURVES[bits]())
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(name + ".pub").write_bytes(public + f" {name}\n".encode())
    return path


def pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def pub_line(path: Path) -> str:
    return pub(path).read_text().strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    return {
        "operator": keygen(folder, "operator", "ed25519"),
        "rogue_operator": keygen(folder, "rogue", "ed25519"),
        "site-1": keygen(folder, "site-1"),
        "site-2": keygen(folder, "site-2"),
        "ed_node": keygen(folder, "ed_node", "ed25519"),
    }


@pytest.fixture(scope="module")
def token(keys) -> str:
    return sign_identity(keys["operator"], pub(keys["site-1"]), "site-1", "site")


def operator_line(keys: dict[str, Path]) -> str:
    return pub_line(keys["operator"])


def edit_payload(token: str, **changes: object) -> str:
    """The token with payload fields changed and the operator's signature kept."""
    prefix, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields.update(changes)
    data = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return f"{prefix}.{base64.urlsafe_b64encode(data).decode().rstrip('=')}.{signature}"


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_valid_token_and_proof_give_name_and_role(keys, token):
    challenge = new_challenge()
    proof = prove_identity(token, keys["site-1"], challenge)
    identity = verify_identity(token, proof, challenge, operator_line(keys))
    assert (identity.name, identity.role) == ("site-1", "site")
    assert identity.public_key == " ".join(pub_line(keys["site-1"]).split()[:2])  # no comment
    assert "\n" not in token and token.isascii()


@pytest.mark.parametrize("bits", [256, 521])
def test_other_ecdsa_curves_work(tmp_path, keys, bits):
    node = keygen(tmp_path, f"inst-{bits}", bits=bits)
    token = sign_identity(keys["operator"], pub(node), f"inst-{bits}", "institution")
    challenge = new_challenge()
    identity = verify_identity(
        token, prove_identity(token, node, challenge), challenge, operator_line(keys)
    )
    assert identity.role == "institution"


@pytest.mark.parametrize(
    "changes", [{"name": "site-2"}, {"role": "coordinator"}, {"name": "coordinator"}]
)
def test_edited_token_fails(keys, token, changes):
    forged = edit_payload(token, **changes)
    challenge = new_challenge()
    proof = prove_identity(forged, keys["site-1"], challenge)  # the node's own key: still refused
    with pytest.raises(IdentityError, match="operator signature invalid") as exc:
        verify_identity(forged, proof, challenge, operator_line(keys))
    one_line(exc)


def test_token_signed_by_another_operator_fails(keys):
    rogue = sign_identity(keys["rogue_operator"], pub(keys["site-2"]), "coordinator", "coordinator")
    challenge = new_challenge()
    proof = prove_identity(rogue, keys["site-2"], challenge)
    with pytest.raises(IdentityError, match="operator signature invalid"):
        verify_identity(rogue, proof, challenge, operator_line(keys))


def test_stolen_token_with_another_nodes_key_fails(keys, token):
    """Node B (site-2) presents node A's (site-1's) token: it cannot make A's proof."""
    challenge = new_challenge()
    with pytest.raises(IdentityError, match="is not the identity token's key") as exc:
        prove_identity(token, keys["site-2"], challenge)
    one_line(exc)
    # A hand-made proof with B's key, bypassing prove_identity's check, fails at the server.
    key = serialization.load_ssh_private_key(keys["site-2"].read_bytes(), password=None)
    message = b"medmerge-identity-v1\0" + bytes.fromhex(challenge)
    message += hashlib.sha256(token.encode()).digest()
    forged = base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA384()))).decode()
    with pytest.raises(IdentityError, match="proof of site-1: invalid"):
        verify_identity(token, forged, challenge, operator_line(keys))


def test_replayed_proof_for_another_challenge_fails(keys, token):
    old = new_challenge()
    proof = prove_identity(token, keys["site-1"], old)
    new = new_challenge()
    assert new != old
    with pytest.raises(IdentityError, match="proof of site-1: invalid"):
        verify_identity(token, proof, new, operator_line(keys))


def test_proof_is_bound_to_its_token(keys, token):
    """Two tokens for one key (say a role change): a proof for one does not pass for the other."""
    other = sign_identity(keys["operator"], pub(keys["site-1"]), "site-1", "institution")
    challenge = new_challenge()
    proof = prove_identity(token, keys["site-1"], challenge)
    with pytest.raises(IdentityError, match="invalid"):
        verify_identity(other, proof, challenge, operator_line(keys))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


GARBAGE_TOKENS = [
    "",
    "   ",
    "hello",
    "mmid1",
    "mmid1..",
    "mmid1.!!!.???",
    "mmid2.AAAA.AAAA",
    "mmid1.AAAA.AAAA.AAAA",
    "mmid1.AAAA=.AAAA",
    f"mmid1.{_b64url(b'not json')}.{_b64url(b'x' * 64)}",
    f"mmid1.{_b64url(b'[' * 2000)}.{_b64url(b'x' * 64)}",
    f"mmid1.{_b64url(b'{}')}.{_b64url(b'')}",
    f"mmid1.{_b64url('é'.encode())}.{_b64url(b'x' * 64)}",
    "mmid1." + "A" * 10_000 + ".AAAA",
    "mmid1.ÄÖ.ü",
    "mmid1.AAAA\n.AAAA",
    None,
    123,
    b"mmid1.AAAA.AAAA",
    ["mmid1"],
]


@pytest.mark.parametrize("garbage", GARBAGE_TOKENS, ids=range(len(GARBAGE_TOKENS)))
def test_garbage_tokens_give_identity_error(keys, garbage):
    challenge = new_challenge()
    with pytest.raises(IdentityError) as exc:
        verify_identity(garbage, "AAAA", challenge, operator_line(keys))
    one_line(exc)
    with pytest.raises(IdentityError):
        inspect_token(garbage)
    with pytest.raises(IdentityError):
        prove_identity(garbage, keys["site-1"], challenge)


GARBAGE_PROOFS = [
    "",
    "!!!",
    "AAAA",
    "AAA",
    "A" * 100_000,
    base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode(),
    base64.b64encode(b"\x00" * 104).decode(),
    "é",
    None,
    42,
    b"AAAA",
]


@pytest.mark.parametrize("garbage", GARBAGE_PROOFS, ids=range(len(GARBAGE_PROOFS)))
def test_garbage_proofs_give_identity_error(keys, token, garbage):
    with pytest.raises(IdentityError) as exc:
        verify_identity(token, garbage, new_challenge(), operator_line(keys))
    one_line(exc)


@pytest.mark.parametrize(
    "challenge", ["", "ab", "AB" * 32, "ab " * 32, "zz" * 32, "ab" * 33, None, b"\0" * 32]
)
def test_bad_challenges_give_identity_error(keys, token, challenge):
    with pytest.raises(IdentityError, match="challenge"):
        prove_identity(token, keys["site-1"], challenge)
    proof = prove_identity(token, keys["site-1"], new_challenge())
    with pytest.raises(IdentityError, match="challenge"):
        verify_identity(token, proof, challenge, operator_line(keys))


def test_bad_operator_public_keys_give_identity_error(keys, token):
    challenge = new_challenge()
    proof = prove_identity(token, keys["site-1"], challenge)
    for bad in ["", "ssh-ed25519", "ssh-ed25519 !!!", pub_line(keys["site-1"]), None, 7, "é"]:
        with pytest.raises(IdentityError, match="operator public key") as exc:
            verify_identity(token, proof, challenge, bad)
        one_line(exc)


def test_operator_signed_payload_is_still_checked(keys):
    """Defence in depth: even an operator-signed payload with a bad role or name is refused."""
    operator = serialization.load_ssh_private_key(keys["operator"].read_bytes(), password=None)
    for fields in (
        {"v": 1, "name": "site-1", "role": "admin", "key": pub_line(keys["site-1"])},
        {"v": 1, "name": "../x", "role": "site", "key": pub_line(keys["site-1"])},
        {"v": 2, "name": "site-1", "role": "site", "key": pub_line(keys["site-1"])},
        {"v": 1, "name": "site-1", "role": "site", "key": pub_line(keys["ed_node"])},
        {"v": 1, "name": "site-1", "role": "site", "key": pub_line(keys["site-1"]), "x": 1},
    ):
        payload = json.dumps(fields).encode()
        signature = operator.sign(b"medmerge-identity-token-v1\0" + payload)
        token = f"mmid1.{_b64url(payload)}.{_b64url(signature)}"
        with pytest.raises(IdentityError, match="identity token") as exc:
            verify_token(token, operator_line(keys))
        one_line(exc)


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


def test_identity_error_is_an_input_error():
    assert issubclass(IdentityError, InputError)


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


def test_new_challenge_is_fresh_hex():
    challenges = {new_challenge() for _ in range(100)}
    assert len(challenges) == 100
    assert all(len(c) == 64 and int(c, 16) >= 0 for c in challenges)


def test_node_identity_validates_and_strips_comment(keys):
    identity = NodeIdentity("site-1", "site", pub_line(keys["site-1"]) + " extra words")
    assert identity.public_key.count(" ") == 1
    with pytest.raises(IdentityError):
        NodeIdentity("site-1", "boss", identity.public_key)
    with pytest.raises(IdentityError):
        NodeIdentity("site-1", "site", pub_line(keys["operator"]))


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
