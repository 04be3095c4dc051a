"""Who takes part: each node's role, name and data sizes as the server admits them at discovery.

A node's discovery reply is checked like any other reply: a role the federation knows, a name
that is one safe path component, and counts that are non-negative integers. A name claimed by
two nodes, or a second coordinator, is refused for every claimant, since the server cannot tell
which is genuine (with the operator's signed identities, `federation.identity`, it can: there a
claim is the identity the operator signed, not what the node says).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.federation.config import ROLES, check_name
from medmerge_core.federation.identity import verify_identity


@dataclass(frozen=True)
class Member:
    """A node as admitted: its role and name, and for a site the sizes of its training and test
    sets (the most its replies may count as examples)."""

    role: str
    name: str
    train_examples: int | None = None
    test_examples: int | None = None

    def as_config(self) -> dict[str, Any]:
        counts = {"train-examples": self.train_examples, "test-examples": self.test_examples}
        return {"role": self.role, "name": self.name} | {
            k: v for k, v in counts.items() if v is not None
        }

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> Member:
        """From a discovery reply; InputError naming the field that is unusable."""
        role, name = record.get("role"), record.get("name")
        if role not in ROLES:
            raise InputError(f"role {str(role)[:40]!r} is not one of {ROLES}")
        if not isinstance(name, str):
            raise InputError("name is missing")
        check_name("name", name)
        counts = {}
        for key in ("train-examples", "test-examples"):
            value = record.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InputError(f"{key} must be a non-negative integer, got {value!r}")
            counts[key] = value
        return cls(role, name, counts["train-examples"], counts["test-examples"])


def admit(claims: Mapping[int, Member]) -> tuple[dict[int, Member], dict[int, str]]:
    """(admitted nodes, {refused node: reason}): every node claiming a name another node also
    claims is refused, and so is every coordinator when more than one claims the role."""
    names = Counter(m.name for m in claims.values())
    coordinators = sum(m.role == "coordinator" for m in claims.values())
    admitted: dict[int, Member] = {}
    refused: dict[int, str] = {}
    for node, member in sorted(claims.items()):
        if names[member.name] > 1:
            refused[node] = f"name '{member.name}' is claimed by {names[member.name]} nodes"
        elif member.role == "coordinator" and coordinators > 1:
            refused[node] = f"role 'coordinator' is claimed by {coordinators} nodes"
        else:
            admitted[node] = member
    return admitted, refused


def read_member(info: Mapping[str, Any], operator_key: str, challenge: str) -> Member:
    """The member a discovery reply's `info` describes. With the operator's key, role and name
    come from the operator-signed identity the node proved it holds (for `challenge`); the
    node's own words count only for its data sizes. InputError says why a reply is refused."""
    if not operator_key:
        return Member.from_config(info)
    token, proof = info.get("identity-token"), info.get("identity-proof")
    if not isinstance(token, str) or not isinstance(proof, str):
        raise InputError("no signed identity (its node config needs identity and identity-key)")
    identity = verify_identity(token, proof, challenge, operator_key)
    return Member.from_config({**info, "role": identity.role, "name": identity.name})
