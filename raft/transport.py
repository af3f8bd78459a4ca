"""pysyncobj TCP transport that persists the journal before sending.

etcd's rule: whatever a message implies about this node's log (an
acknowledgement, entries a leader asks others to store, a vote) must be on
disk before the message leaves. pysyncobj sends every Raft message through
``Transport.send`` (``pysyncobj/transport.py``, ``TCPTransport.send``), so one
fsync here, only when the journal holds unsynced entries, covers a whole
batch of appends that a tick produced.
"""

from __future__ import annotations

from typing import Any, Protocol

from pysyncobj.transport import TCPTransport


class Syncable(Protocol):
    def sync_if_needed(self) -> None: ...


class SyncBeforeSendTransport(TCPTransport):
    """``TCPTransport`` whose ``send`` first makes the journal durable.

    The owning SyncObj must expose the journal as ``raft_journal`` before it
    constructs its transport (``SyncObj.__init__`` builds the journal first,
    then the transport).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._journal: Syncable = syncObj.raft_journal
        super().__init__(syncObj, selfNode, otherNodes)

    def send(self, node: Any, message: Any) -> bool:
        # Ordering rule: fsync BEFORE the message is queued on the socket.
        self._journal.sync_if_needed()
        return bool(super().send(node, message))
