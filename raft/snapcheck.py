"""Reading a state snapshot someone hands in, without touching the live state.

`snapshot_check` shows what a restore would replace before anything is
proposed. The snapshot is decoded into a state of its own, checked exactly
as a restore would check it, and only its view leaves this module.
"""

from __future__ import annotations

from .state import ClusterState
from .view import StateView


def decode_state(state_bytes: bytes) -> StateView:
    """The state a snapshot holds, as a view; ValueError (one line) when it is
    not a valid state snapshot."""
    s = ClusterState()
    s.restore(state_bytes)
    return s.freeze()
