"""Ray token authentication (on by default since Ray 2.60): make sure this process and the
processes it starts use token mode and that a token exists.

Token sources, in Ray's order: $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

from shardyard.platform.errors import ClusterError


def _set_token_mode() -> None:
    """Token mode for this process and its children; refresh Ray's cached config if Ray is loaded."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def token_path() -> Path:
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


class UnsafeTokenFile(ClusterError):
    """A token file that other users can read (or that is not a regular file)."""


def check_token_file(path: Path) -> None:
    """Refuse a token file that is group- or world-accessible, or not a regular file: whoever can
    read it can run code on every node of the cluster."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeTokenFile(f"{path}: the Ray auth token must be a regular file (not a link or device)")
    if st.st_mode & 0o077:
        raise UnsafeTokenFile(
            f"{path}: the Ray auth token is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}` (and consider it leaked: generate a new one on the head)"
        )


def write_token(path: Path, token: str | None = None) -> Path:
    """Write a new token (random 256 bits unless given) to `path`: created with mkstemp (mode 0600,
    an unpredictable name, O_EXCL) in the same directory, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token or secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_token(generate: bool = True) -> Path | None:
    """Set RAY_AUTH_MODE=token and return the token file (created if missing and `generate`: the
    head generates the cluster's one token; clients and worker nodes copy it).

    Returns None when the token comes from $RAY_AUTH_TOKEN. Raises FileNotFoundError when no token
    exists and `generate` is False (a client must use the cluster's token, not a new one), and
    UnsafeTokenFile when the file is group- or world-readable.
    """
    _set_token_mode()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if path.exists():
        check_token_file(path)
        if path.read_text().strip():
            return path
    if not generate:
        raise FileNotFoundError(
            f"no Ray auth token at {path}: copy the cluster's token there (mode 0600), or set RAY_AUTH_TOKEN / "
            "RAY_AUTH_TOKEN_PATH (on the head node: `ray get-auth-token`)"
        )
    return write_token(path)


def main() -> int:
    """`python -m shardyard.cluster.auth generate`: a head node's one token for its cluster."""
    import sys

    if sys.argv[1:] != ["generate"]:
        print("usage: python -m shardyard.cluster.auth generate", file=sys.stderr)
        return 2
    path = ensure_token(generate=True)
    print(f"token file: {path or '$RAY_AUTH_TOKEN'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
