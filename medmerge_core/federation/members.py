"""Who takes part: each node's role, name and data sizes as the server admits them at discovery.

A node's discovery reply is checked like any other reply: a role the federation knows, a name
that is one safe path component, and counts that are non-negative integers. A name claimed by
two nodes, or a second coordinator, is refused for every claimant, since the server cannot tell
which is genuine (with the operator's signed identities, `federation.identity`, it can: there a
claim is the identity the operator signed, not what the node says).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.federation.config import ROLES, check_name
from medmerge_core.federation.identity import verify_identity
from medmerge_core.federation.protocol import NodeInfo


@dataclass(frozen=True)
class Member:
    """A node as admitted: its role and name, and for a site the sizes of its training and test
    sets (the most its replies may count as examples)."""

    role: str
    name: str
    train_examples: int | None = None
    test_examples: int | None = None

    def info(self, token: str | None = None, proof: str | None = None) -> NodeInfo:
        """This member's discovery reply (`protocol.NodeInfo`), with its signed identity."""
        return NodeInfo(self.role, self.name, self.train_examples, self.test_examples, token,
                        proof)  # fmt: skip

    @classmethod
    def from_info(cls, info: NodeInfo) -> Member:
        """From a discovery reply whose layout was read; InputError naming the unusable field."""
        if info.role not in ROLES:
            raise InputError(f"role {info.role[:40]!r} is not one of {ROLES}")
        if not info.name:
            raise InputError("name is missing")
        check_name("name", info.name)
        return cls(info.role, info.name, info.train_examples, info.test_examples)


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


def read_member(record: Mapping[str, Any], operator_key: str, challenge: str) -> Member:
    """The member a discovery reply's `info` describes. With the operator's key, role and name
    come from the operator-signed identity the node proved it holds (for `challenge`); the
    node's own words count only for its data sizes. InputError says why a reply is refused."""
    info = NodeInfo.from_config(record)
    if not operator_key:
        return Member.from_info(info)
    token, proof = info.identity_token, info.identity_proof
    if token is None or proof is None:
        raise InputError("no signed identity (its node config needs identity and identity-key)")
    identity = verify_identity(token, proof, challenge, operator_key)
    return Member.from_info(dataclasses.replace(info, role=identity.role, name=identity.name))
