"""Replication helpers for ``test_redis_replication.py``: primaries, replicas and snapshots.

``ReplicationServer`` is a ``RedisServer`` that persists only what an explicit ``SAVE`` wrote (an
RDB file, no AOF, no automatic save points), so a test decides exactly which writes a restart
keeps, and whose replicas' full syncs start at once.
``link`` makes one server a replica of another, ``promote`` ends that, and ``wait_in_sync``
polls ``INFO replication`` (with a deadline) until the replica's link is up, no sync is running
and its offset equals the primary's. ``stopped`` freezes a server process (SIGSTOP) so that it
cannot acknowledge anything, and lets it go again (SIGCONT) when the block ends, even if the test
failed.

Every server here listens on 127.0.0.1 only and is stopped by the test that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis_server import RedisServer, redis_server_binary

__all__ = [
    "ReplicationServer",
    "admin",
    "dataset_digest",
    "link",
    "promote",
    "replication",
    "servers",
    "stopped",
    "wait_in_sync",
]

SYNC_TIMEOUT = 30.0  # seconds a replication link may take to come up and catch up (a loaded box)


class ReplicationServer(RedisServer):
    """A ``RedisServer`` (no AOF, no save points) that starts a replica's full sync at once
    (``repl-diskless-sync-delay 0``: by default a primary waits 5 s for more replicas).

    With ``rdb``, a crash (``kill``) and ``start`` reload exactly the data of the last explicit
    ``SAVE`` (the RDB file ``dump.rdb`` in its directory); without, tests never ``SAVE``.
    """

    def __init__(self, binary: str, workdir: Path, *, rdb: bool = False) -> None:
        super().__init__(binary, workdir, persistent=False)
        self.rdb = rdb

    def _argv(self) -> list[str]:
        argv = super()._argv()  # not persistent: it ends with no save points and no AOF
        assert argv[-4:] == ["--save", "", "--appendonly", "no"], argv
        return [*argv, "--dbfilename", "dump.rdb", "--repl-diskless-sync-delay", "0"]


@contextlib.contextmanager
def servers(tmp_path: Path, *names: str, rdb: bool = False) -> Iterator[list[ReplicationServer]]:
    """One started server per name, each in its own directory under ``tmp_path``; all stopped
    (and reaped) when the block ends, whatever happened in it."""
    binary = redis_server_binary()
    started: list[ReplicationServer] = []
    try:
        for name in names:
            workdir = tmp_path / name
            workdir.mkdir()
            srv = ReplicationServer(binary, workdir, rdb=rdb)
            started.append(srv)
            srv.start()
        yield started
    finally:
        for srv in started:
            if srv.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(srv.proc.pid, signal.SIGCONT)  # never stop a frozen one
            srv.stop()


def admin(srv: RedisServer) -> Any:
    """A client for administrative commands on ``srv`` (its own connection pool)."""
    return redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=10, decode_responses=True)


def replication(client: Any) -> dict[str, Any]:
    """``INFO replication`` of ``client``'s server."""
    return dict(client.info("replication"))


def link(replica: Any, primary: RedisServer) -> None:
    """Make ``replica``'s server a replica of ``primary`` (``REPLICAOF 127.0.0.1 <port>``)."""
    replica.replicaof("127.0.0.1", primary.port)


def promote(client: Any) -> None:
    """``REPLICAOF NO ONE``: the server stops replicating and takes writes."""
    client.replicaof("NO", "ONE")


def wait_in_sync(primary: Any, replica: Any, timeout: float = SYNC_TIMEOUT) -> int:
    """Poll until ``replica`` is linked to ``primary`` (link up, no sync in progress) and has
    applied everything ``primary`` has (equal replication offsets). Returns the offset."""
    deadline = time.monotonic() + timeout
    last: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    while time.monotonic() < deadline:
        theirs, ours = replication(primary), replication(replica)
        last = (theirs, ours)
        if (
            theirs.get("role") == "master"
            and ours.get("role") == "slave"
            and ours.get("master_link_status") == "up"
            and int(ours.get("master_sync_in_progress", 1)) == 0
            and int(ours["master_repl_offset"]) == int(theirs["master_repl_offset"])
        ):
            return int(theirs["master_repl_offset"])
        time.sleep(0.01)  # the replication link is still coming up or catching up: poll again
    raise AssertionError(f"the replica never caught up within {timeout} s: {last!r}")


def dataset_digest(client: Any) -> str:
    """``DEBUG DIGEST``: one digest of every key and value on the server (equal datasets, equal
    digests)."""
    return str(client.execute_command("DEBUG", "DIGEST"))


@contextlib.contextmanager
def stopped(srv: RedisServer) -> Iterator[None]:
    """Freeze ``srv``'s process (SIGSTOP) for the block: it reads and acknowledges nothing, as a
    replica on a hung host; it runs again (SIGCONT) when the block ends."""
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
