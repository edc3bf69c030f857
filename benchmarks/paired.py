"""Paired-seed statistics for A/B training comparisons (benchmarks/moe_quality.py).

Two arms trained at the same seeds (same data order, same initial common weights) differ per seed by
d_s = b_s - a_s. The statistic is the mean paired difference over seeds and its standard error over
seeds, SE = s_d / sqrt(n) with s_d the sample standard deviation (ddof 1) of the d_s: it carries both
the training noise between seeds and the evaluation noise, and pairing removes what the arms share.

Power: an effect is called when |mean| >= 3 SE. Given the measured paired spread s_d and n seeds,
  smallest effect detectable at 3 standard errors  = 3 * s_d / sqrt(n)          (half the time)
  the same with 80% power                          = (3 + 0.8416) * s_d / sqrt(n)
(0.8416 = the standard normal's 80th percentile: a true effect that large gives |mean|/SE >= 3 in
80% of repeats, treating s_d as known).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CALL_AT = 3.0  # standard errors
Z_POWER_80 = 0.8416212335729143  # Phi^-1(0.8)


@dataclass(frozen=True)
class Paired:
    seeds: tuple[int, ...]  # seeds both arms have, ascending
    diffs: tuple[float, ...]  # b - a per seed
    mean: float
    sd: float  # sample standard deviation of the differences (nan with one seed)
    se: float  # sd / sqrt(n)
    z: float  # mean / se
    detectable: float  # CALL_AT * se: the smallest effect the design calls at 3 standard errors
    detectable_80: float  # (CALL_AT + Z_POWER_80) * se: ... with 80% power

    @property
    def called(self) -> bool:
        """The difference is at least CALL_AT standard errors from zero."""
        return len(self.diffs) > 1 and abs(self.z) >= CALL_AT


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Mean and over-seed standard error of b - a on the seeds both arms have."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError("the two arms share no seed")
    diffs = tuple(b[s] - a[s] for s in seeds)
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
    se = sd / math.sqrt(n)
    if se > 0:
        z = mean / se
    else:  # one seed (se nan), or identical differences (se 0)
        z = math.nan if math.isnan(se) or mean == 0 else math.copysign(math.inf, mean)
    return Paired(seeds, diffs, mean, sd, se, z, CALL_AT * se, (CALL_AT + Z_POWER_80) * se)
