"""benchmarks/paired.py, the statistics of moe_quality's paired-seed comparisons, against a direct
computation on synthetic numbers (numpy's standard deviation, the normal quantile from statistics)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from benchmarks.paired import CALL_AT, Z_POWER_80, paired


def test_paired_difference_standard_error_and_power_match_a_direct_computation() -> None:
    a = {0: 2.01, 1: 2.03, 2: 1.99, 3: 2.05}
    b = {0: 1.95, 1: 1.99, 2: 1.96, 3: 1.98, 7: 1.0}  # seed 7 has no partner: left out
    p = paired(a, b)
    d = np.array([1.95 - 2.01, 1.99 - 2.03, 1.96 - 1.99, 1.98 - 2.05])
    se = d.std(ddof=1) / math.sqrt(4)
    assert p.seeds == (0, 1, 2, 3)
    assert p.diffs == pytest.approx(d.tolist(), abs=1e-12)
    assert p.mean == pytest.approx(d.mean(), abs=1e-12)
    assert p.sd == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert p.se == pytest.approx(se, rel=1e-12)
    assert p.z == pytest.approx(d.mean() / se, rel=1e-12)
    assert p.detectable == pytest.approx(3 * se, rel=1e-12)
    assert Z_POWER_80 == pytest.approx(statistics.NormalDist().inv_cdf(0.8), abs=1e-12)
    assert p.detectable_80 == pytest.approx((3 + statistics.NormalDist().inv_cdf(0.8)) * se, rel=1e-12)
    assert p.called and CALL_AT == 3.0  # z = -4.9 here


def test_pairing_removes_what_the_seeds_share() -> None:
    """Seed effects common to both arms (+-0.05) vanish from the paired spread; a fixed effect of
    -0.01 with a little independent noise is then called, which an unpaired comparison could not."""
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.05, 6)
    own = rng.normal(0, 0.002, (2, 6))
    a = {s: 2.0 + seed_effect[s] + own[0, s] for s in range(6)}
    b = {s: 2.0 - 0.01 + seed_effect[s] + own[1, s] for s in range(6)}
    p = paired(a, b)
    assert p.sd < 0.01 < np.std(list(a.values()), ddof=1)
    assert p.called and p.mean < 0


def test_one_seed_and_identical_differences() -> None:
    one = paired({0: 2.0}, {0: 1.9})
    assert one.mean == pytest.approx(-0.1) and math.isnan(one.se) and math.isnan(one.z) and not one.called
    same = paired({0: 2.0, 1: 3.0}, {0: 1.5, 1: 2.5})
    assert same.se == 0 and same.z == -math.inf and same.called
    with pytest.raises(ValueError, match="no seed"):
        paired({0: 1.0}, {1: 1.0})
