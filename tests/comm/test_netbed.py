"""The netns testbed builds, carries traffic between "nodes", and leaves nothing behind (root only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.netbed import NetBed

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def _ours() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(f"sy-a2a-{os.getpid()}-")}


def test_netbed_up_traffic_down() -> None:
    with NetBed(2, rate_mbit=100) as bed:
        assert _ours() == {*bed.names, bed.switch}
        server = bed.popen(
            1,
            [
                sys.executable,
                "-c",
                "import socket;s=socket.socket();s.bind(('0.0.0.0',5002));s.listen(1);"
                "c,_=s.accept();print(len(c.recv(16)))",
            ],
            stdout=subprocess.PIPE,
        )
        client = (
            "import socket,time\nfor _ in range(50):\n try:\n"
            f"  socket.create_connection(('{bed.addr(1)}',5002)).sendall(b'hello');break\n"
            " except OSError: time.sleep(0.1)"
        )
        subprocess.run(["ip", "netns", "exec", bed.names[0], sys.executable, "-c", client], check=True, timeout=30)
        assert server.communicate(timeout=30)[0].strip() == b"5"
    assert _ours() == set()
