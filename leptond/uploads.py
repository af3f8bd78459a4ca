"""Which users uploaded which workdir blocks: the per-user upload quota, and
what each user's manifests may name.

Blocks are content-addressed and stored once, but each user who wants one in
a workdir must have uploaded it themselves: sending a block's bytes is what
proves one holds its content. A manifest may name only blocks its user holds
here, and `blocks_missing` answers per user, so a block id seen somewhere (in
a task's block cache, say) is no key to the content, and asking about one
says nothing about whether another user stored it.

A user's usage is the size of the blocks they hold, for as long as the
masters keep them (an unused block goes after the retention time; one a
manifest names stays while a job uses it).

Every master keeps this ledger, the leader's uploads reaching the others with
the uploader's name, so a new leader knows who holds what. It is an
append-only file of JSON lines, `[block id, user, size]`, one per holder,
read back at start (keeping only blocks still stored) and rewritten after
garbage collection. It is accounting, not data: not fsynced; after a crash a
user may have to upload a block again, never holds one they did not upload.

Not thread-safe for writes: the block service writes it from its single
block-store worker; the event loop only reads (`holds`, `usage`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger("lepton.master")


class UploadLedger:
    def __init__(self, path: Path, stored: Collection[str]) -> None:
        self.path = path
        self._size: dict[str, int] = {}
        self._holders: dict[str, frozenset[str]] = {}
        self.usage: Counter[str] = Counter()
        self._dead = 0  # lines in the file for blocks no longer stored
        self._load(stored)
        self._rewrite()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the service

    def _load(self, stored: Collection[str]) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                bid, user, size = json.loads(line)
                size = int(size)
            except (ValueError, TypeError):
                continue  # a line torn by a crash
            if bid in stored and isinstance(user, str):
                self._add(bid, user, size)

    def _add(self, bid: str, user: str, size: int) -> bool:
        holders = self._holders.get(bid, frozenset())
        if user in holders:
            return False
        # Replaced, never changed in place: the event loop reads it meanwhile.
        self._holders[bid] = holders | {user}
        self._size.setdefault(bid, size)
        self.usage[user] += self._size[bid]
        return True

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for bid, holders in self._holders.items():
                for user in sorted(holders):
                    f.write(json.dumps([bid, user, self._size[bid]]) + "\n")
        os.replace(tmp, self.path)
        self._dead = 0

    def holds(self, user: str, block_id: str) -> bool:
        """Whether `user` uploaded this block (and it is still stored)."""
        return user in self._holders.get(block_id, ())

    def holders(self, block_id: str) -> list[str]:
        return sorted(self._holders.get(block_id, ()))

    def charge(self, block_id: str, user: str, size: int) -> None:
        """Record `user` as a holder of a block just stored (or stored before)."""
        if self._add(block_id, user, size):
            self._f.write(json.dumps([block_id, user, size]) + "\n")
            self._f.flush()

    def retain(self, stored: Collection[str]) -> None:
        """Forget the blocks no longer stored (after garbage collection)."""
        gone = [b for b in self._holders if b not in stored]
        for bid in gone:
            holders = self._holders.pop(bid)
            size = self._size.pop(bid)
            for user in holders:
                self.usage[user] -= size
                if self.usage[user] <= 0:
                    del self.usage[user]
            self._dead += len(holders)
        if self._dead and self._dead >= len(self._holders):
            self._f.close()
            self._rewrite()
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self._f.close()
