"""A multi-node network testbed on one Linux machine: network namespaces as "nodes".

    switch namespace  sy-a2a-<pid>-sw   bridge br0, ports p0..p{N-1}
    node namespaces   sy-a2a-<pid>-n<i> eth0 = 198.18.0.<i+1>/24 (benchmarking range, RFC 2544)

Each node's eth0 is one end of a veth pair whose other end is a bridge port in the switch namespace,
so nothing is created in the root namespace. Inter-node traffic leaves through eth0, whose egress is
shaped with `tc tbf` (the node's "NIC" rate, each direction); traffic between processes of one node
goes over that namespace's loopback (Linux routes a local address through lo), unshaped.
netem is not available, so links add no latency beyond the kernel's own.

The testbed removes itself on exit, on SIGINT/SIGTERM, and removes namespaces left by crashed runs
(our prefix with a process id that no longer exists). It touches nothing without its prefix.
Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

PREFIX = "sy-a2a-"
SUBNET = "198.18.0"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def _our_namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def cleanup_stale() -> list[str]:
    """Delete namespaces with our prefix whose creating process is gone. Returns their names.

    Processes still running inside them (workers orphaned by a crashed driver, which that driver
    started) get SIGTERM first.
    """
    removed = []
    for ns in _our_namespaces():
        try:
            pid = int(ns[len(PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            for orphan in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(orphan), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


class NetBed:
    """`nodes` namespaces on one bridge; `rate_mbit` shapes every node's uplink (None = unshaped)."""

    def __init__(self, nodes: int, rate_mbit: float | None = None) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError("1..250 nodes")
        self.nodes = nodes
        self.rate_mbit = rate_mbit
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._up = False

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetBed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the netns testbed needs root")
        cleanup_stale()
        atexit.register(self.down)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self._up = True
        sw = self.switch
        _run("ip", "netns", "add", sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        self.set_rate(self.rate_mbit)

    def set_rate(self, rate_mbit: float | None) -> None:
        """Shape every node's uplink egress with tbf at `rate_mbit` (None removes the shaping)."""
        self.rate_mbit = rate_mbit
        for ns in self.names:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate_mbit:
                rate_bytes = rate_mbit * 1e6 / 8
                burst = max(16 * 1024, int(rate_bytes * 0.002))  # ~2 ms of line rate
                limit = max(256 * 1024, int(rate_bytes * 0.1))  # ~100 ms of queue
                _run(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    "tbf",
                    "rate",
                    f"{rate_mbit}mbit",
                    "burst",
                    str(burst),
                    "limit",
                    str(limit),
                )

    def addr(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def popen(
        self, node: int, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start a process inside node `node` (`ip netns exec`); it is killed by down()."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names[node], *argv], env={**os.environ, **(env or {})}, **kwargs
        )  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.procs:  # only processes we started
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if not self._up:
            return
        for ns in [*self.names, self.switch]:
            _run("ip", "netns", "del", ns, check=False)
        self._up = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.down()
        sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """A throughput probe between two nodes over a 200 Mbit/s tbf link."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--mib", type=int, default=20, help="MiB sent from node 0 to node 1")
    ap.add_argument("--smoke", action="store_true", help="2 MiB; skips (exit 0) without network namespaces")
    args = ap.parse_args(argv)
    mib = 2 if args.smoke else args.mib
    if args.smoke:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from benchmarks.smoke import netns_available

        if not netns_available():
            print("netbed smoke: skipped, network namespaces unavailable (needs root with ip netns and tc)")
            return 0
    with NetBed(2, rate_mbit=200) as bed:
        server = bed.popen(
            1,
            [
                sys.executable,
                "-c",
                "import socket;s=socket.socket();s.bind(('0.0.0.0',5001));s.listen(1);"
                "c,_=s.accept();n=0\nwhile (b:=c.recv(1<<20)): n+=len(b)\nprint(n)",
            ],
        )
        time.sleep(0.5)
        t0 = time.perf_counter()
        _run(
            "ip",
            "netns",
            "exec",
            bed.names[0],
            sys.executable,
            "-c",
            # retried: on a loaded machine the server may not be listening yet after the sleep
            "import socket,time\nfor _ in range(100):\n try: s=socket.create_connection(('"
            f"{bed.addr(1)}',5001)); break\n except OSError: time.sleep(0.1)\ns.sendall(b'x'*({mib}<<20))",
        )
        server.wait()
        print(f"{mib} MiB at 200 Mbit/s tbf: {mib * 1.048576 / (time.perf_counter() - t0):.1f} MB/s")
    print("left:", _our_namespaces())
    return 0


if __name__ == "__main__":
    sys.exit(main())
