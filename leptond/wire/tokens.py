"""Secrets and tokens: what each side feeds the handshake as its pre-shared key.

A token reads `ltk_<id>_<secret>`; the id names the key in the handshake and the
secret never crosses the wire. People's tokens, join tokens and agents' node
credentials all have this form; only masters hold the cluster secret, which
they use with each other under the key id "cluster".
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CLUSTER_KEY_ID = "cluster"
ADMIN_TOKEN_ID = "admin"
SECRET_LEN = 32
_TOKEN = re.compile(r"^ltk_([a-z0-9]{3,32})_([A-Za-z0-9_-]{43})$")


class SecretError(ValueError):
    """A secret or token that cannot be used; the message is one line for people."""


@dataclass(frozen=True)
class Token:
    id: str
    secret: bytes

    def __str__(self) -> str:
        return f"ltk_{self.id}_{base64.urlsafe_b64encode(self.secret).rstrip(b'=').decode()}"

    @property
    def psk(self) -> bytes:
        return derive(self.secret, b"leptond token psk")


def derive(secret: bytes, label: bytes, length: int = 32) -> bytes:
    """A subkey for one purpose, so the same secret is never used twice raw."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(secret)


def cluster_psk(cluster_secret: bytes) -> bytes:
    return derive(cluster_secret, b"leptond cluster psk")


def new_token(token_id: str | None = None) -> Token:
    return Token(token_id or secrets.token_hex(4), os.urandom(SECRET_LEN))


def parse_token(text: str) -> Token:
    m = _TOKEN.match(text.strip())
    if not m:
        raise SecretError("that is not a leptond token (expected ltk_<id>_<secret>)")
    secret = base64.urlsafe_b64decode(m.group(2) + "=")
    return Token(m.group(1), secret)


def read_secret_file(path: str | Path) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SecretError(
            f"secret file {p} does not exist (create it with `leptond init DIR`)"
        ) from None
    except OSError as exc:
        raise SecretError(f"cannot read secret file {p}: {exc.strerror}") from None
    if len(data) != SECRET_LEN:
        raise SecretError(
            f"secret file {p} must hold exactly {SECRET_LEN} bytes, it has {len(data)}"
        )
    return data


def read_token_file(path: str | Path) -> Token:
    p = Path(path)
    try:
        return parse_token(p.read_text())
    except FileNotFoundError:
        raise SecretError(f"token file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read token file {p}: {exc}") from None


def write_private(path: Path, data: bytes) -> None:
    """Create a 0600 file; refuse to overwrite one that exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
