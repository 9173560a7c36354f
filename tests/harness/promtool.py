"""Prometheus' own checker (Debian's `prometheus` package) and the metric names a PromQL
expression reads, for the tests of /metrics, the alert rules and the Grafana dashboard."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.harness.replay import ROOT

DEPLOY = ROOT / "scripts" / "deploy"
RULES = DEPLOY / "prometheus" / "lifec-registry.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "lifec-registry.rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "lifec-registry.json"

#: Series Prometheus makes itself for every scrape target, not the mirror.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promtool(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool (`input` on its stdin); a machine without it fails the test with what to install."""
    exe = shutil.which("promtool")
    assert exe, "promtool is not installed: apt-get install prometheus (scripts/setup installs it)"
    return subprocess.run([exe, *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=60)


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as a query would have them."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, function calls, keywords and numbers are taken out."""
    text = _STRING.sub('""', expr)
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # the exponent or unit of a number, e.g. 1e3
        names.add(m.group())
    return names
