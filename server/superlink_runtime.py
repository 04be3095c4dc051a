"""The SuperLink runtime (`medmerge-superlink`): Flower's `flower-superlink`, same arguments,
with its SQLite database waiting longer for a lock.

Flower 1.42 keeps the SuperLink's state and every message's objects in one SQLite file, and
each connection gives up on a lock after 5 s (`busy_timeout` in
`flwr.supercore.constant.SQLITE_PRAGMAS`). On a loaded host (a consortium's seven SuperNodes
and their ClientApps on two cores, where a write transaction can be descheduled for seconds)
that fails requests which only had to wait: measured on this project's SecAgg+ network test,
an `acquire-task` gave up 5.1 s after it asked, the SuperExec exited on the 500, a SuperNode's
`pull-messages` failed, and the ServerApp's task heartbeat failed, so the SuperLink revoked
its task token and the run ended. Waiting up to BUSY_TIMEOUT_MS instead turns those into
slow answers. It stays under the 30 s that Flower's own clients wait for an answer
(`flwr.supercore.protobuf.client`), so a caller that times out has something to retry.
"""

from __future__ import annotations

BUSY_TIMEOUT_MS = 20_000


def with_busy_timeout(pragmas: tuple[tuple[str, str], ...], milliseconds: int) -> tuple:
    """Flower's SQLite pragmas with `busy_timeout` set to `milliseconds` (the rest as they are)."""
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise RuntimeError("flwr's SQLITE_PRAGMAS has no busy_timeout: review this wrapper")
    return tuple((name, str(milliseconds) if name == "busy_timeout" else value)
                 for name, value in pragmas)  # fmt: skip


def use_busy_timeout(milliseconds: int = BUSY_TIMEOUT_MS) -> None:
    """Every SQLite connection Flower opens from now on, in this process, waits this long."""
    from flwr.supercore import sql_mixin  # reads the tuple on each new connection

    sql_mixin.SQLITE_PRAGMAS = with_busy_timeout(sql_mixin.SQLITE_PRAGMAS, milliseconds)


def main() -> None:
    """`medmerge-superlink`: `flower-superlink` (same arguments) with the longer lock wait."""
    from flwr.superlink.cli import flower_superlink

    use_busy_timeout()
    flower_superlink()
