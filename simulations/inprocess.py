"""An in-process Grid: runs the ClientApp for each message right here, one node at a time.

For tests, benchmarks and debugging: the ServerApp logic runs unchanged against it, every
message can be inspected (`sent`, `received`), a node can be made to fail on a chosen
message (`fail`) to exercise the fault paths without starting real processes, and a node's
replies can be rewritten (`tamper`) as a dishonest or broken node would send them.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr's ErrorCode for a ClientApp that raised


class InProcessGrid(Grid):
    """Nodes 1..N with the given node configs, all sharing one run config."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        fail: Callable[[int, Message], bool] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        # Messages take their run id and sender from the process identity the ServerApp
        # runtime would have set; this grid is its own runtime, so it sets it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.app = client_app
        self.contexts = {
            i + 1: Context(1, i + 1, dict(cfg), RecordDict(), dict(run_config))
            for i, cfg in enumerate(node_configs)
        }
        self.fail = fail
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        return None

    @property
    def run(self) -> Any:
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        self.sent.append(msg)
        node = msg.metadata.dst_node_id
        # The node gets its own copy, as it would after serialisation.
        inbound = Message(content=copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
        try:
            if self.fail is not None and self.fail(node, inbound):
                raise RuntimeError(f"node {node} crashed (injected fault)")
            reply = self.app(inbound, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, reply)
        except Exception as exc:  # a real SuperNode turns this into an error reply too
            error = Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
            reply = Message(error, reply_to=inbound)
        self.received.append(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            reply = self._deliver(msg)
            self._pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [self._deliver(msg) for msg in messages]
