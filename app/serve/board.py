"""The replicas' notice board: how the ingress reaches *every* replica (cache stats, clear, metrics).

A Serve handle sends a request to one replica of its choosing; there is no public "call them all".
So each replica long-polls this small actor for commands (`next_commands`), runs them and posts
the answer (`reply`); the ingress posts a command and waits for the answers of every live replica
(`broadcast`). A replica that stopped polling (killed, hung) is dropped after `stale_s` and shows up
as missing in the answer instead of blocking it. Plain Python: the Ray actor wraps this class.
"""

from __future__ import annotations

import asyncio
import itertools
import time

POLL_S = 5.0  # a replica's long poll; it is "seen" at every call
STALE_S = POLL_S + 3.0


class Board:
    def __init__(self, stale_s: float = STALE_S):
        self.stale_s = stale_s
        self._seen: dict[str, float] = {}
        self._info: dict[str, dict] = {}
        self._commands: list[tuple[int, str, dict]] = []
        self._replies: dict[int, dict[str, object]] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()

    async def register(self, replica_id: str, info: dict) -> int:
        """A replica is up (model loaded). Returns the last command id: older commands are not for it."""
        async with self._changed:
            self._seen[replica_id] = time.monotonic()
            self._info[replica_id] = info
            self._changed.notify_all()
        return self._commands[-1][0] if self._commands else 0

    async def unregister(self, replica_id: str) -> None:
        async with self._changed:
            self._seen.pop(replica_id, None)
            self._info.pop(replica_id, None)
            self._changed.notify_all()

    def live(self) -> dict[str, dict]:
        """Replicas seen recently, with what they registered (device, cache size, ...)."""
        now = time.monotonic()
        for replica_id, seen in list(self._seen.items()):
            if now - seen > self.stale_s:
                self._seen.pop(replica_id)
                self._info.pop(replica_id, None)
        return {replica_id: self._info.get(replica_id, {}) for replica_id in sorted(self._seen)}

    async def next_commands(self, replica_id: str, after: int, timeout: float = POLL_S) -> list:
        """Commands posted after id `after`, waiting up to `timeout` for one. Marks the replica live."""
        self._seen[replica_id] = time.monotonic()
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                pending = [c for c in self._commands if c[0] > after]
                remaining = deadline - time.monotonic()
                if pending or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass
        self._seen[replica_id] = time.monotonic()
        return pending

    async def reply(self, command_id: int, replica_id: str, result) -> None:
        async with self._changed:
            self._replies.setdefault(command_id, {})[replica_id] = result
            self._changed.notify_all()

    async def broadcast(self, name: str, args: dict | None = None, timeout: float = 10.0) -> dict:
        """Run `name` on every live replica; returns {"replies": {replica: result}, "missing": [replica]}."""
        async with self._changed:
            command_id = next(self._ids)
            targets = set(self.live())
            self._commands.append((command_id, name, args or {}))
            del self._commands[:-64]  # replicas only need the recent ones
            self._changed.notify_all()
            deadline = time.monotonic() + timeout
            while True:
                replies = self._replies.get(command_id, {})
                targets &= set(self.live()) | set(replies)  # one that died meanwhile is not waited for
                remaining = deadline - time.monotonic()
                if targets <= set(replies) or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
            replies = dict(self._replies.pop(command_id, {}))
        return {"replies": replies, "missing": sorted(targets - set(replies))}
