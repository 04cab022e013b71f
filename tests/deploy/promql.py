"""Just enough PromQL reading for the monitoring tests: which metrics a query names, and which aggregation
operator (sum, max, ...) encloses each of them. Label matchers, strings and ranges are skipped whole."""

from __future__ import annotations

import re
from dataclasses import dataclass

AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "limitk", "limit_ratio",
})
# Keywords followed by a parenthesized label list, not an expression.
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = LABEL_LISTS | frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|\{[^}]*\}|\[[^\]]*\]|[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d+)?|\S'
)
FUNCTION = re.compile(r"[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


@dataclass(frozen=True)
class Use:
    """One metric named in a query, with the innermost aggregation around it (None: not aggregated)."""

    metric: str
    aggregation: str | None
    functions: tuple[str, ...]  # every enclosing call, outermost first (rate, histogram_quantile, ...)


def base_name(series: str) -> str:
    """The metric family of a series name (counter and histogram suffixes removed)."""
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def uses(expr: str) -> list[Use]:
    """Every metric in the query with what encloses it."""
    tokens = TOKEN.findall(expr)
    stack: list[str] = []  # one entry per open parenthesis: the call it belongs to ("" for grouping)
    pending: str | None = None  # an aggregation whose `by (...)` came before its argument
    out: list[Use] = []
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        prev = tokens[i - 1] if i else ""
        if tok == "(":
            if prev in LABEL_LISTS:
                stack.append("<labels>")
            elif prev in AGGREGATIONS or (pending and prev == ")"):
                stack.append(prev if prev in AGGREGATIONS else pending or "")
                pending = None
            elif FUNCTION.fullmatch(prev) and prev not in KEYWORDS:
                stack.append(prev)
            else:
                stack.append("")
            continue
        if tok == ")":
            stack.pop()
            continue
        if tok in AGGREGATIONS and nxt in ("by", "without"):
            pending = tok
            continue
        if "<labels>" in stack or tok in KEYWORDS or tok in AGGREGATIONS or nxt == "(":
            continue
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok):
            calls = tuple(s for s in stack if s)
            aggregation = next((s for s in reversed(calls) if s in AGGREGATIONS), None)
            out.append(Use(tok, aggregation, calls))
    return out
