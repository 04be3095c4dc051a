"""Operator-signed node identities with proof of possession of the SuperNode key.

A node's role and name cannot be taken from its own reply: any node could call itself
`site-1` or "coordinator". Flower's SuperNode authentication proves a node holds a registered
key, but the ServerApp never learns which key. So the consortium operator signs, with an
Ed25519 key, a token binding {name, role, SuperNode public key}; at discovery the server sends
a fresh challenge and the node answers with its token and a signature of the challenge made
with its SuperNode private key (ECDSA). The server checks both signatures and trusts only the
token's name and role.

Token: one ASCII line `mmid1.<payload>.<signature>`, both parts unpadded base64url; the payload
is JSON {"v": 1, "name", "role", "key"} (key: the OpenSSH public key line, comment stripped)
and the signature is Ed25519 over `TOKEN_DOMAIN + payload bytes`, so nothing is re-serialised
before checking. Proof: standard base64 of the DER ECDSA signature over
`PROOF_DOMAIN + challenge bytes + SHA-256(token)`, with the hash that suits the curve (SHA-384
for P-384). No Flower imports: every check is testable with plain strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)

from medmerge_core.errors import InputError

ROLES = ("institution", "coordinator", "site")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PREFIX = "mmid1"
TOKEN_DOMAIN = b"medmerge-identity-token-v1\0"  # what the operator's signature covers
PROOF_DOMAIN = b"medmerge-identity-v1\0"  # what a node's proof covers; never a token
CHALLENGE_BYTES = 32
MAX_TOKEN_CHARS = 4096  # a P-521 token is about 500; bounds work on garbage input
MAX_PROOF_CHARS = 512  # a DER P-521 signature is at most 139 bytes
# The hash OpenSSH uses for each curve: a P-384 key signs with SHA-384.
_CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_CHALLENGE = re.compile(rf"[0-9a-f]{{{2 * CHALLENGE_BYTES}}}")


class IdentityError(InputError):
    """A node identity token, proof or key that does not check out; the message says which
    and why on one line, so a refused node can be told exactly what failed."""


def _shown(value: object, limit: int = 60) -> str:
    """A value quoted for a one-line message: repr keeps newlines out, the cut keeps it short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_name(name: object) -> str:
    """The name becomes folder and file names on the server, so one safe path component."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise IdentityError(
            f"name {_shown(name)}: expected 1-64 of A-Z a-z 0-9 . _ - starting with a letter "
            "or digit"
        )
    return name


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise IdentityError(f"role {_shown(role)}: expected one of {', '.join(ROLES)}")
    return str(role)


def _curve_hash(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    return _CURVE_HASHES[key.curve.name]()


def _node_public_key(line: str, where: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH ECDSA public key line as a key; SuperNode keys are ECDSA (P-256/384/521)."""
    try:
        key = load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeError) as exc:
        raise IdentityError(f"{where}: not an OpenSSH public key line") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVE_HASHES:
        raise IdentityError(
            f"{where}: {_key_kind(key)} key; SuperNode keys are ECDSA P-256/384/521 "
            "(ssh-keygen -t ecdsa -b 384)"
        )
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "").replace("PrivateKey", "")


def _openssh_line(key: ec.EllipticCurvePublicKey) -> str:
    """The canonical `ecdsa-sha2-nistpNNN AAAA...` line: no comment, one spelling per key."""
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")


