"""Pull the metric names out of a PromQL expression (for checking them against metrics.yaml).

Not a PromQL parser: it removes everything that can hold an identifier that is not a metric
name — string literals, label matchers `{...}`, range/subquery brackets `[...]`, grouping clauses
`by (...)` / `without (...)` / `on (...)` / `ignoring (...)` / `group_left (...)` /
`group_right (...)`, Grafana variables, `offset <duration>` — then keeps the identifiers that are
not function calls, keywords or numbers. Tests in test_metrics_catalogue.py pin its behaviour.
"""

from __future__ import annotations

import re

KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
        "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
    }
)  # fmt: skip

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_AT = re.compile(r"@\s*(?:start\(\)|end\(\)|[0-9.]+)")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by `expr` (selectors written as {__name__="x"} included)."""
    names = set(re.findall(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', expr))
    text = _STRING.sub(" ", expr.replace("\\\n", " "))
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    for ident, call in _IDENT.findall(text):
        if call or ident.lower() in KEYWORDS:
            continue
        names.add(ident)
    return names


_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def base_name(name: str, histograms: set[str]) -> str:
    """`x_bucket` / `x_sum` / `x_count` -> `x` when x is a catalogued histogram."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return name


def label_values_metric(query: str) -> str | None:
    """The expression inside a Grafana `label_values(expr, label)` / `query_result(expr)`."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    if m:
        return m.group(1)
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return None  # label_values(label): no metric
    m = re.fullmatch(r"\s*(?:query_result|metrics)\((.*)\)\s*", query, re.DOTALL)
    return m.group(1) if m else query
