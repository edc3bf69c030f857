"""Run the mutation check: plant each curated slip (tests/mutation/mutants.py) in a fresh copy of the
tree and run only the tests that claim to cover it. A mutant is killed when those tests fail.

    python -m tests.mutation [--jobs 2] [--only NAME ...] [--list] [--keep] [--baseline]

Per mutant: the files git knows (tracked, plus untracked ones not ignored) are copied into a new
temporary directory, the original snippet is replaced (it must occur exactly once: otherwise the
check stops with an error naming the mutant), and `python -m pytest -x -q -p no:cacheprovider
--ignore=tests/mutation <selection>` runs there with PYTHONPATH set to the copy (so the copy's code
is what the tests, their subprocesses and their gloo ranks import). Exit status 1 counts as killed
(a timeout too); 0 is a survivor; anything else (no tests collected, a collection error) is an
error, never a kill. Prints `mutants: K of N killed`, the survivors and errors, and exits non-zero
unless every mutant is killed. `--baseline` first runs every distinct selection on an unmutated
copy: each must pass (exit 2 if not).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.mutation.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900


class MutantError(RuntimeError):
    """A mutant that cannot be planted (its snippet is missing or ambiguous)."""


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | error
    seconds: float
    detail: str = ""


def tracked_files(root: Path = ROOT) -> list[str]:
    """The files of the tree as git sees it: tracked, plus untracked files that are not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in out.split("\0") if name and (root / name).is_file()})


def check_mutant(mutant: Mutant, root: Path = ROOT) -> str:
    """The file's text; raises MutantError unless the original occurs exactly once (and differs from
    its replacement)."""
    path = root / mutant.file
    if not path.is_file():
        raise MutantError(f"mutant {mutant.name}: {mutant.file} does not exist")
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise MutantError(
            f"mutant {mutant.name}: its original snippet occurs {count} times in {mutant.file} (must be exactly "
            f"once; update tests/mutation/mutants.py to the code as it is now):\n{mutant.original}"
        )
    if mutant.original == mutant.replacement:
        raise MutantError(f"mutant {mutant.name}: the replacement equals the original")
    return text


def plant(mutant: Mutant, files: list[str], target: Path, root: Path = ROOT, *, baseline: bool = False) -> None:
    """Copy `files` from `root` into `target` and apply the mutant there (not with `baseline`)."""
    text = check_mutant(mutant, root)
    for name in files:
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest)
    if not baseline:
        (target / mutant.file).write_text(text.replace(mutant.original, mutant.replacement, 1))


def pytest_command(mutant: Mutant) -> list[str]:
    # tests/mutation is left out: its well-formedness test fails in any mutated copy (the snippet is gone)
    return [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "--ignore=tests/mutation",
        *mutant.selection,
    ]


def copy_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = str(copy)  # the copy's shardyard and tests, in this process and every child
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_mutant(mutant: Mutant, files: list[str], keep: bool = False, baseline: bool = False) -> Outcome:
    """Plant `mutant` in a fresh copy and run its selection; with `baseline`, the same copy and
    selection without the slip (which must pass: status "survived")."""
    start = time.perf_counter()
    copy = Path(tempfile.mkdtemp(prefix=f"shardyard-mutant-{mutant.name}-"))
    try:
        plant(mutant, files, copy, baseline=baseline)
        env = copy_env(copy)
        where = subprocess.run(
            [sys.executable, "-c", "import shardyard, tests; print(shardyard.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
        if not where.stdout.strip().startswith(str(copy)):
            return Outcome(mutant, "error", time.perf_counter() - start, f"the copy is not imported: {where}")
        try:
            proc = subprocess.run(
                pytest_command(mutant), cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "killed", time.perf_counter() - start, f"timed out after {TIMEOUT_S} s")
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        summary = tail[-1] if tail else ""
        status = {1: "killed", 0: "survived"}.get(proc.returncode, "error")
        detail = summary if status != "error" else f"pytest exit {proc.returncode}: " + "\n".join(tail[-15:])
        return Outcome(mutant, status, time.perf_counter() - start, detail)
    finally:
        if keep:
            print(f"  kept {copy}", flush=True)
        else:
            shutil.rmtree(copy, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2; this box has 2 cores)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies (their paths are printed)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run every distinct selection on an unmutated copy (each must pass, or no kill means anything)",
    )
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.file}: {m.description}\n{'':34s} pytest {' '.join(m.selection)}")
        return 0
    for m in mutants:  # every snippet must be plantable before anything runs
        check_mutant(m)
    files = tracked_files()
    print(f"mutation check: {len(mutants)} mutants, {len(files)} files per copy, {args.jobs} at a time", flush=True)
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    if args.baseline:
        distinct = list({tuple(m.selection): m for m in mutants}.values())
        with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, 2))) as pool:
            bases = list(pool.map(lambda m: run_mutant(m, files, baseline=True), distinct))
        failed = [b for b in bases if b.status != "survived"]
        for b in bases:
            print(f"  baseline {'ok' if b.status == 'survived' else 'FAILED':6s} pytest {' '.join(b.mutant.selection)}")
        if failed:
            for b in failed:
                print(f"BASELINE FAILED (unmutated): pytest {' '.join(b.mutant.selection)}: {b.detail}")
            return 2

    def one(m: Mutant) -> Outcome:
        outcome = run_mutant(m, files, keep=args.keep)
        print(
            f"  {outcome.status:8s} {m.name} ({outcome.seconds:.0f} s): {outcome.detail.splitlines()[0] if outcome.detail else ''}",
            flush=True,
        )
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, 2))) as pool:
        outcomes = list(pool.map(one, mutants))
    killed = [o for o in outcomes if o.status == "killed"]
    print(f"mutants: {len(killed)} of {len(outcomes)} killed ({time.perf_counter() - start:.0f} s)")
    for o in outcomes:
        if o.status == "survived":
            print(
                f"SURVIVED {o.mutant.name}: {o.mutant.description}\n  {o.mutant.file}; pytest {' '.join(o.mutant.selection)}"
            )
        elif o.status == "error":
            print(f"ERROR    {o.mutant.name}: {o.detail}")
    return 0 if len(killed) == len(outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
