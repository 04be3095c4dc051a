"""medmerge-superlink: the SuperLink's SQLite database waits out a lock that Flower's own
5 s would have failed on (server/superlink_runtime.py)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from server.superlink_runtime import BUSY_TIMEOUT_MS, use_busy_timeout, with_busy_timeout

HELD_S = 6.0  # longer than Flower's 5 s, shorter than ours


def write_while_locked(database: str) -> float:
    """Another connection holds the write lock for HELD_S; a write through Flower's own
    database layer (the object store the SuperLink keeps messages in) waits or fails."""
    store = SqlObjectStore(database)
    store.initialize()
    holder = sqlite3.connect(database, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long transaction holds it
    release = threading.Timer(HELD_S, holder.rollback)
    release.start()
    started = time.monotonic()
    try:
        with store.session() as session:
            session.execute(text("CREATE TABLE waited (x INTEGER)"))
        return time.monotonic() - started
    finally:
        release.join()
        holder.close()


def test_flower_alone_gives_up_on_a_lock_after_5_s(tmp_path, monkeypatch) -> None:
    """Why the wrapper exists: pinned so that a Flower that changes this is noticed."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    with pytest.raises(OperationalError, match="database is locked"):
        write_while_locked(str(tmp_path / "superlink.db"))


def test_the_superlink_runtime_waits_the_lock_out(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    use_busy_timeout()
    waited = write_while_locked(str(tmp_path / "superlink.db"))
    assert HELD_S - 0.5 < waited < BUSY_TIMEOUT_MS / 1000, waited
    store = SqlObjectStore(str(tmp_path / "superlink.db"))
    store.initialize()
    with store.session() as session:
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == BUSY_TIMEOUT_MS
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"  # kept


def test_only_the_busy_timeout_changes_and_a_missing_one_is_named() -> None:
    pragmas = (("busy_timeout", "5000"), ("journal_mode", "WAL"))
    changed = with_busy_timeout(pragmas, 20_000)
    assert changed == (("busy_timeout", "20000"), ("journal_mode", "WAL"))
    with pytest.raises(RuntimeError, match="no busy_timeout"):
        with_busy_timeout((("journal_mode", "WAL"),), 20_000)
