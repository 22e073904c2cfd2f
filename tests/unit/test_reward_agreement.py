"""Agreement statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from clinisynth_server.reward.agreement import (
    agreement,
    cohen_kappa,
    fleiss_kappa,
    percent_agreement,
    rater_stats,
)


def test_cohen_kappa_known_value():
    a = [True, True, False, False, True, False, True, True, False, False]
    b = [True, False, False, False, True, False, True, True, True, False]
    assert cohen_kappa(a, b) == pytest.approx(0.6)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([True, True], [True, True]))  # chance agreement of 1
    assert math.isnan(cohen_kappa([], []))


def test_fleiss_kappa_matches_the_textbook_formula():
    # 4 items × 3 raters: P_i = (1, 1/3, 1/3, 1), P̄ = 2/3; p_yes = 6/12 → P_e = 0.5 → κ = 1/3.
    items = [[True] * 3, [True, True, False], [False, False, True], [False] * 3]
    assert fleiss_kappa(items) == pytest.approx(1 / 3)
    assert percent_agreement(items) == pytest.approx(8 / 12)
    assert math.isnan(fleiss_kappa([[True]]))  # no item with two raters


def test_agreement_picks_cohen_for_two_and_fleiss_for_more():
    two = {"i1": {"a": True, "b": True}, "i2": {"a": False, "b": True}, "i3": {"a": True}}
    res = agreement(two)
    assert (res.statistic, res.raters, res.shared_items) == ("cohen", 2, 2)
    three = {"i1": {"a": True, "b": True, "c": False}, "i2": {"a": False, "b": False}}
    assert agreement(three).statistic == "fleiss"


def test_rater_stats_agreement_with_majority_and_median_time():
    items = {"i1": {"a": True, "b": True, "c": False}, "i2": {"a": False, "b": False, "c": False}}
    stats = {s.rater_id: s for s in rater_stats(items, {"a": [100, 300, 200]})}
    assert stats["c"].agreement_with_majority == pytest.approx(0.5)
    assert stats["a"].agreement_with_majority == pytest.approx(1.0)
    assert stats["a"].median_time_spent_ms == 200 and stats["b"].median_time_spent_ms == 0
    assert stats["a"].plausible_rate == pytest.approx(0.5)
