"""Review-queue benchmark: ``next_items`` and ``agreement`` at 10 k and 100 k judgements.

Side by side in one run, each size in its own store: write N judgements of N / 2 review items
(2 conditions, 50 raters, up to 3 raters per item) as the service stores them, start the reward
service over the store (the index is rebuilt once, here), then time ``next_items`` (a rater, one
condition, 10 items) and ``agreement`` (one condition, and all) through the service facade,
``--calls`` times each. Medians are compared: the goal is sub-linear cost, a 100 k / 10 k ratio
well under 10 (a scan of every record per call gives about 10). No reward model is registered,
so nothing is scored and no Triton server is needed.

    clinisynth benchmark reward_queue [--sizes 10000,100000] [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clinisynth_server.reward.scoring import Condition
    from clinisynth_server.reward.service import Reward


def _populate(root: pathlib.Path, n_records: int, seed: int) -> None:
    """Objects in the store's layout; written as plain files (setup speed: no fsync per file)."""
    from clinisynth_server.reward.feedback import (
        ITEMS_PREFIX,
        RECORDS_PREFIX,
        FeedbackRecord,
        ReviewItem,
    )
    from clinisynth_server.reward.scoring import Condition

    rng = random.Random(seed)
    conds = [Condition(class_name="lymphocyte"), Condition(class_name="neutrophil")]
    raters = [f"rater{i:02d}" for i in range(50)]
    items_dir, records_dir = root / ITEMS_PREFIX, root / RECORDS_PREFIX
    items_dir.mkdir(parents=True)
    records_dir.mkdir(parents=True)
    items = []
    for i in range(n_records // 2):
        it = ReviewItem(
            id=f"ri-{i:024x}",
            condition=conds[i % 2],
            image_key=f"feedback/images/{i:064x}.png",
            image_sha256=f"{i:064x}",
            raters_per_item=3,
            created=float(i),
            p_aligned=rng.random(),
            scored_by="cells@1",
        )
        items.append(it)
        (items_dir / f"{it.id}.json").write_text(json.dumps(it.to_json()))
    judged: set[tuple[str, str]] = set()
    n = 0
    while n < n_records:
        it, rater = rng.choice(items), rng.choice(raters)
        if (it.id, rater) in judged:
            continue
        judged.add((it.id, rater))
        rec = FeedbackRecord(
            id=f"fb-{n:032x}",
            client_request_id=str(n),
            rater_id=rater,
            condition=it.condition,
            plausible=rng.random() < 0.7,
            image_key=it.image_key,
            image_sha256=it.image_sha256,
            item_id=it.id,
            time_spent_ms=rng.randrange(500, 20000),
            created=1e6 + n,
        )
        (records_dir / f"{rec.id}.json").write_text(json.dumps(rec.to_json()))
        n += 1


def _median_ms(fn: Callable[[int], object], calls: int) -> float:
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _medians(reward: Reward, cond: Condition, calls: int) -> dict[str, float]:
    return {
        "next_items_ms": _median_ms(
            lambda i: reward.next_items(f"rater{i % 50:02d}", condition=cond, limit=10), calls
        ),
        "agreement_ms": _median_ms(lambda i: reward.agreement(cond), calls),
        "agreement_all_ms": _median_ms(lambda i: reward.agreement(None), calls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark reward_queue", description=__doc__)
    parser.add_argument("--sizes", default="10000,100000", help="judgement counts, small,large")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per operation")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)

    from clinisynth_server.catalog import Catalog
    from clinisynth_server.reward.scoring import Condition
    from clinisynth_server.reward.service import Reward
    from clinisynth_server.store import open_store
    from clinisynth_server.triton.client import TritonClient

    sizes = [int(s) for s in ns.sizes.split(",")]
    cond = Condition(class_name="lymphocyte")
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-queue-"))
        t0 = time.perf_counter()
        _populate(work / "store", size, ns.seed)
        setup_s = time.perf_counter() - t0
        store = open_store(str(work / "store"))
        t0 = time.perf_counter()
        reward = Reward(Catalog(store, ttl_s=60), TritonClient("127.0.0.1:1"), store)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reward.feedback.refresh()  # a full store listing: at most once per refresh interval
        listing_ms = (time.perf_counter() - t0) * 1e3
        # Timed with the replica refresh out of the way, so the medians measure the index.
        reward.refresh_interval_s = 3600.0
        reward.next_items("rater00", condition=cond, limit=10)  # warm caches (catalog)
        row = _medians(reward, cond, ns.calls)
        row.update(start_s=start_s, listing_ms=listing_ms)
        results[size] = row
        print(
            f"{size:>7} judgements: next_items {row['next_items_ms']:.3f} ms, "
            f"agreement(condition) {row['agreement_ms']:.3f} ms, "
            f"agreement(all) {row['agreement_all_ms']:.3f} ms (medians of {ns.calls}); "
            f"start (index rebuild) {start_s:.1f} s, store listing {listing_ms:.0f} ms, "
            f"setup {setup_s:.1f} s",
            flush=True,
        )
    small, large = results[sizes[0]], results[sizes[-1]]
    factor = sizes[-1] / sizes[0]
    print(f"ratio {sizes[-1]} / {sizes[0]} (linear would be {factor:g}):")
    ok = True
    for key in ("next_items_ms", "agreement_ms", "agreement_all_ms"):
        ratio = large[key] / small[key]
        ok &= ratio < factor / 2
        print(f"  {key[:-3]:<16} {ratio:6.2f}")
    print("sub-linear: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
