"""The Grafana dashboard and the Prometheus alert rules in deploy/ query only what a real server's
GET /metrics exports: every metric name in every query (histogram series by their _bucket, _sum
and _count samples) and every label a query selects or groups by, checked against a scrape of
`potluck up` after a request."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "potluck-dashboard.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
# Series Prometheus makes itself for every target; no /metrics has them.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "inf", "nan"}  # fmt: skip
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")


def _plain(expr: str) -> str:
    """`expr` with string literals emptied and Grafana's $variables dropped."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    return re.sub(r"\$\{\w+\}|\$\w+", "", expr)


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions (followed
    by '('), keywords, label names (in {...} or a by/without/on clause) or parts of numbers and
    durations."""
    text = GROUPING.sub("", re.sub(r"\[[^\]]*\]", "", re.sub(r"\{[^}]*\}", "", _plain(expr))))
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before, after = text[: match.start()], text[match.end():].lstrip()
        if match[0].lower() in KEYWORDS or after.startswith("(") or re.search(r"[0-9.]$", before):
            continue
        names.add(match[0])
    return names


def promql_labels(expr: str) -> dict[str, set[str]]:
    """Label names per metric selected with {...}, and under "" those of by/without/on clauses."""
    text = _plain(expr)
    labels: dict[str, set[str]] = {"": set()}
    for metric, matchers in SELECTOR.findall(text):
        labels.setdefault(metric, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for clause in GROUPING.findall(text):
        labels[""].update(label.strip() for label in clause.split(",") if label.strip())
    return labels


def test_promql_parsing_finds_metrics_and_labels() -> None:
    # The checks below are only as good as this parsing: it must neither miss names nor invent them.
    expr = ('histogram_quantile(0.9, sum by (le) (rate(potluck_ttft_seconds_bucket{agent=~"$agent"}'
            '[$__rate_interval]))) / on(agent) group_left potluck_x_total offset 5m > 1e3 and up == 0')
    assert promql_metrics(expr) == {"potluck_ttft_seconds_bucket", "potluck_x_total", "up"}
    assert promql_labels(expr) == {"": {"le", "agent"}, "potluck_ttft_seconds_bucket": {"agent"}}


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            yield f"{DASHBOARD.name}: panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
            yield f"{DASHBOARD.name}: variable {variable['name']!r}", f"{match[1]}{{{match[2]}!=\"\"}}"


def rule_queries() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"{RULES.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


@pytest.fixture(scope="module")
def scraped(base_url: str, client: OpenAI, model_id: str) -> dict[str, set[str]]:
    """Sample name -> label names of a /metrics scrape taken after a completed request."""
    client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_query_names_an_exported_metric_and_label(scraped: dict[str, set[str]]) -> None:
    exported = scraped | PROMETHEUS_SERIES
    queries = [*dashboard_queries(), *rule_queries()]
    problems, used = [], set()
    for where, expr in queries:
        metrics = promql_metrics(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        used |= metrics
        problems += [f"{where}: {name} is not in /metrics" for name in sorted(metrics - exported.keys())]
        labels = promql_labels(expr)
        for metric, names in labels.items():
            # Grouping labels may come from any metric of the query; a selector's from its own.
            have = exported.get(metric, set()) if metric else set().union(*(exported.get(m, set()) for m in metrics))
            problems += [f"{where}: {metric or 'grouping'} has no label {n!r}" for n in sorted(names - have)]
    assert not problems, "\n".join(problems)
    assert len(queries) >= 20 and len(used) >= 15  # the dashboard covers the server, not one corner


def test_dashboard_covers_the_issues_panels(scraped: dict[str, set[str]]) -> None:
    used = set().union(*(promql_metrics(e) for _, e in dashboard_queries()))
    for metric in ("potluck_time_to_first_token_seconds_bucket", "potluck_generation_tokens_total",
                   "potluck_requests_total", "potluck_agent_expert_cache_hits_total",
                   "potluck_agent_disk_read_bytes_total", "potluck_agent_link_sent_bytes_total",
                   "potluck_requests_waiting", "potluck_requests_running"):  # fmt: skip
        assert metric in used and metric in scraped, metric
