"""The review queue's and agreement's incremental indexes equal a full recomputation.

The reference functions below are the scans the reward service used to run on every
``next_items`` / ``agreement`` call; the indexes must give the same answers after any sequence of
writes, in any arrival order (a restart rebuilds them from the store in listing order).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinisynth_server.reward import agreement as agr
from clinisynth_server.reward.feedback import FeedbackRecord, FeedbackStore, ReviewItem
from clinisynth_server.reward.queue import (
    STRATEGIES,
    ItemView,
    OrderStrategy,
    QueueIndex,
    ScoreBoard,
    strategy_named,
)
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.store import open_store

CONDS = [Condition(class_name="lymphocyte"), Condition(class_name="neutrophil")]
RATERS = ["r0", "r1", "r2", "r3"]
REFS = ["cells@1", "cells@2"]


# -- full recomputation (the old per-call scans) ------------------------------------------------
def ref_next(
    items: list[ReviewItem],
    records: list[FeedbackRecord],
    scores: dict[str, tuple[str, float]],
    strategy: OrderStrategy,
    rater: str,
    condition: Condition | None,
    limit: int,
) -> tuple[list[tuple[str, int, float | None, str]], int]:
    items = sorted(items, key=lambda r: (r.created, r.id))
    records = sorted(records, key=lambda r: (r.created, r.id))
    latest: dict[str, dict[str, bool]] = {}
    for r in records:
        if r.item_id:
            latest.setdefault(r.item_id, {})[r.rater_id] = r.plausible
    open_items = [
        it
        for it in items
        if condition in (None, it.condition) and len(latest.get(it.id, {})) < it.raters_per_item
    ]
    mine = [it for it in open_items if rater not in latest.get(it.id, {})]

    def score(it: ReviewItem) -> tuple[str, float | None]:
        return scores.get(it.id, (it.scored_by, it.p_aligned))

    def key(it: ReviewItem) -> tuple[Any, ...]:
        votes = latest.get(it.id, {})
        yes = sum(votes.values())
        view = ItemView(it, score(it)[1], yes, len(votes) - yes)
        return (*strategy.key(view), it.created, it.id)

    mine.sort(key=key)
    out = [(it.id, len(latest.get(it.id, {})), score(it)[1], score(it)[0]) for it in mine]
    return out[:limit], len(open_items)


def ref_least_certain_order(
    items: list[ReviewItem], scores: dict[str, tuple[str, float]]
) -> list[str]:
    """The original ordering, written as it was (stable sort over items by time)."""
    items = sorted(items, key=lambda r: (r.created, r.id))

    def uncertainty(it: ReviewItem) -> tuple[int, float, float]:
        p = scores[it.id][1] if it.id in scores else it.p_aligned
        return (1, 0.0, it.created) if p is None else (0, abs(p - 0.5), it.created)

    return [it.id for it in sorted(items, key=uncertainty)]


def ref_agreement(
    records: list[FeedbackRecord], condition: Condition | None
) -> tuple[list[tuple[str, agr.Agreement]], list[agr.RaterStats]]:
    records = sorted(
        (r for r in records if condition is None or r.condition == condition),
        key=lambda r: (r.created, r.id),
    )
    per_cond: dict[str, dict[str, dict[str, bool]]] = {}
    all_items: dict[str, dict[str, bool]] = {}
    times: dict[str, list[int]] = {}
    for r in records:
        per_cond.setdefault(r.condition.key, {}).setdefault(r.image_group, {})[r.rater_id] = (
            r.plausible
        )
        all_items.setdefault(r.image_group, {})[r.rater_id] = r.plausible
        times.setdefault(r.rater_id, []).append(r.time_spent_ms)
    if condition is not None:
        per_cond.setdefault(condition.key, {})
    conds = [(k, agr.agreement(v)) for k, v in sorted(per_cond.items())]
    return conds, agr.rater_stats(all_items, times)


def same(a: float, b: float) -> bool:
    # Fleiss' P̄ is summed exactly (fractions) by the index and in floats by the scan.
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def assert_same_agreement(x: agr.Agreement, y: agr.Agreement) -> None:
    assert (x.shared_items, x.raters, x.statistic) == (y.shared_items, y.raters, y.statistic)
    assert same(x.kappa, y.kappa) and same(x.percent_agreement, y.percent_agreement)


def assert_same_raters(xs: list[agr.RaterStats], ys: list[agr.RaterStats]) -> None:
    assert [(r.rater_id, r.judgements) for r in xs] == [(r.rater_id, r.judgements) for r in ys]
    for x, y in zip(xs, ys, strict=True):
        assert same(x.plausible_rate, y.plausible_rate)
        assert same(x.agreement_with_majority, y.agreement_with_majority)
        assert x.median_time_spent_ms == y.median_time_spent_ms


# -- random writes ----------------------------------------------------------------------------
def item(i: int, cond: int, raters: int, created: float, p: float | None) -> ReviewItem:
    return ReviewItem(
        id=f"ri-{i:04d}",
        condition=CONDS[cond],
        image_key=f"feedback/images/{i}.png",
        image_sha256=f"{i:064x}",
        raters_per_item=raters,
        created=created,
        p_aligned=p,
        scored_by="cells@0" if p is not None else "",
    )


write = st.one_of(
    st.tuples(
        st.just("item"),
        st.integers(0, 1),
        st.integers(1, 3),
        st.integers(0, 50),
        st.none() | st.floats(0, 1),
    ),
    st.tuples(
        st.just("record"),
        st.integers(0, 3),
        st.integers(-2, 20),  # item index; < 0 = a judgement of an uploaded image, no item
        st.booleans(),
        st.integers(0, 50),
        st.integers(0, 5000),
    ),
    st.tuples(st.just("score"), st.integers(0, 20), st.integers(0, 1), st.floats(0, 1)),
)


def build(
    ops: list[tuple[Any, ...]],
) -> tuple[list[ReviewItem], list[FeedbackRecord], list[tuple[str, str, float]]]:
    items: list[ReviewItem] = []
    records: list[FeedbackRecord] = []
    scores: list[tuple[str, str, float]] = []
    for n, op in enumerate(ops):
        if op[0] == "item":
            _, cond, raters, created, p = op
            items.append(item(len(items), cond, raters, float(created), p))
        elif op[0] == "record":
            _, rater, target, plausible, created, ms = op
            it = items[target % len(items)] if target >= 0 and items else None
            records.append(
                FeedbackRecord(
                    id=f"fb-{n:04d}",
                    client_request_id=str(n),
                    rater_id=RATERS[rater],
                    condition=it.condition if it is not None else CONDS[-target % 2],
                    plausible=plausible,
                    image_key="k",
                    image_sha256=it.image_sha256 if it is not None else f"up{target}",
                    item_id=it.id if it is not None else "",
                    time_spent_ms=ms,
                    created=float(created),
                )
            )
        else:
            _, target, ref, p = op
            scores.append((f"ri-{target:04d}", REFS[ref], p))
    return items, records, scores


def feed(
    strategy: str,
    items: list[ReviewItem],
    records: list[FeedbackRecord],
    scores: list[tuple[str, str, float]],
    order: list[int],
) -> tuple[QueueIndex, agr.AgreementIndex]:
    queue, agreement = QueueIndex(strategy_named(strategy)), agr.AgreementIndex()
    board = ScoreBoard(queue)
    writes: list[Any] = [*items, *records]
    for i in order:
        w = writes[i]
        if isinstance(w, ReviewItem):
            queue.add_item(w)
        else:
            queue.add_record(w)
            agreement.add(
                w.id,
                scope=w.condition.key,
                group=w.image_group,
                rater=w.rater_id,
                plausible=w.plausible,
                created=w.created,
                time_spent_ms=w.time_spent_ms,
            )
    for iid, ref, p in scores:
        board[iid] = (ref, p)
    return queue, agreement


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(write, max_size=60),
    strategy=st.sampled_from(sorted(STRATEGIES)),
    shuffle_seed=st.integers(0, 2**16),
)
def test_incremental_index_equals_full_recomputation(ops, strategy, shuffle_seed) -> None:
    items, records, score_writes = build(ops)
    scores: dict[str, tuple[str, float]] = {}
    for iid, ref, p in score_writes:
        scores[iid] = (ref, p)
    n = len(items) + len(records)
    in_order = list(range(n))
    shuffled = in_order[:]
    random.Random(shuffle_seed).shuffle(shuffled)  # what a restart's listing order may be
    for order in (in_order, shuffled):
        queue, agreement = feed(strategy, items, records, score_writes, order)
        for condition in (None, *CONDS):
            for rater in RATERS:
                got = queue.next(rater, condition, 100)
                want, pending = ref_next(
                    items, records, scores, strategy_named(strategy), rater, condition, 100
                )
                assert [(q.item.id, q.judgements, q.p_aligned, q.scored_by) for q in got] == want
                assert queue.pending(condition) == pending
            want_conds, want_raters = ref_agreement(records, condition)
            scopes = [condition.key] if condition is not None else agreement.scopes()
            assert scopes == [k for k, _ in want_conds]
            for key, want_agr in want_conds:
                assert_same_agreement(agreement.agreement(key), want_agr)
            scope = condition.key if condition is not None else None
            assert_same_raters(agreement.rater_stats(scope), want_raters)
        # The scoring work list: exactly the open items not yet scored by that model.
        for cond in CONDS:
            for ref in REFS:
                open_ids = {
                    i
                    for i, *_ in ref_next(
                        items, records, scores, strategy_named(strategy), "nobody", cond, 10**6
                    )[0]
                }
                want_stale = {i for i in open_ids if scores.get(i, ("",))[0] != ref}
                assert {it.id for it in queue.stale(cond, ref, 10**6)} == want_stale


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(write, max_size=40))
def test_least_certain_is_the_original_order(ops) -> None:
    items, _, score_writes = build([op for op in ops if op[0] != "record"])
    scores = {iid: (ref, p) for iid, ref, p in score_writes}
    queue, _ = feed("least_certain", items, [], score_writes, list(range(len(items))))
    got = [q.item.id for q in queue.next("r0", None, 10**6)]
    assert got == ref_least_certain_order(items, scores)


def test_unknown_review_order_names_the_setting() -> None:
    from clinisynth_server.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        strategy_named("fifo")
    assert info.value.violations[0].field == "review_order"


def test_the_service_index_survives_a_restart(tmp_path) -> None:
    """Built once from the store at start, updated on writes: the same answers after restart."""
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.reward.service import Reward
    from clinisynth_server.triton.client import TritonClient

    store = open_store(str(tmp_path / "store"))
    rng = random.Random(7)
    ops: list[tuple[Any, ...]] = [
        ("item", rng.randrange(2), rng.randint(1, 3), i, None) for i in range(30)
    ]
    ops += [
        (
            "record",
            rng.randrange(4),
            rng.randrange(30),
            rng.random() < 0.6,
            100 + i,
            rng.randrange(9000),
        )
        for i in range(60)
    ]
    items, records, _ = build(ops)
    early = FeedbackStore(store)
    for it in items[:20]:
        early.add_item(it)
    for r in records[:30]:
        early.add(r)

    def service() -> Reward:
        # No reward model in the catalog: nothing is scored, so no Triton call is made.
        return Reward(Catalog(store, ttl_s=0), TritonClient("127.0.0.1:1"), store)

    def answers(reward: Reward) -> list[Any]:
        out: list[Any] = []
        for condition in (None, *CONDS):
            for rater in RATERS:
                got, pending = reward.next_items(rater, condition=condition, limit=100)
                out.append(([q.item.id for q in got], pending))
            report = reward.agreement(condition)
            out.append([(c.condition.key, c.agreement) for c in report.conditions])
            out.append(report.raters)
        return out

    first = service()
    for it in items[20:]:
        first.feedback.add_item(it)
    for r in records[30:]:
        first.feedback.add(r)
    before = answers(first)
    after = answers(service())
    assert repr(before) == repr(after)  # repr: NaN == NaN
    for condition in (None, *CONDS):
        for rater in RATERS:
            want, pending = ref_next(items, records, {}, strategy_named(""), rater, condition, 100)
            got, got_pending = first.next_items(rater, condition=condition, limit=100)
            assert [q.item.id for q in got] == [w[0] for w in want] and got_pending == pending
        want_conds, want_raters = ref_agreement(records, condition)
        report = first.agreement(condition)
        assert [c.condition.key for c in report.conditions] == [k for k, _ in want_conds]
        for c, (_, want_agr) in zip(report.conditions, want_conds, strict=True):
            assert_same_agreement(c.agreement, want_agr)
        assert_same_raters(report.raters, want_raters)