def fingerprint(public_key: str) -> str:
    """`SHA256:...` exactly as `ssh-keygen -lf KEY.pub` prints it, so operators can compare."""
    parts = public_key.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, binascii.Error) as exc:
        raise IdentityError("public key: not an OpenSSH public key line") from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class NodeIdentity:
    """Who a node is, as the operator signed it: a name, a role and its SuperNode public key
    (the canonical OpenSSH line). Construction validates all three."""

    name: str
    role: str
    public_key: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_role(self.role)
        if not isinstance(self.public_key, str):
            raise IdentityError(f"public key {_shown(self.public_key)}: expected a string")
        key = _node_public_key(self.public_key, "public key")
        object.__setattr__(self, "public_key", _openssh_line(key))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def payload(self) -> bytes:
        """The bytes the operator signs (canonical JSON; verification uses the bytes as sent)."""
        fields = {"v": 1, "name": self.name, "role": self.role, "key": self.public_key}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")

    def to_token(self, operator_key: Ed25519PrivateKey) -> str:
        """The identity signed by the operator's key, as one ASCII line."""
        payload = self.payload()
        signature = operator_key.sign(TOKEN_DOMAIN + payload)
        return f"{TOKEN_PREFIX}.{_b64url(payload)}.{_b64url(signature)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(text: str, what: str) -> bytes:
    """Strict unpadded base64url: only the canonical spelling decodes, so a token has one form."""
    if not _B64URL.fullmatch(text):
        raise IdentityError(f"identity token: {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise IdentityError(f"identity token: {what} is not base64url") from exc
    if _b64url(data) != text:
        raise IdentityError(f"identity token: {what} is not canonical base64url")
    return data


def _split_token(token: object) -> tuple[bytes, bytes]:
    """A token's payload and operator signature bytes, or why it is not a token."""
    if not isinstance(token, str):
        raise IdentityError(f"identity token: expected a string, got {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS:
        raise IdentityError(f"identity token: {len(token)} characters, at most {MAX_TOKEN_CHARS}")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise IdentityError(
            f"identity token: expected {TOKEN_PREFIX}.<payload>.<signature> "
            "(made by `medmerge identity sign`)"
        )
    return _unb64url(parts[1], "payload"), _unb64url(parts[2], "signature")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise IdentityError("identity token: payload repeats a field")
    return dict(pairs)


def _parse_payload(payload: bytes) -> NodeIdentity:
    try:
        fields = json.loads(payload.decode("ascii"), object_pairs_hook=_no_duplicates)
    except IdentityError:
        raise
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise IdentityError("identity token: payload is not ASCII JSON") from exc
    if not isinstance(fields, dict) or set(fields) != {"v", "name", "role", "key"}:
        raise IdentityError("identity token: payload fields must be exactly v, name, role, key")
    if type(fields["v"]) is not int or fields["v"] != 1:
        raise IdentityError(f"identity token: version {_shown(fields['v'])}, expected 1")
    try:
        return NodeIdentity(fields["name"], fields["role"], fields["key"])
    except IdentityError as exc:
        raise IdentityError(f"identity token: {exc}") from exc


def inspect_token(token: str) -> NodeIdentity:
    """A token's identity WITHOUT checking the operator's signature: for display and for the
    node's own sanity checks only; the server must use `verify_identity`."""
    payload, _ = _split_token(token)
    return _parse_payload(payload)


def _operator_public_key(line: object) -> Ed25519PublicKey:
    if not isinstance(line, str) or not line.strip():
        raise IdentityError("operator public key: expected an 'ssh-ed25519 AAAA...' line")
    try:
        key = load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeError) as exc:
        raise IdentityError(
            "operator public key: not an OpenSSH public key line ('ssh-ed25519 AAAA...')"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"operator public key: {_key_kind(key)} key, expected Ed25519")
    return key


def verify_token(token: str, operator_public_key: str) -> NodeIdentity:
    """The token's identity once the operator's signature on it checks out. This alone proves
    nothing about the sender (tokens are not secret): pair it with a proof, `verify_identity`."""
    operator = _operator_public_key(operator_public_key)
    payload, signature = _split_token(token)
    try:
        operator.verify(signature, TOKEN_DOMAIN + payload)
    except InvalidSignature as exc:
        raise IdentityError(
            "identity token: operator signature invalid (edited, or not signed by this operator)"
        ) from exc
    return _parse_payload(payload)


def _challenge_bytes(challenge: object) -> bytes:
    if not isinstance(challenge, str) or not _CHALLENGE.fullmatch(challenge):
        raise IdentityError(
            f"challenge {_shown(challenge, 30)}: expected {2 * CHALLENGE_BYTES} lowercase hex "
            "digits (new_challenge())"
        )
    return bytes.fromhex(challenge)


def _proof_message(token: str, challenge: str) -> bytes:
    """Bound to this challenge (no replay) and to this exact token (its name, role and key)."""
    token_hash = hashlib.sha256(token.strip().encode("ascii")).digest()
    return PROOF_DOMAIN + _challenge_bytes(challenge) + token_hash


def new_challenge() -> str:
    """A fresh, unpredictable challenge: send a new one to each node at each discovery."""
    return secrets.token_hex(CHALLENGE_BYTES)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: {what} not found") from exc
    except IsADirectoryError as exc:
        raise IdentityError(f"{path}: is a folder, expected the {what} file") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the {what} ({exc.strerror})") from exc


def _load_private_key(path: Path, what: str) -> object:
    """An unencrypted OpenSSH private key: what Flower's SuperNode reads, and all that
    `cryptography` opens without the optional bcrypt module."""
    data = _read_bytes(path, what)
    if data.lstrip().startswith((b"ssh-", b"ecdsa-")):
        raise IdentityError(f"{path}: is a public key; give the private key file (no .pub)")
    try:
        return load_ssh_private_key(data, password=None)
    except TypeError as exc:  # the key is passphrase-protected
        raise IdentityError(
            f"{path}: {what} is passphrase-protected; give an unencrypted key (ssh-keygen -N '')"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise IdentityError(f"{path}: not an OpenSSH private key ({detail})") from exc


def sign_identity(
    operator_key_path: Path,
    node_public_key_path: Path,
    name: str,
    role: str,
) -> str:
    """The operator's token for one hospital: its name, role and SuperNode public key
    (`keys/NAME.pub`), signed with the operator's Ed25519 private key. Everything is checked
    before signing, so a bad name, role or key never produces a token."""
    _check_name(name)
    _check_role(role)
    data = _read_bytes(node_public_key_path, "node public key")
    if b"PRIVATE KEY" in data:
        raise IdentityError(
            f"{node_public_key_path}: is a private key; give the node's public key (.pub)"
        )
    try:
        line = data.decode("ascii")
    except UnicodeError as exc:
        raise IdentityError(f"{node_public_key_path}: not an OpenSSH public key line") from exc
    public_key = _openssh_line(_node_public_key(line, str(node_public_key_path)))
    operator = _load_private_key(operator_key_path, "operator key")
    if not isinstance(operator, Ed25519PrivateKey):
        raise IdentityError(
            f"{operator_key_path}: {_key_kind(operator)} key; the operator key is Ed25519 "
            "(ssh-keygen -t ed25519)"
        )
    return NodeIdentity(name, role, public_key).to_token(operator)


def prove_identity(token: str, node_private_key_path: Path, challenge: str) -> str:
    """The node's answer to a challenge: a signature with its SuperNode private key. Refuses a
    key that is not the token's, so a misconfigured node fails here, not at the server."""
    identity = inspect_token(token)
    key = _load_private_key(node_private_key_path, "SuperNode private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVE_HASHES:
        raise IdentityError(
            f"{node_private_key_path}: {_key_kind(key)} key; SuperNode keys are ECDSA P-256/384/521"
        )
    public = key.public_key()
    if _openssh_line(public) != identity.public_key:
        raise IdentityError(
            f"{node_private_key_path}: key {fingerprint(_openssh_line(public))} is not the "
            f"identity token's key {identity.fingerprint} ({identity.name})"
        )
    signature = key.sign(_proof_message(token, challenge), ec.ECDSA(_curve_hash(public)))
    return base64.b64encode(signature).decode("ascii")


def verify_identity(
    token: str, proof: str, challenge: str, operator_public_key: str
) -> NodeIdentity:
    """The node's identity, once the operator signed its token and the proof shows the sender
    holds the token's private key for this challenge. Raises IdentityError saying why not.

    The caller must pass the challenge it sent to this node (fresh each time) and refuse two
    nodes with the same name."""
    identity = verify_token(token, operator_public_key)
    message = _proof_message(token, challenge)
    if not isinstance(proof, str) or not proof or len(proof) > MAX_PROOF_CHARS:
        raise IdentityError(f"identity proof of {identity.name}: expected a base64 signature")
    try:
        signature = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IdentityError(f"identity proof of {identity.name}: not base64") from exc
    key = _node_public_key(identity.public_key, "identity token key")
    try:
        key.verify(signature, message, ec.ECDSA(_curve_hash(key)))
    except (InvalidSignature, ValueError) as exc:
        raise IdentityError(
            f"identity proof of {identity.name}: invalid (not made with the token's key "
            f"{identity.fingerprint} for this challenge)"
        ) from exc
    return identity


def read_token(path: Path) -> str:
    """The token in a node's identity file, checked for form (not signature) so a wrong or
    damaged file is named on the node before any message is answered."""
    data = _read_bytes(path, "identity token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeError as exc:
        raise IdentityError(f"{path}: not an identity token (not ASCII)") from exc
    try:
        inspect_token(token)
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from exc
    return token
