"""Inter-rater agreement on binary plausibility judgements (pure functions, no I/O).

- Cohen's kappa (two raters): κ = (p_o − p_e) / (1 − p_e) with p_e from each rater's marginals.
- Fleiss' kappa (any number of raters, items may have different rater counts ≥ 2): the
  unequal-n generalisation, P̄ = mean over items of Σ_j n_ij(n_ij − 1) / (n_i(n_i − 1)),
  P̄_e = Σ_j p_j² with p_j the share of all ratings in category j.
- Percent agreement: share of rater pairs on shared items who agree.
κ is NaN where undefined (no shared items, or chance agreement of 1).
"""

from __future__ import annotations

import bisect
import math
import statistics
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction


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


# ---------------------------------------------------------------------------------------------
# incremental index: the same numbers as :func:`agreement` / :func:`rater_stats`, kept up to date
# on each judgement so a report costs O(raters), not a scan of every record.
# ---------------------------------------------------------------------------------------------

Verdict = tuple[float, str, bool]  # (created, record id, plausible): the latest one counts


class _Scope:
    """Sufficient statistics of one scope (a condition, or everything)."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Verdict]] = {}
        self.shared = self.total = self.yes = self.agree_pairs = self.pairs = 0
        self.p_sum = Fraction(0)  # exact: add and remove in any order, no float drift
        self.rater_shared: Counter[str] = Counter()
        self.rater_shared_yes: Counter[str] = Counter()
        self.r_groups: Counter[str] = Counter()
        self.r_yes: Counter[str] = Counter()
        self.r_agree: Counter[str] = Counter()
        self.r_agree_n: Counter[str] = Counter()
        self.times: dict[str, list[int]] = {}

    def _count(self, group: str, sign: int) -> None:
        ratings = {rater: v[2] for rater, v in self.groups.get(group, {}).items()}
        n, yes = len(ratings), sum(ratings.values())
        for rater, verdict in ratings.items():
            self.r_groups[rater] += sign
            self.r_yes[rater] += sign * verdict
            others, other_yes = n - 1, yes - verdict
            if others and other_yes * 2 != others:
                self.r_agree_n[rater] += sign
                self.r_agree[rater] += sign * (verdict == (other_yes * 2 > others))
        if n >= 2:
            no = n - yes
            self.shared += sign
            self.total += sign * n
            self.yes += sign * yes
            self.p_sum += sign * Fraction(yes * (yes - 1) + no * (no - 1), n * (n - 1))
            self.agree_pairs += sign * (yes * (yes - 1) // 2 + no * (no - 1) // 2)
            self.pairs += sign * (n * (n - 1) // 2)
            for rater, verdict in ratings.items():
                self.rater_shared[rater] += sign
                self.rater_shared_yes[rater] += sign * verdict

    def add(self, group: str, rater: str, verdict: Verdict, time_spent_ms: int) -> None:
        bisect.insort(self.times.setdefault(rater, []), time_spent_ms)
        old = self.groups.get(group, {}).get(rater)
        if old is not None and old[:2] >= verdict[:2]:
            return  # an older judgement than the one that counts
        self._count(group, -1)
        self.groups.setdefault(group, {})[rater] = verdict
        self._count(group, +1)

    def agreement(self) -> Agreement:
        raters = sorted(r for r, c in self.rater_shared.items() if c > 0)
        percent = self.agree_pairs / self.pairs if self.pairs else math.nan
        if len(raters) == 2:  # then every shared item has exactly these two raters
            a, b = raters
            n = self.shared
            p_o = self.agree_pairs / n
            pa, pb = self.rater_shared_yes[a] / n, self.rater_shared_yes[b] / n
            p_e = pa * pb + (1 - pa) * (1 - pb)
            kappa = math.nan if p_e >= 1.0 else (p_o - p_e) / (1 - p_e)
            return Agreement(n, 2, kappa, "cohen", percent)
        kappa = math.nan
        if self.shared:
            p_yes = self.yes / self.total
            p_e = p_yes**2 + (1 - p_yes) ** 2
            p_bar = float(self.p_sum / self.shared)
            kappa = math.nan if p_e >= 1.0 else (p_bar - p_e) / (1 - p_e)
        return Agreement(self.shared, len(raters), kappa, "fleiss", percent)

    def rater_stats(self) -> list[RaterStats]:
        out = []
        for rater in sorted(r for r, c in self.r_groups.items() if c > 0):
            n, shared = self.r_groups[rater], self.r_agree_n[rater]
            times = self.times.get(rater, [])
            out.append(
                RaterStats(
                    rater_id=rater,
                    judgements=n,
                    plausible_rate=self.r_yes[rater] / n,
                    agreement_with_majority=self.r_agree[rater] / shared if shared else math.nan,
                    median_time_spent_ms=_median(times),
                )
            )
        return out


def _median(sorted_values: Sequence[int]) -> float:
    n = len(sorted_values)
    if not n:
        return 0.0
    mid = n // 2
    if n % 2:
        return float(sorted_values[mid])
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2


class AgreementIndex:
    """Agreement per condition key and overall, updated per judgement (thread-safe).

    ``add`` takes each judgement once (repeats by record id are ignored), in any order: the
    latest judgement (by created, id) of a rater on an image group is the one that counts, as
    in a full recomputation over the records sorted by time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._scopes: dict[str | None, _Scope] = {None: _Scope()}

    def add(
        self,
        record_id: str,
        *,
        scope: str,
        group: str,
        rater: str,
        plausible: bool,
        created: float,
        time_spent_ms: int,
    ) -> None:
        verdict: Verdict = (created, record_id, bool(plausible))
        with self._lock:
            if record_id in self._seen:
                return
            self._seen.add(record_id)
            for key in (scope, None):
                self._scopes.setdefault(key, _Scope()).add(group, rater, verdict, time_spent_ms)

    def scopes(self) -> list[str]:
        with self._lock:
            return sorted(k for k in self._scopes if k is not None)

    def agreement(self, scope: str) -> Agreement:
        with self._lock:
            return self._scopes.get(scope, _Scope()).agreement()

    def rater_stats(self, scope: str | None = None) -> list[RaterStats]:
        with self._lock:
            return self._scopes.get(scope, _Scope()).rater_stats()
