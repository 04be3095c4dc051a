"""Node identities: an operator-signed token plus proof of the SuperNode key, and the attacks
they must stop (edited tokens, foreign operators, stolen tokens, replayed proofs, garbage).
Signing, token files and the `medmerge identity` CLI: test_identity_signing.py. The key pairs
and the token both use are the `keys` and `token` fixtures in conftest.py."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medmerge_core.errors import InputError
from medmerge_core.federation.identity import (
    IdentityError,
    NodeIdentity,
    inspect_token,
    new_challenge,
    prove_identity,
    sign_identity,
    verify_identity,
    verify_token,
)
from tests.helpers import keygen, pub


def pub_line(path: Path) -> str:
    return pub(path).read_text().strip()


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


def test_identity_error_is_an_input_error():
    assert issubclass(IdentityError, InputError)


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
