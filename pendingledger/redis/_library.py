"""The gate's server code as a Redis Functions library, and the calls into it.

``gate.lua`` is loaded once per server (``FUNCTION LOAD``) under a name that carries a digest of
its text, so clients of two versions sharing a server each run their own code. A call is one
``FCALL``; when the server answers that the function is missing (a restart without persistence,
``FUNCTION FLUSH``, a new replica promoted before it got the library), the library is loaded
and the call sent again, so the caller never sees it.

``Mark`` keeps the highest fencing mark (epoch, hw, tag) a gate object has seen (``gate.lua``,
"Fencing"): every call sends it and every reply brings the server's, so a server that lost
writes a client saw (it went back in its history, or on along another one) is noticed by that
client's next call, while the server still keeps the tag of the client's point.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis
from redis.cluster import RedisCluster
from redis.typing import EncodableT

__all__ = ["LIBRARY", "VERSION", "Mark", "ServerCode", "function_name"]

_TEMPLATE: Final = resources.files(__package__).joinpath("gate.lua").read_text(encoding="utf-8")
VERSION: Final = hashlib.sha1(_TEMPLATE.encode(), usedforsecurity=False).hexdigest()[:12]
"""A digest of ``gate.lua``: the library's and its functions' names carry it."""

LIBRARY: Final = _TEMPLATE.replace("@VERSION@", VERSION)
"""The library's source as loaded (``FUNCTION LOAD``), its version filled in."""


def function_name(op: str) -> str:
    """The server function of operation ``op`` (``enter``, ``release_order``, ...)."""
    return f"pl{VERSION}_{op}"


def _missing(exc: redis.ResponseError) -> bool:
    return "function not found" in str(exc).lower()


class Mark:
    """The highest fencing mark seen, as ``(epoch, hw, tag)``, ordered by ``(epoch, hw)``: only
    ever goes up (the tag is the one the server reported with that ``(epoch, hw)``)."""

    __slots__ = ("_lock", "_mark")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mark: tuple[int, int, str] = (0, 0, "0")

    def args(self) -> tuple[int, int, str]:
        return self._mark

    def saw(self, epoch: object, hw: object, tag: object) -> None:
        """Take in a reply's mark (``tag``: the server's string, as bytes or str)."""
        text = tag.decode() if isinstance(tag, bytes) else str(tag)
        seen = (int(epoch), int(hw), text)  # type: ignore[call-overload]
        if seen[:2] > self._mark[:2]:
            with self._lock:
                if seen[:2] > self._mark[:2]:
                    self._mark = seen


class ServerCode:
    """Calls into the library on one client (``redis.Redis`` or ``RedisCluster``)."""

    __slots__ = ("_client", "_keys", "mark")

    def __init__(self, client: Any, keys: tuple[str, ...]) -> None:
        self._client = client
        self._keys = keys
        self.mark = Mark()

    def call(self, op: str, *args: EncodableT) -> list[Any]:
        """``FCALL`` of ``op`` with the mark and ``args``; the answer, after the mark."""
        command = (function_name(op), len(self._keys), *self._keys, *self.mark.args(), *args)
        try:
            reply = self._client.fcall(*command)
        except redis.ResponseError as exc:
            if not _missing(exc):
                raise
            self.load()
            reply = self._client.fcall(*command)
        return self.answer(reply)

    def answer(self, reply: Sequence[Any]) -> list[Any]:
        """A reply's answer, after taking in its mark."""
        self.mark.saw(reply[0], reply[1], reply[2])
        return list(reply[3:])

    def queue(self, pipe: Any, op: str, *args: EncodableT) -> None:
        """Add the ``FCALL`` of ``op`` to ``pipe`` (its reply goes through ``answer``)."""
        pipe.fcall(function_name(op), len(self._keys), *self._keys, *self.mark.args(), *args)

    def load(self) -> None:
        """Load the library on the server that holds the namespace (a no-op if it is there)."""
        try:
            if isinstance(self._client, RedisCluster):
                node = self._client.get_node_from_key(self._keys[0])  # type: ignore[no-untyped-call]
                self._client.execute_command(  # type: ignore[no-untyped-call]
                    "FUNCTION LOAD", LIBRARY, target_nodes=node
                )
            else:
                self._client.function_load(LIBRARY)
        except redis.ResponseError as exc:
            if "already exists" not in str(exc):
                raise
