"""Errors that cross the wire.

Every error a person can see is an `RpcError` with a short machine code and a
one-line message; the CLI prints the message alone.
"""

from __future__ import annotations

# The longest error message sent; longer ones are cut.
MAX_MESSAGE_CHARS = 1024


class RpcError(Exception):
    """A typed error reply: `{code, message}` on the wire."""

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_wire(self) -> dict[str, object]:
        message = self.message
        if len(message) > MAX_MESSAGE_CHARS:
            # One line for people, whatever a handler put in it (a quoted
            # argument of megabytes, say).
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        out: dict[str, object] = {"code": self.code, "message": message}
        out.update(self.extra)
        return out

    @classmethod
    def from_wire(cls, obj: object) -> RpcError:
        if not isinstance(obj, dict):
            return cls("protocol", "malformed error reply")
        code = obj.get("code")
        message = obj.get("message")
        extra = {
            k: v for k, v in obj.items() if k not in ("code", "message") and isinstance(k, str)
        }
        return cls(str(code), str(message), **extra)

    def __str__(self) -> str:
        return self.message


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed, nothing else happens."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionLost(RpcError):
    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("unavailable", message)


# Codes used across the project. Kept as plain strings on the wire.
NOT_LEADER = "not_leader"
NO_QUORUM = "no_quorum"
UNAVAILABLE = "unavailable"
TIMEOUT = "timeout"
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
UNAUTHENTICATED = "unauthenticated"
CONFLICT = "conflict"
INTERNAL = "internal"
UNKNOWN_METHOD = "unknown_method"
# What answered is not a leptond RPC server (an HTTP port, the Raft port...).
WRONG_PORT = "wrong_port"
WRONG_PORT_HTTP = (
    "answered in HTTP: that is leptond's HTTP port (or another web server); "
    "leptonctl and lepton-agent talk to the RPC port (7441 by default)"
)
WRONG_PORT_SILENT = (
    "closed the connection without a word: that is not leptond's RPC port (7441 by "
    "default); leptond's Raft port (7442) does this"
)
WRONG_PORT_OTHER = "does not speak leptond's RPC: that is not leptond's RPC port (7441 by default)"
# A job that no node the cluster knows could ever run (submit without queue_anyway).
UNSCHEDULABLE = "unschedulable"
