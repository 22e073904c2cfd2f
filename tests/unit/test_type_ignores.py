"""Every ``# type: ignore`` left in the typed code names its error code and says why.

mypy (``make lint``) rejects ignores that no longer silence anything; this keeps the rest
honest: an ignore is a claim that the checker or a stub is wrong, and the claim is written down
(a trailing ``# reason`` or a comment line right above).
"""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# The SDK modules (clients/clinisynth/_*.py) join once their rewrite lands.
ROOTS = ("services", "clients")
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[^\]]*\])?(?P<rest>.*)$")


def _python_files() -> list[pathlib.Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py"))


def _problems(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = IGNORE.search(line)
        if m is None:
            continue
        where = f"{name}:{i + 1}"
        if not m.group("codes") or m.group("codes") == "[]":
            out.append(f"{where}: no error code")
        reason_after = m.group("rest").strip().startswith("#")
        reason_above = i > 0 and lines[i - 1].strip().startswith("#")
        if not (reason_after or reason_above):
            out.append(f"{where}: no reason")
    return out


def test_the_scan_sees_the_typed_code() -> None:
    files = _python_files()
    assert len(files) > 100  # services/ alone has well over a hundred modules
    assert any(p.name == "server.py" and "runtime" in p.parts for p in files)


@pytest.mark.parametrize(
    "line, ok",
    [
        ("x = f()  # type: ignore[attr-defined]  # stub lacks f", True),
        ("x = f()  # type: ignore[attr-defined]", False),
        ("x = f()  # type: ignore  # no code", False),
        ("# the stub lacks f\nx = f()  # type: ignore[attr-defined]", True),
        ("x = f()", True),
    ],
)
def test_rule(line: str, ok: bool) -> None:
    assert (_problems("x = 1\n" + line + "\n", "probe.py") == []) is ok


def test_every_ignore_has_a_code_and_a_reason() -> None:
    problems = [
        problem
        for path in _python_files()
        for problem in _problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert problems == []
