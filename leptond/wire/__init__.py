"""The wire protocol shared by leptond, lepton-agent and leptonctl.

Sealed msgpack frames over TCP: see `codec` (frames, bodies, AEAD),
`handshake` (per-connection keys), `connection` (multiplexed RPC),
`server` and `client`.
"""

from .client import ClusterClient, parse_addr, parse_addrs
from .connection import Connection, Handler, open_connection
from .errors import ProtocolError, RpcError
from .server import RpcServer

__all__ = [
    "ClusterClient",
    "Connection",
    "Handler",
    "ProtocolError",
    "RpcError",
    "RpcServer",
    "open_connection",
    "parse_addr",
    "parse_addrs",
]
