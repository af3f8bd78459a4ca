"""Who uploaded which workdir block, for the per-user upload quota.

Blocks are content-addressed and shared: a block is charged to the user who
uploaded it first, for as long as the masters keep it (an unused block goes
after the retention time; one a manifest names stays while a job uses it).
A user's usage is the size of the blocks charged to them.

Every master keeps this ledger, the leader's uploads reaching the others with
the uploader's name, so a new leader knows everyone's usage. It is an
append-only file of JSON lines, `[block id, user, size]`, read back at start
(keeping only blocks still stored) and rewritten after garbage collection. It
is accounting, not data: not fsynced; after a crash a few blocks may be
charged to nobody, never a block to the wrong user.

Not thread-safe: the block service calls it from its single block-store worker.
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
        self._owner: dict[str, tuple[str, int]] = {}
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
            except (ValueError, TypeError):
                continue  # a line torn by a crash
            if bid in stored and bid not in self._owner and isinstance(user, str):
                self._owner[bid] = (user, int(size))
                self.usage[user] += int(size)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for bid, (user, size) in self._owner.items():
                f.write(json.dumps([bid, user, size]) + "\n")
        os.replace(tmp, self.path)
        self._dead = 0

    def owner(self, block_id: str) -> str | None:
        hit = self._owner.get(block_id)
        return hit[0] if hit else None

    def charge(self, block_id: str, user: str, size: int) -> None:
        """Record `user` as the uploader of a block just stored (first one wins)."""
        if block_id in self._owner:
            return
        self._owner[block_id] = (user, size)
        self.usage[user] += size
        self._f.write(json.dumps([block_id, user, size]) + "\n")
        self._f.flush()

    def retain(self, stored: Collection[str]) -> None:
        """Forget the blocks no longer stored (after garbage collection)."""
        gone = [b for b in self._owner if b not in stored]
        for bid in gone:
            user, size = self._owner.pop(bid)
            self.usage[user] -= size
            if self.usage[user] <= 0:
                del self.usage[user]
        self._dead += len(gone)
        if self._dead and self._dead >= len(self._owner):
            self._f.close()
            self._rewrite()
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self._f.close()
