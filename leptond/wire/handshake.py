"""Connection handshake: fresh keys for every connection (the Noise NNpsk0 idea).

client -> server  hello:  b"LPT1" | key_id_len u8 | key_id | nonce(16) | x25519 pub(32)
server -> client  hello:  b"LPT1" | status u8 | nonce(16) | x25519 pub(32)

Keys: HKDF-SHA256(ikm = X25519(shared), salt = PSK,
                  info = "leptond rpc v1" | client nonce | server nonce | both pubs)
      -> 64 bytes: client->server key | server->client key.

Knowing the PSK is what authenticates: with a wrong PSK the keys differ and the
first sealed frame fails to open. The client sends a sealed "hello" message
right after the handshake, so a wrong key is detected at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError

MAGIC = b"LPT1"
NONCE_LEN = 16
PUB_LEN = 32
MAX_KEY_ID = 64
STATUS_OK = 0
STATUS_UNKNOWN_KEY = 1
STATUS_BUSY = 2
# The key already holds as many connections as the server allows one key.
STATUS_KEY_LIMIT = 3
_INFO = b"leptond rpc v1"


@dataclass(frozen=True)
class Keys:
    send: bytes
    recv: bytes


class HandshakeState:
    """One side's ephemeral key and nonce."""

    def __init__(self) -> None:
        self.private = X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes_raw()
        self.nonce = os.urandom(NONCE_LEN)


def client_hello(state: HandshakeState, key_id: str) -> bytes:
    kid = key_id.encode()
    if not kid or len(kid) > MAX_KEY_ID:
        raise ValueError("key id must be 1-64 bytes")
    return MAGIC + bytes([len(kid)]) + kid + state.nonce + state.public


def parse_client_hello(payload: bytes) -> tuple[str, bytes, bytes]:
    """Returns (key_id, nonce, public key) or raises ProtocolError."""
    if len(payload) < 5 or payload[:4] != MAGIC:
        raise ProtocolError("bad_hello", "not a leptond client hello")
    n = payload[4]
    if n == 0 or n > MAX_KEY_ID or len(payload) != 5 + n + NONCE_LEN + PUB_LEN:
        raise ProtocolError("bad_hello", "malformed client hello")
    try:
        key_id = payload[5 : 5 + n].decode()
    except UnicodeDecodeError:
        raise ProtocolError("bad_hello", "key id is not utf-8") from None
    nonce = payload[5 + n : 5 + n + NONCE_LEN]
    pub = payload[5 + n + NONCE_LEN :]
    return key_id, nonce, pub


def server_hello(state: HandshakeState, status: int = STATUS_OK) -> bytes:
    return MAGIC + bytes([status]) + state.nonce + state.public


def parse_server_hello(payload: bytes) -> tuple[int, bytes, bytes]:
    if len(payload) != 5 + NONCE_LEN + PUB_LEN or payload[:4] != MAGIC:
        raise ProtocolError("bad_hello", "not a leptond server hello")
    return payload[4], payload[5 : 5 + NONCE_LEN], payload[5 + NONCE_LEN :]


def derive_keys(
    me: HandshakeState,
    peer_pub: bytes,
    peer_nonce: bytes,
    psk: bytes,
    is_client: bool,
) -> Keys:
    try:
        shared = me.private.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    except ValueError:
        raise ProtocolError("bad_hello", "invalid public key") from None
    if is_client:
        cn, sn, cp, sp = me.nonce, peer_nonce, me.public, peer_pub
    else:
        cn, sn, cp, sp = peer_nonce, me.nonce, peer_pub, me.public
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=psk, info=_INFO + cn + sn + cp + sp
    ).derive(shared)
    c2s, s2c = okm[:32], okm[32:]
    return Keys(send=c2s, recv=s2c) if is_client else Keys(send=s2c, recv=c2s)
