"""Ray token authentication (on by default since Ray 2.60): make sure this process and the
processes it starts use token mode and that a token exists.

Token sources, in Ray's order: $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path


def _set_token_mode() -> None:
    """Token mode for this process and its children; refresh Ray's cached config if Ray is loaded."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def token_path() -> Path:
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_token(generate: bool = True) -> Path | None:
    """Set RAY_AUTH_MODE=token and return the token file (created if missing and `generate`).

    Returns None when the token comes from $RAY_AUTH_TOKEN. Raises FileNotFoundError when no token
    exists and `generate` is False (a client must use the cluster's token, not a new one).
    """
    _set_token_mode()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if path.exists() and path.read_text().strip():
        return path
    if not generate:
        raise FileNotFoundError(
            f"no Ray auth token at {path}: copy the cluster's token there, or set RAY_AUTH_TOKEN / "
            "RAY_AUTH_TOKEN_PATH (on the head node: `ray get-auth-token`)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.replace(tmp, path)
    return path
