"""The mutant list is well-formed: every original snippet occurs exactly once in its file, every
selection names test files that exist. A refactor that moves the code fails here, in the normal
suite, rather than only in CI's mutation run."""

from __future__ import annotations

import pytest

from tests.mutation.mutants import MUTANTS, Mutant
from tests.mutation.run import ROOT, check_mutant, plant, tracked_files


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_plantable_and_its_selection_exists(mutant: Mutant) -> None:
    check_mutant(mutant)  # raises unless the snippet occurs exactly once
    paths = [a.split("::")[0] for a in mutant.selection if a.startswith("tests")]
    assert paths, f"{mutant.name}: the selection names no test path"
    for path in paths:
        assert (ROOT / path).exists(), f"{mutant.name}: {path} does not exist"
    assert mutant.description and "\n" not in mutant.description


def test_mutant_names_are_unique() -> None:
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert len(MUTANTS) >= 12


def test_planting_changes_only_the_mutated_file(tmp_path) -> None:
    mutant = MUTANTS[0]
    files = [mutant.file, "pyproject.toml"]
    plant(mutant, files, tmp_path)
    mutated = (tmp_path / mutant.file).read_text()
    assert mutant.replacement in mutated and mutated.count(mutant.original) == 0
    assert mutated == (ROOT / mutant.file).read_text().replace(mutant.original, mutant.replacement)
    assert (tmp_path / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert mutant.file in tracked_files()


def test_a_missing_snippet_fails_loudly(tmp_path) -> None:
    from tests.mutation.run import MutantError

    ghost = Mutant("ghost", MUTANTS[0].file, "this text is in no file", "x", ["tests"], "nothing")
    with pytest.raises(MutantError, match="occurs 0 times"):
        check_mutant(ghost)
