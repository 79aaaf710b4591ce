"""Reading the shared token and the TLS files that hosts and the coordinator are given.

Both sides read them the same way and fail the same way: one line naming the file."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

MIN_TOKEN_CHARS = 16


def read_token(path: str | Path) -> str:
    """The token in a file (surrounding whitespace ignored): at least 16 characters, one line."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"token file {path}: cannot read it ({err})") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"token file {path}: needs one token of at least {MIN_TOKEN_CHARS} characters without spaces "
            "(make one with `openssl rand -hex 32`)"
        )
    return token


def read_pem(path: str | Path, *, what: str) -> bytes:
    """A PEM file (certificate or key) as bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot read it ({err})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {path}: not a PEM file (expected a -----BEGIN ...----- block)")
    return data
