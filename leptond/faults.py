"""Fault injection for the test suite only. Inert unless the test harness sets it.

`LEPTOND_TEST_FAULTS` is a comma-separated list of faults a master injects:

- `drop-reply`: a mutating call whose request id starts with `drop-` is
  carried out (committed), and then its connection is cut instead of
  answered, the first time this master sees that id. The client sees a lost
  connection after the commit, the case idempotent retries exist for. The
  reply it did not get is logged (`test fault: dropped the reply to ...`) so a
  test can compare it with the answer to the retry.

Nothing here is meant for production: without the variable every check is a
constant False.
"""

from __future__ import annotations

import os

ENV = "LEPTOND_TEST_FAULTS"
DROP_PREFIX = "drop-"
KNOWN = frozenset({"drop-reply"})


class Faults:
    def __init__(self, spec: str = "") -> None:
        names = {f.strip() for f in spec.split(",") if f.strip()}
        unknown = names - KNOWN
        if unknown:
            raise ValueError(f"{ENV}: unknown fault(s) {', '.join(sorted(unknown))}")
        self.drop_reply_enabled = "drop-reply" in names
        self._dropped: set[str] = set()

    def drop_reply(self, rid: object) -> bool:
        """Whether to cut the connection instead of answering this call."""
        if not self.drop_reply_enabled or not isinstance(rid, str):
            return False
        if not rid.startswith(DROP_PREFIX) or rid in self._dropped:
            return False
        self._dropped.add(rid)
        return True


def from_env() -> Faults:
    return Faults(os.environ.get(ENV, ""))
