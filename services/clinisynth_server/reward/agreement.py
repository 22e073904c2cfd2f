"""Inter-rater agreement on binary plausibility judgements (pure functions, no I/O).

- Cohen's kappa (two raters): κ = (p_o − p_e) / (1 − p_e) with p_e from each rater's marginals.
- Fleiss' kappa (any number of raters, items may have different rater counts ≥ 2): the
  unequal-n generalisation, P̄ = mean over items of Σ_j n_ij(n_ij − 1) / (n_i(n_i − 1)),
  P̄_e = Σ_j p_j² with p_j the share of all ratings in category j.
- Percent agreement: share of rater pairs on shared items who agree.
κ is NaN where undefined (no shared items, or chance agreement of 1).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    shared_items: int
    raters: int
    kappa: float
    statistic: str  # "cohen" | "fleiss"
    percent_agreement: float


@dataclass(frozen=True)
class RaterStats:
    rater_id: str
    judgements: int
    plausible_rate: float
    agreement_with_majority: float
    median_time_spent_ms: float


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    n = len(a)
    if n == 0 or n != len(b):
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return math.nan if p_e >= 1.0 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(items: Sequence[Sequence[bool]]) -> float:
    """Items with at least two ratings each; unequal rater counts allowed."""
    items = [r for r in items if len(r) >= 2]
    if not items:
        return math.nan
    total = sum(len(r) for r in items)
    p_yes = sum(sum(r) for r in items) / total
    p_e = p_yes**2 + (1 - p_yes) ** 2
    p_bar = 0.0
    for r in items:
        n, yes = len(r), sum(r)
        no = n - yes
        p_bar += (yes * (yes - 1) + no * (no - 1)) / (n * (n - 1))
    p_bar /= len(items)
    return math.nan if p_e >= 1.0 else (p_bar - p_e) / (1 - p_e)


def percent_agreement(items: Sequence[Sequence[bool]]) -> float:
    agree = pairs = 0
    for r in items:
        n, yes = len(r), sum(r)
        no = n - yes
        agree += yes * (yes - 1) // 2 + no * (no - 1) // 2
        pairs += n * (n - 1) // 2
    return agree / pairs if pairs else math.nan


def agreement(judgements: Mapping[str, Mapping[str, bool]]) -> Agreement:
    """``judgements[item][rater] = plausible`` → agreement over items with ≥ 2 raters."""
    shared = {item: r for item, r in judgements.items() if len(r) >= 2}
    raters = sorted({rater for r in shared.values() for rater in r})
    items = [list(r.values()) for r in shared.values()]
    if len(raters) == 2:
        a, b = raters
        kappa = cohen_kappa([r[a] for r in shared.values()], [r[b] for r in shared.values()])
        statistic = "cohen"
    else:
        kappa, statistic = fleiss_kappa(items), "fleiss"
    return Agreement(len(shared), len(raters), kappa, statistic, percent_agreement(items))


def rater_stats(
    judgements: Mapping[str, Mapping[str, bool]], times_ms: Mapping[str, Sequence[int]]
) -> list[RaterStats]:
    """Per rater: volume, plausible rate, agreement with the others' majority (ties skipped)."""
    per_rater: dict[str, list[bool]] = {}
    agree: dict[str, list[bool]] = {}
    for ratings in judgements.values():
        for rater, verdict in ratings.items():
            per_rater.setdefault(rater, []).append(verdict)
            others = [v for r, v in ratings.items() if r != rater]
            yes = sum(others)
            if others and yes * 2 != len(others):
                agree.setdefault(rater, []).append(verdict == (yes * 2 > len(others)))
    out = []
    for rater in sorted(per_rater):
        verdicts = per_rater[rater]
        shared = agree.get(rater, [])
        times = list(times_ms.get(rater, []))
        out.append(
            RaterStats(
                rater_id=rater,
                judgements=len(verdicts),
                plausible_rate=sum(verdicts) / len(verdicts),
                agreement_with_majority=sum(shared) / len(shared) if shared else math.nan,
                median_time_spent_ms=float(statistics.median(times)) if times else 0.0,
            )
        )
    return out
