"""Message plumbing shared by the ServerApp phases and the strategy's rounds."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("flwr")


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send and wait for every reply (an error reply for a node that failed or left)."""
    messages = list(messages)
    return list(grid.send_and_receive(messages, timeout=timeout)) if messages else []


def ask(
    grid: Grid, nodes: Sequence[int], kind: str, content: RecordDict, timeout: float
) -> tuple[list[Message], list[Message]]:
    """Send `content` to each node as a `kind` message: (messages sent, replies)."""
    messages = [Message(content, dst_node_id=n, message_type=kind) for n in nodes]
    return messages, exchange(grid, messages, timeout)


def addressee(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for. When a node goes offline mid-round, the SuperLink makes
    the error reply itself and signs it with its own id, so look up the message it answers."""
    for msg in sent:
        if msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def usable(phase: str, reply: Message, sent: Iterable[Message], roles: Mapping[int, Any]) -> bool:
    """False (and a log line naming the node) for an error reply; `roles`: node -> `Member`."""
    if reply.has_error():
        node = addressee(reply, sent)
        name = roles[node].name if node in roles else "?"
        log.warning("%s: node %d (%s) failed: %s", phase, node, name, reply.error.reason)
        return False
    return True
