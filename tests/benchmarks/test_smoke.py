"""Every benchmark's `--smoke` run: seconds-long sizes of the same code path as the real run, as a
subprocess, outputs in a temp dir (never benchmarks/results/). A refactor that breaks a benchmark
fails here. Those that start Ray, spawn process groups or take over ~10 s are marked slow
and `benchmark`: CI runs them after the suite (`pytest -m benchmark tests/benchmarks`, see .ci/run), so
the README's test command stays within its time budget; the netns ones skip cleanly where `ip netns` is unavailable."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None  # an optional extra: its rows only with it


# test id -> (extra argv, patterns its output must match, slow); the id up to "-" names the script.
# Patterns are the benchmark's result lines (a ratio, a table row, a written report).
CASES: dict[str, tuple[list[str], list[str], bool]] = {
    "grouped_gemm": ([], [r"\| grouped \[torch\] \| [\d.]+ \|.*\| [\d.]+ \| [\d.]+ \|$", r"fwd\+bwd"], False),
    "moe_layer": (
        [],
        [r"expert load max/mean = [\d.]+", r"\| ours\[torch\] \| \d+ \|", r"\| GEMM floor \| \d+ \|"]
        + ([r"\| deepspeed cf=1\.25 \| \d+ \|"] if HAS_DEEPSPEED else []),
        False,
    ),
    "alltoall_fit": ([], [r"## Fitted constants", r"model vs measured medians", r"plot: .*\.png"], False),
    "netbed": ([], [r"2 MiB at 200 Mbit/s tbf: [\d.]+ MB/s", r"left: \[\]"], False),
    "overhead": ([], [r"round 1: bytes/s bare [\d,]+, trainer [\d,]+", r"\| trainer \| [\d,]+ \|"], True),
    "compile": ([], [r"\| toy \| [\d.]+M \| \d+ ", r"max rel\. loss diff"], True),
    "optimizer": ([], [r"\| jobs/moe-tiny\.yaml \| [\d.]+M \| \d+ \| [\d.]+ \(", r"max param diff"], False),
    "step_memory": ([], [r"\| none \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", r"\| full \| 2 \| [\d.]+ \|"], True),
    "observability": (
        [],
        [r"one logging call: [\d.]+ ms, \d+ keys", r"on/off [\d.]+", r"losses identical with timers on and off: True"],
        True,
    ),
    "train_local": ([], [r"done at step 6/6"], True),
    "interop": (
        [],
        [r"\| 64x1 \| replicated \| [\d.]+ \|", r"# HF export / import vs model size"]
        + ([r"\| 64x1 \| zero2 \| [\d.]+ \|"] if HAS_DEEPSPEED else []),
        True,
    ),
    "upcycle": ([], [r"\| 0 \| [\d.]+ \|", r"Mean difference over seeds"], True),
    "eval_stderr": (
        [],
        [r"eval batch\s+64: .* KB/s", r"all windows: [\d.]+ bpb, iid s\.e\. [\d.]+", r"\| 64 \| \d+"],
        True,
    ),
    "lsh_limit": ([], [r"\| exact \| 1\.000 \|", r"\| kmeans 2x \| [\d.]+ \|", r"\| lsh 8 \| [\d.]+ \|"], True),
    "byte_models": (
        [],
        [r"\| 64 \| 1 \| ours \| [\d,]+ \|", r"\| megabyte \| [\d,]+ \|", r"speed-up \*\*[\d,]+x\*\*", r"longest: "],
        True,
    ),
    "lowrank": (
        [],
        [
            r"SVD 128x512, rank 16: exact",
            r"\| moe \| q_galore \| [\d.]+ \|",
            r"\| moe \| 1 \| q_galore_int8_lw \|",
            r"cpu-time smoke: median CPU ms per step adamw \d+",
        ],
        True,
    ),
    "dispatch": (
        [],
        [
            r"\| loopback, E=8 \| \+LSH 8 \+bf16 \| [\d.]+ \|",
            r"\| `\{lsh: \{hashes: 4\}, payload: bf16\}` \| [\d.]+ \|",
            r"\| final s\.e\. \| [\d.]+ \|",
        ],
        True,
    ),
    "dispatch-netbed": (
        ["--netbed", "200"],
        [r"\| 200 Mbit/s, E=8 \| \+dedup node \| [\d.]+ \|", r"\| final s\.e\. \| [\d.]+ \|"],
        True,
    ),
    "scale": (
        [],
        [
            r"\| ep2\+fsdp \| 2 \| [\d.]+ \|",
            r"\| tp2 \| 2 \| [\d.]+ \|",
            r"\| pp2 \| 2 \| [\d.]+ \|",
            r"table written to",
        ]
        + ([r"\| zero2 \| 2 \| [\d.]+ \|"] if HAS_DEEPSPEED else []),
        True,
    ),
    "alltoall": (
        [],
        [r"\| 2x2 \| 200 \| 16 \| [\d.]+ \([\d.]+-[\d.]+\) \|", r"## Fitted constants", r"plot: .*\.png"],
        True,
    ),
    "data": (
        [],
        [r"\| Ray Data, 2 nodes x 2 CPUs \| bpe:512 \|", r"\| tiny \| bytes \| [\d.]+ \|", r"report written to"],
        True,
    ),
    "eval_cost": ([], [r"\| moe-tiny \| 6 \| [\d.]+ \| 1 \| [\d.]+ \| [\d.]+% \| [\d.]+ \+- [\d.]+ \|"], True),
    "moe_quality": (
        [],
        [
            r"\[moe_quality\] done cont-upcycled-switch-8x\d+ seed 0",
            r"\| fine32x\d+-top7-s1-sigmoid-auxfree \| 1 \| [+-][\d.]+ \| ",
            r"\| top2-8x\d+ \| [\d.]+ \| 1\.0[01]\d\d \|",  # counted FLOPs within 2% of dense's
            r"!\[held-out bpb curves\]",
        ],
        True,
    ),
    "pipeline": (
        [],
        [r"\| 1f1b \| 2 \| [\d.]+ \([\d.]+-[\d.]+\) \| 0\.333 \| [\d.]+ \|", r"\| interleaved_1f1b \| 4 \|"],
        True,
    ),
    "recovery": ([], [r'"max_loss_difference": [\d.e-]+', r'"ratio_wall": [\d.]+', r'"median_us": [\d.]+'], True),
    "save_blocking": ([], [r"1M: async/sync blocked = [\d.]+", r"\| 1M \| [\d.]+M \| \d+ \|"], True),
    "elastic": (
        [],
        [r"\| elastic \| [\d.]+ \[", r"goodput elastic / fixed: [\d.]+", r"load average before [\d.]+"],
        True,
    ),
}


def _params():
    for name, (argv, patterns, slow) in CASES.items():
        # the slow ones run after the suite, one at a time; some start a Ray cluster (the `ray` mark:
        # tests/conftest.py fails a test that starts one unmarked)
        marks = [pytest.mark.slow, pytest.mark.benchmark, pytest.mark.ray] if slow else []
        yield pytest.param(name, argv, patterns, id=name, marks=marks)


def test_every_benchmark_has_a_case() -> None:
    # smoke.py and paired.py are libraries the scripts import (the smoke flag, paired-seed statistics)
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "smoke", "paired"}
    covered = {case.split("-")[0] for case in CASES}
    assert scripts == covered, f"benchmarks without a smoke case: {scripts - covered}"


@pytest.mark.parametrize(("name", "argv", "patterns"), _params())
def test_smoke(name: str, argv: list[str], patterns: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name.split('-')[0]}.py"), "--smoke", *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=900,  # recovery's smoke (three 2-worker Ray jobs) takes minutes on a loaded machine
        env=env,
        cwd=ROOT,
    )
    out = done.stdout + done.stderr
    if done.returncode == 0 and re.search(r"^\w+ smoke: skipped", done.stdout, re.MULTILINE):
        pytest.skip(done.stdout.strip().splitlines()[-1])  # no network namespaces here
    assert done.returncode == 0, (
        f"{name} --smoke exited {done.returncode} after {time.monotonic() - start:.0f} s:\n{out[-6000:]}"
    )
    for pattern in patterns:
        assert re.search(pattern, done.stdout, re.MULTILINE), (
            f"{name}: no line matching {pattern!r} in:\n{done.stdout[-6000:]}"
        )
