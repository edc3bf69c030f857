"""What a Ray cluster started here listens on, read from the kernel's socket table (psutil).

Ray 2.60 binds the dashboard, the Ray client server and the per-node agents where it is told
(shardyard tells it 127.0.0.1), but its C++ gRPC servers (GCS, raylet, object manager, core
workers) listen on every interface whatever the node address. Those accept only requests carrying
the cluster's token (RAY_AUTH_MODE=token). The start-up message says which of the two each listening
socket is, from the sockets themselves, not from the flags we passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LOOPBACK = ("127.", "::1")
ANY = ("0.0.0.0", "::")


@dataclass(frozen=True, order=True)
class Listener:
    process: str
    ip: str
    port: int

    @property
    def scope(self) -> str:
        ip = self.ip.removeprefix("::ffff:")  # an IPv4 address on a dual-stack socket
        if ip.startswith(LOOPBACK):
            return "loopback"
        return "all interfaces" if ip in ANY else ip


def listeners_of(pids: Iterable[int]) -> list[Listener]:
    """Listening TCP sockets of the given processes (process name, address, port), sorted."""
    import psutil

    wanted = set(pids)
    try:
        connections = [(c.pid, c) for c in psutil.net_connections(kind="tcp")]
    except psutil.AccessDenied:  # macOS without root: ask each process (ours) instead
        connections = []
        for pid in wanted:
            try:
                connections += [(pid, c) for c in psutil.Process(pid).net_connections(kind="tcp")]
            except psutil.Error:
                continue
    found = set()
    for pid, conn in connections:
        if conn.status != psutil.CONN_LISTEN or pid not in wanted:
            continue
        try:
            name = _role(psutil.Process(pid))
        except psutil.Error:
            continue
        found.add(Listener(name, conn.laddr.ip, conn.laddr.port))
    return sorted(found)


def _role(process) -> str:
    name = process.name()
    if name.startswith(("gcs_server", "raylet", "ray::")):
        return name
    cmdline = " ".join(process.cmdline())
    for marker, role in (
        ("dashboard/dashboard.py", "dashboard"),
        ("dashboard/agent.py", "dashboard agent"),
        ("runtime_env/agent", "runtime env agent"),
        ("ray.util.client.server", "client server"),
        ("log_monitor", "log monitor"),
        ("monitor.py", "autoscaler monitor"),
    ):
        if marker in cmdline:
            return role
    return name


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    import psutil

    root = psutil.Process(pid)
    return [root.pid] + [child.pid for child in root.children(recursive=True)]


def describe(listeners: list[Listener]) -> str:
    """Lines grouped by scope: what a user can reach from where, and why the rest is guarded."""
    by_scope: dict[str, list[Listener]] = {}
    for item in listeners:
        by_scope.setdefault(item.scope, []).append(item)
    lines = []
    for scope in sorted(by_scope, key=lambda s: (s != "loopback", s)):
        items = ", ".join(f"{i.process} :{i.port}" for i in sorted(by_scope[scope], key=lambda i: (i.process, i.port)))
        note = " (Ray's gRPC servers; token required)" if scope == "all interfaces" else ""
        lines.append(f"  listening on {scope}{note}: {items}")
    return "\n".join(lines) if lines else "  (no listening sockets found)"
