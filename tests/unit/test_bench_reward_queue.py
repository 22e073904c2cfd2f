"""The review-queue benchmark runs in CI at small sizes (its figures are for benchmark runs)."""

from __future__ import annotations

import re

import pytest

from clinisynth_lab.benchmarks import reward_queue


def test_reward_queue_benchmark_prints_its_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    rc = reward_queue.main(["--sizes", "200,2000", "--calls", "15"])
    out = capsys.readouterr().out
    # Timing decides the verdict and the exit code; the test asserts only that both sizes ran
    # through the service facade and every ratio was computed and printed.
    assert rc in (0, 1)
    assert re.search(r"^\s+200 judgements: next_items [\d.]+ ms", out, re.M), out
    assert re.search(r"^\s*2000 judgements: next_items [\d.]+ ms", out, re.M), out
    for op in ("next_items", "agreement", "agreement_all"):
        assert re.search(rf"^  {op}\s+[\d.]+$", out, re.M), out
    assert re.search(r"^sub-linear: (yes|NO)$", out, re.M)
