"""Where leptonctl finds the cluster: flags, then environment, then a config file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from leptond.wire.tokens import SecretError, Token, parse_token

CONFIG_ENV = "LEPTON_CONFIG"


class ConfigError(Exception):
    pass


def default_config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lepton" / "config.toml"


@dataclass(frozen=True)
class ClientConfig:
    addrs: str
    token: Token


def load(addr: str | None, token: str | None) -> ClientConfig:
    file_cfg: dict[str, object] = {}
    path = default_config_path()
    if path.exists():
        try:
            file_cfg = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
    addrs = addr or os.environ.get("LEPTON_ADDR") or file_cfg.get("addr")
    tok = token or os.environ.get("LEPTON_TOKEN") or file_cfg.get("token")
    if not addrs:
        raise ConfigError("no cluster address: use --addr, LEPTON_ADDR, or run `leptond dev` first")
    if not tok:
        raise ConfigError(
            "no token: use --token or LEPTON_TOKEN (see admin.token from `leptond init`)"
        )
    tok_s = str(tok)
    if tok_s.startswith("@"):
        try:
            tok_s = Path(tok_s[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {tok_s[1:]}: {exc.strerror}") from None
    try:
        return ClientConfig(str(addrs), parse_token(tok_s))
    except SecretError as exc:
        raise ConfigError(str(exc)) from None


def write(path: Path, addr: str, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'addr = "{addr}"\ntoken = "{token}"\n')
    os.replace(tmp, path)
