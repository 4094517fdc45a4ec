"""A real ``redis-server`` for tests: on a free loopback port, in its own temporary directory.

``RedisServer`` starts Debian's ``redis-server`` binary with no persistence (unless asked), waits
until it answers ``PING``, and can be killed (SIGKILL, like a crash) and restarted on the same
port for fault tests. ``redis_server_binary()`` skips the calling test with a clear message when
no binary exists, unless the environment variable ``CI`` is set: then it fails, because CI must
run the Redis tests (``.ci/run`` installs the ``redis-server`` package).

Only loopback addresses are used; every server is stopped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_server_binary", "running_server"]


def redis_server_binary() -> str:
    """Path of ``redis-server``; skip (or fail under CI) when there is none."""
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        message = (
            "redis-server not found: install it (Debian: apt-get install redis-server) "
            "to run the Redis tests"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI is set, so the Redis tests must run", pytrace=False)
        pytest.skip(message)
    try:
        import redis  # noqa: F401
    except ImportError:
        message = "the redis client package is missing: pip install '.[redis]' from a checkout"
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI is set, so the Redis tests must run", pytrace=False)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:<port>`` with its own working directory."""

    def __init__(self, binary: str, workdir: Path, *, persistent: bool = False) -> None:
        self.binary = binary
        self.workdir = workdir
        self.persistent = persistent
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--enable-debug-command", "local",
        ]  # fmt: skip
        if self.persistent:
            argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--save", "", "--appendonly", "no"]
        return argv

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (on the same port as before, if it ran already) and wait for PING."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("server already running")
        for attempt in range(3):
            self.proc = subprocess.Popen(
                self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _ping(self.port, 0.2):
                    self.starts += 1
                    return
                time.sleep(0.01)  # the server process is still starting: poll again
            self._reap()
            if self.starts == 0 and attempt < 2:
                self.port = _free_port()  # the first port may have been taken meanwhile
        log = self.workdir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL, like a crash: nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """Terminate gracefully (SIGTERM), or kill after 5 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def restart(self) -> None:
        """Crash and start again on the same port (empty unless ``persistent``)."""
        self.kill()
        self.start()

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, running={self.proc is not None})"


@contextlib.contextmanager
def running_server(workdir: Path, *, persistent: bool = False) -> Iterator[RedisServer]:
    """A started server, stopped (and reaped) when the block ends, whatever happened in it."""
    server = RedisServer(redis_server_binary(), workdir, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class CommandLog:
    """What clients sent to a server, seen through ``MONITOR`` (commands run by scripts excluded).

    ``with CommandLog(url) as log: ...`` then ``log.commands`` lists the upper-cased command names
    that clients (not Lua) sent during the block, in order; the log's own commands are left out.
    ``log.lua_commands`` counts the commands scripts ran during the block.
    """

    def __init__(self, url: str) -> None:
        import threading

        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._sentinel = f"commandlog-{os.getpid()}-{id(self)}"
        self._ready = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.commands: list[str] = []
        self.lua_commands = 0

    def _run(self) -> None:
        with self._client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._ready.set()
            for entry in monitor.listen():
                command = str(entry["command"])
                if entry["client_type"] == "lua":
                    self.lua_commands += 1
                    continue
                if self._sentinel in command:
                    if command.upper().startswith("ECHO") and "end" in command:
                        return
                    if command.upper().startswith("ECHO") and "start" in command:
                        self.commands.clear()  # the block starts here
                        self.lua_commands = 0
                        self._started.set()
                    continue
                self.commands.append(command.split(" ", 1)[0].upper())

    def __enter__(self) -> CommandLog:
        self._thread.start()
        self._ready.wait(5)
        self._client.echo(f"{self._sentinel}-start")
        if not self._started.wait(10):  # MONITOR is live once this shows up
            raise RuntimeError("MONITOR never showed the CommandLog's start marker")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.echo(f"{self._sentinel}-end")
        self._thread.join(10)
        self._client.close()
