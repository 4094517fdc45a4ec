"""A real three-master Redis Cluster on loopback for tests, built from ``RedisServer``.

``ClusterNode`` is a ``RedisServer`` started in cluster mode (its own ``nodes.conf`` in its own
working directory, a short node timeout, and ``cluster-require-full-coverage no`` so that the
other masters keep serving their slots while one is down). ``Cluster`` starts three of them,
gives each a third of the 16384 slots (``CLUSTER ADDSLOTSRANGE``), joins them
(``CLUSTER MEET``) and polls ``CLUSTER INFO`` on every node, with a deadline, until all agree the
cluster is whole. A node can be hung (SIGSTOP: the kernel still accepts connections, nothing
answers), resumed (SIGCONT), killed (SIGKILL: connections are refused) and restarted on the same
port with the same ``nodes.conf``, so it rejoins with its slots (and without its data: no
persistence). ``Cluster.heal()`` brings every node back and waits for the whole cluster.

Only loopback addresses are used; ``running_cluster`` stops every node when its block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis_server import RedisServer, redis_server_binary

__all__ = [
    "NODE_TIMEOUT_MS",
    "SLOT_RANGES",
    "Cluster",
    "ClusterNode",
    "book_slot",
    "cluster_info",
    "running_cluster",
    "slot_owner",
]

NODE_TIMEOUT_MS = 2000
SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
"""The slots of node 0, 1 and 2 (inclusive ranges): all 16384, each on one master."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def book_slot(namespace: str) -> int:
    """The cluster slot of ``namespace``'s keys (all share the hash tag ``{namespace}``)."""
    from redis.crc import key_slot

    return int(key_slot(f"pendingledger:{{{namespace}}}:book".encode()))


def slot_owner(slot: int) -> int:
    """The index of the node that ``SLOT_RANGES`` gives ``slot``."""
    return next(i for i, (lo, hi) in enumerate(SLOT_RANGES) if lo <= slot <= hi)


class ClusterNode(RedisServer):
    """One cluster-mode ``redis-server`` (a master once the cluster is joined)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(binary, workdir)
        self.bus_port = 0
        self.paused = False

    def _argv(self) -> list[str]:
        if self.starts == 0:  # a fresh bus port for every first-start attempt, then kept
            self.bus_port = _free_port()
        return [
            *super()._argv(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.workdir / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(self.bus_port),
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip

    @property
    def seed_url(self) -> str:
        """The URL a cluster client starts from (no database number: clusters have only 0)."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self) -> Any:
        """A plain (non-cluster) client on this node alone, for commands aimed at it."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the process stops (its listening socket still completes handshakes in the
        kernel, so a client connects and then waits for an answer that never comes)."""
        assert self.proc is not None and self.running, "node not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + 10
        while _state(self.proc.pid) != "T":  # wait until the kernel has stopped it
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self!r} did not stop on SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT (a no-op unless paused)."""
        if self.paused and self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        self.paused = False  # SIGKILL ends a stopped process too
        super().kill()

    def stop(self) -> None:
        self.resume()  # a stopped process would leave SIGTERM pending
        super().stop()


def _state(pid: int) -> str:
    """The process state letter from ``/proc/<pid>/stat`` (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def cluster_info(node: ClusterNode) -> dict[str, str]:
    """``CLUSTER INFO`` of ``node`` as a dict of strings."""
    client = node.admin()
    try:
        text = client.execute_command("CLUSTER INFO")
    finally:
        client.close()
    if isinstance(text, bytes):
        text = text.decode()
    if isinstance(text, dict):  # some client versions parse it
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).split() if ":" in line)


class Cluster:
    """Three cluster nodes, each in a subdirectory of ``root``; node ``i`` owns
    ``SLOT_RANGES[i]``."""

    def __init__(self, binary: str, root: Path) -> None:
        self.nodes = [ClusterNode(binary, _mkdir(root / f"node{i}")) for i in range(3)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node, (first, last) in zip(self.nodes, SLOT_RANGES, strict=True):
            admin = node.admin()
            try:
                admin.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            finally:
                admin.close()
        admin = self.nodes[0].admin()
        try:
            for node in self.nodes[1:]:
                admin.execute_command("CLUSTER MEET", "127.0.0.1", node.port, node.bus_port)
        finally:
            admin.close()
        self.wait_whole()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def owner(self, namespace: str) -> int:
        """The index of the node whose slot range holds ``namespace``."""
        return slot_owner(book_slot(namespace))

    def namespace_on(self, index: int, prefix: str) -> str:
        """The first namespace ``<prefix>-<n>`` whose slot node ``index`` owns."""
        return next(ns for n in range(10_000) if self.owner(ns := f"{prefix}-{n}") == index)

    def whole(self) -> bool:
        """Every node running and answering, and each sees three nodes, all slots assigned
        and served (none on a node it thinks failing), and the cluster state ok."""
        for node in self.nodes:
            if not node.running or node.paused:
                return False
            try:
                info = cluster_info(node)
            except Exception:  # still starting, or not yet answering: poll again
                return False
            expected = {
                "cluster_state": "ok",
                "cluster_known_nodes": "3",
                "cluster_slots_assigned": "16384",
                "cluster_slots_ok": "16384",
            }
            if any(info.get(key) != value for key, value in expected.items()):
                return False
        return True

    def wait_whole(self, timeout: float = 30.0) -> None:
        """Poll until ``whole()`` (an external server state: polling with a deadline)."""
        deadline = time.monotonic() + timeout
        while not self.whole():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become whole in {timeout} s: {self}")
            time.sleep(0.01)

    def heal(self) -> None:
        """Resume paused nodes, restart dead ones (same port, same ``nodes.conf``), and wait
        until the cluster is whole again."""
        for node in self.nodes:
            node.resume()
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_whole()

    def __repr__(self) -> str:
        views = []
        for node in self.nodes:
            try:
                info = cluster_info(node) if node.running and not node.paused else {}
            except Exception as exc:
                info = {"error": repr(exc)}
            keys = ("cluster_state", "cluster_known_nodes", "cluster_slots_ok", "error")
            views.append(f"{node!r} paused={node.paused} " + str({k: info.get(k) for k in keys}))
        return "Cluster(" + "; ".join(views) + ")"


def _mkdir(path: Path) -> Path:
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[Cluster]:
    """A whole three-master cluster under ``root``, every node stopped when the block ends."""
    cluster = Cluster(redis_server_binary(), root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
