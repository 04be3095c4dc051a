"""A Ray-free Grid that delivers messages straight to a ClientApp in this process (one
Context per node), enough for SecAggPlusWorkflow: a fast harness for unit tests."""

from __future__ import annotations

import copy

from flwr.app import Context, Error, Message, RecordDict


class InProcessGrid:
    def __init__(self, client_app, node_ids, node_configs) -> None:
        self.app = client_app
        self.contexts = {
            n: Context(
                run_id=1, node_id=n, node_config=node_configs[n], state=RecordDict(), run_config={}
            )
            for n in node_ids
        }
        self._next = 0

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            # copy, as the wire would: the workflow sends one RecordDict to every node in
            # stage 0, and secaggplus_mod pops "stage" from it in place
            msg = Message(
                copy.deepcopy(sent.content),
                dst_node_id=sent.metadata.dst_node_id,
                message_type=sent.metadata.message_type,
                group_id=sent.metadata.group_id,
            )
            self._next += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._next}"
            msg.metadata.__dict__["_src_node_id"] = 0
            msg.metadata.__dict__["_run_id"] = 1
            node = msg.metadata.dst_node_id
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # an error reply, as the SuperLink would send
                replies.append(Message(Error(code=0, reason=repr(exc)[:200]), reply_to=msg))
        return replies
