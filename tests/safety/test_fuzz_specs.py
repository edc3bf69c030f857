"""Fuzz: seeded random mutations of every shipped spec in jobs/ go through `shardyard validate`
in-process; each must end in success or a user error (exit 2), never an exception or a traceback.

Mutations act on the parsed YAML tree (replace a value with one of another type or an extreme
number, delete a key, add an unknown key, nest a value) and on the text (truncate, flip a byte,
duplicate a line). Data paths keep pointing at the shipped corpus (stdlib), whose resolution is
cached for the test so 200 cases take seconds.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardyard.cli.main import main
from shardyard.data import corpus
from tests.helpers import ROOT

SPECS = sorted((ROOT / "jobs").glob("*.yaml"))
CASES = 200
WEIRD_VALUES: list[Any] = [
    None,
    -1,
    0,
    1,
    2**31,
    2**62,
    10**30,
    -0.5,
    1e308,
    float("nan"),
    float("inf"),
    "",
    "x" * 300,
    "../../etc/passwd",
    "\u00e9\u4e2d",
    True,
    [],
    [1, "a"],
    {},
    {"nested": {"deep": 1}},
    "8GiB",
]


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            out += _leaves(child, path + (key,))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out += _leaves(child, path + (i,))
    return out


def _set(node: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(node: Any, path: tuple) -> None:
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def mutate(text: str, rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # text: truncate
        return text[: rng.randrange(len(text))]
    if kind == 1:  # text: flip one byte (may leave invalid UTF-8 or a NUL)
        data = bytearray(text.encode())
        data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("utf-8", errors="surrogateescape")
    if kind == 2:  # text: duplicate a line
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        return "\n".join(lines[: i + 1] + lines[i:])
    tree = yaml.safe_load(text)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _leaves(tree) if p]
        path = rng.choice(paths)
        if kind == 3:
            _set(tree, path, rng.choice(WEIRD_VALUES))
        elif kind == 4 and isinstance(path[-1], str):
            _delete(tree, path)
        else:
            parent = tree
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict):
                parent[rng.choice(["extra", "Name", "moe", "keep", "env", "stages"])] = rng.choice(WEIRD_VALUES)
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


@pytest.fixture
def cached_data_paths(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus, "resolve_files", _cached_resolve)


@functools.lru_cache(maxsize=64)
def _resolve(paths: tuple, extensions: tuple):
    from shardyard.platform.schema import DataSpec

    return _original_resolve(DataSpec(paths=list(paths), extensions=list(extensions)))


_original_resolve = corpus.resolve_files


def _cached_resolve(spec):
    return _resolve(tuple(spec.paths), tuple(spec.extensions))


def test_random_mutations_of_the_shipped_specs_never_crash_validate(tmp_path: Path, cached_data_paths, capsys) -> None:
    rng = random.Random(12)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES):
        source = SPECS[case % len(SPECS)]
        text = mutate(source.read_text(), rng)
        path = tmp_path / f"case{case}.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        code = main(["validate", str(path)])  # any exception fails the test here, with the case in the trace
        out = capsys.readouterr()
        assert code in outcomes, (case, text, out.err)
        assert "Traceback" not in out.out + out.err, (case, text)
        if code == 2:
            assert out.err.startswith("error: ") and out.err.strip() != "error:", (case, out.err)
        outcomes[code] += 1
    assert outcomes[2] > CASES // 4 and outcomes[0] > 10, outcomes  # the mutations reach both outcomes
