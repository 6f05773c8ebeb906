"""The chart's dashboard and alert rules against a real Prometheus scraping real relays.

Two relay replicas (logical replication source, webhook sink), as the chart's Deployment runs
them, relay a few hundred events while the receiver refuses one event for good (a dead letter)
and answers 503 to another aggregate until Prometheus has seen everything (a blocked aggregate,
retries, publish failures, a backlog, WAL held by the slot). Then the active replica is frozen
until the other takes over, and resumes as a standby still exporting its last backlog.
Prometheus scrapes both every second, labelled as a ServiceMonitor labels them, with the chart's
rules loaded. Every query of the dashboard, panels and variables, must show data through
Prometheus' HTTP API, the panels must show the end state the active replica sees, and every
rule must evaluate cleanly."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from outbox_relay.config import parse_config
from outbox_relay.outbox import write_event
from tests.deploy.monitoring import (
    JOB,
    NAMESPACE,
    RULES_FILE,
    DashboardQuery,
    dashboard,
    panel_queries,
    rule_groups,
    rules_text,
    variable_queries,
)
from tests.harness.prometheus import PrometheusServer, start_prometheus
from tests.harness.webhook import Reply, Request, WebhookReceiver
from tests.support import (
    free_port,
    http_get,
    source_setup_sql,
    start_relay,
    stop_relay,
    wait_for,
    write_config,
)

OUTBOX = "orders"
#: Two replicas as the chart's Deployment runs them: one active, one standby.
PODS = ["orders-outbox-relay-0", "orders-outbox-relay-1"]
SCRAPE_INTERVAL_S = 1
#: Grafana's $__rate_interval: at least four scrape intervals (the range query's step is 1s).
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_S}s"
#: (namespace, outbox) as a Grafana user picks them: one of each, and "All" (the allValue).
SELECTIONS = [(NAMESPACE, OUTBOX), (".*", ".*")]
POISON, FLAKY = "order-poison", "order-flaky"
#: Dashboard queries allowed to show no data, each with the reason. None: the scenario makes
#: every panel show something; add one here only with a reason that holds for every relay.
EXCUSED: dict[str, str] = {}
#: Alerts the scenario must make pending (their `for:` is longer than the test).
EXPECTED_ALERTS = {"OutboxRelayDeadLetters", "OutboxRelayPublishFailures"}
#: What some panels show once the scenario is over (sorted values, one per series), selecting
#: the release's outbox: the poison event parked, all else delivered by the replica that took
#: over (the demoted one still exports its last backlog: it must not count), database and
#: webhook up.
EXPECTED_AT_THE_END = {
    "Active relays": [1.0],
    "Dead letters": [1.0],
    "Leader (lease holder)": [0.0, 1.0],
    "Database and broker up": [1.0, 1.0],
    "Lag (oldest unpublished)": [0.0],
    "Lag": [0.0],
    "Pending events": [0.0],
    "In-flight events": [0.0],
    "Blocked aggregates": [0.0],
}
#: The whole scenario, from starting the relay to the last query (a run takes about 10 s).
TIMEOUT_S = 40.0


class Receiver:
    """The webhook's answers: 422 for the poison event (a permanent refusal: dead-lettered at
    once, its aggregate moves on), 503 for the flaky aggregate while `failing` is set (retried,
    holding its aggregate back), 200 for the rest (their event ids are `taken`)."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.taken: set[str] = set()
        self._lock = threading.Lock()

    def reply(self, request: Request) -> Reply | None:
        if request.headers.get("x-outbox-header-test-case") == "poison":
            return Reply(422, body=b"order total must not be negative")
        if request.headers.get("x-outbox-aggregate-id") == FLAKY and self.failing.is_set():
            return Reply(503, body=b"down for maintenance")
        with self._lock:
            self.taken.add(request.headers["x-outbox-event-id"])
        return None

    def taken_count(self) -> int:
        with self._lock:
            return len(self.taken)


def _relay_config(dsn: str, url: str, port: int) -> dict[str, Any]:
    return {
        "outboxes": [
            {
                "name": OUTBOX,
                "source": {"type": "postgres-logical", "dsn": dsn, "poll_interval": "100ms"},
                "sink": {"type": "webhook", "url": url},
                "retry": {"initial": "100ms", "max": "500ms"},
                "pipeline": {"stats_interval": "200ms"},
                # A quick takeover when the active replica freezes.
                "lease": {"time": "2s", "check_interval": "500ms"},
            }
        ],
        "http": {"port": port, "host": "127.0.0.1"},
        "log": {"format": "json", "level": "info"},
    }


def _init_db(config: dict[str, Any]) -> None:
    """What `init-db` sets up for the logical source: publication and slot."""
    source_dsn, statements = source_setup_sql(parse_config(config, "relay.yaml", {}).outboxes[0])
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _write_events(dsn: str) -> int:
    """300 events over 10 aggregates, then the poison event and the flaky aggregate, each with
    followers; returns how many the receiver takes in the end."""
    with psycopg.connect(dsn) as conn:
        for i in range(300):
            write_event(conn, "order", f"order-{i % 10}", "OrderUpdated", {"seq": i})
        conn.commit()
        for aggregate in (POISON, FLAKY):
            for i in range(4):
                poison = aggregate == POISON and i == 0
                headers = {"test-case": "poison"} if poison else None
                write_event(conn, "order", aggregate, "OrderUpdated", {"seq": i}, headers)
            conn.commit()
    return 300 + 3 + 4


def _prometheus_config(relay_ports: list[int]) -> str:
    """One job as a ServiceMonitor makes it: job = the Service's name, namespace and pod labels."""
    targets = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
        for port, pod in zip(relay_ports, PODS, strict=True)
    ]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "1s"},
        "rule_files": [RULES_FILE],
        "scrape_configs": [
            {"job_name": JOB, "scrape_timeout": f"{SCRAPE_INTERVAL_S}s", "static_configs": targets}
        ],
    }
    return yaml.safe_dump(config)


def grafana_expr(expr: str, namespace: str, outbox: str) -> str:
    """The query Grafana sends for this selection; every variable must be known here."""
    sent = expr.replace("$__rate_interval", RATE_INTERVAL)
    sent = sent.replace("$namespace", namespace).replace("$outbox", outbox)
    assert "$" not in sent, f"a Grafana variable this test does not know: {expr}"
    return sent


def _legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def _problem(prometheus: PrometheusServer, query: DashboardQuery, sent: str, since: float) -> str | None:
    """Why the panel would show nothing (or a legend without its labels), or None. A stat panel
    (instant) needs a number now; a time series needs a number other than 0 at some point since
    `since` (a panel of zeros hides a wrong selector)."""
    if query.instant:
        series = prometheus.query(sent)
        values = [float(s["value"][1]) for s in series]
        shown = bool(values) and all(math.isfinite(v) for v in values)
    else:
        series = prometheus.query_range(sent, since, time.time(), SCRAPE_INTERVAL_S)
        values = [float(v) for s in series for _, v in s["values"]]
        shown = any(math.isfinite(v) and v != 0 for v in values)
    if not shown:
        return f"no data: {values[:5]}"
    unlabelled = [s["metric"] for s in series if not _legend_labels(query.legend) <= s["metric"].keys()]
    return f"legend {query.legend!r} names labels missing from {unlabelled}" if unlabelled else None


def _panels_without_data(prometheus: PrometheusServer, since: float) -> list[str]:
    missing = []
    for query in panel_queries(dashboard()):
        for namespace, outbox in SELECTIONS:
            sent = grafana_expr(query.expr, namespace, outbox)
            problem = _problem(prometheus, query, sent, since)
            if problem is not None and query.where not in EXCUSED:
                missing.append(f"{query.where}: {sent}: {problem}")
    return missing


def _wait_for_every_panel(prometheus: PrometheusServer, since: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while missing := _panels_without_data(prometheus, since):
        if time.monotonic() > deadline:
            raise AssertionError(f"panels without data after {timeout:g}s:\n" + "\n".join(missing))
        time.sleep(0.5)


def _values_now(prometheus: PrometheusServer) -> dict[str, list[float]]:
    """The panels of EXPECTED_AT_THE_END as an instant query now gives them."""
    return {
        query.title: sorted(float(s["value"][1]) for s in prometheus.query(sent))
        for query in panel_queries(dashboard())
        if query.title in EXPECTED_AT_THE_END
        for sent in [grafana_expr(query.expr, NAMESPACE, OUTBOX)]
    }


def _wait_for_the_end_state(prometheus: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := _values_now(prometheus)) != EXPECTED_AT_THE_END:
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g}s the panels show {now}, not {EXPECTED_AT_THE_END}")
        time.sleep(0.5)


def _variable_values(prometheus: PrometheusServer, query: DashboardQuery) -> list[str]:
    """label_values(selector, label) as Grafana asks for it, with namespace "All"."""
    inner = grafana_expr(query.expr, ".*", ".*").removeprefix("label_values(").removesuffix(")")
    selector, label = (part.strip() for part in inner.rsplit(",", 1))
    return prometheus.label_values(label, selector)


def _active_alerts(prometheus: PrometheusServer) -> set[str]:
    return {alert["labels"]["alertname"] for alert in prometheus.alerts()}


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts a private Prometheus scraping the relays on these ports, with the chart's rules."""
    started: list[PrometheusServer] = []

    def start(relay_ports: list[int]) -> PrometheusServer:
        files = {RULES_FILE: rules_text(rule_groups())}
        server = start_prometheus(_prometheus_config(relay_ports), files=files, tmp_root=str(tmp_path))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        server.close()


@dataclass(frozen=True)
class Replica:
    pod: str
    port: int
    process: Any  # subprocess.Popen


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Any]:
    """Starts the relay replicas, each on its own HTTP port; stops them by PID (SIGTERM, exit 0)."""
    started: list[Replica] = []

    def start(config_for: Any) -> list[Replica]:
        for index, pod in enumerate(PODS):
            port = free_port()
            path = write_config(tmp_path, config_for(port), f"relay-{index}.yaml")
            started.append(Replica(pod, port, start_relay(path, log=tmp_path / f"relay-{index}.log")))
        return list(started)

    yield start
    for replica in started:
        if replica.process.poll() is None:
            os.kill(replica.process.pid, signal.SIGCONT)  # (in case the test failed while it was frozen)
            stop_relay(replica.process)


def _leader(prometheus: PrometheusServer, pod: str) -> list[float]:
    series = prometheus.query(f'outbox_relay_leader{{job="{JOB}", pod="{pod}"}}')
    return [float(s["value"][1]) for s in series]


def _fail_over(prometheus: PrometheusServer, replicas: list[Replica], timeout: float) -> None:
    """Freeze the active replica (SIGSTOP) until the other takes over, then let it go on: it finds
    its lease lost and goes back to standby, still exporting the backlog it last measured."""
    deadline = time.monotonic() + timeout
    (active,) = [r for r in replicas if _leader(prometheus, r.pod) == [1.0]]
    (other,) = [r for r in replicas if r is not active]
    os.kill(active.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _leader(prometheus, other.pod) == [1.0], deadline - time.monotonic(), "a takeover")
    finally:
        os.kill(active.process.pid, signal.SIGCONT)
    wait_for(lambda: _leader(prometheus, active.pod) == [0.0], deadline - time.monotonic(), "the demotion")


@pytest.mark.timeout(TIMEOUT_S + 30)  # (+ stopping the relays and Prometheus)
def test_every_dashboard_query_shows_data_and_every_rule_evaluates_on_a_live_scrape(
    dsn: str, webhook_receiver: WebhookReceiver, replicas: Any, prometheus_for: Any
) -> None:
    deadline = time.monotonic() + TIMEOUT_S

    def left() -> float:
        return deadline - time.monotonic()

    receiver = Receiver()
    webhook_receiver.respond_with(receiver.reply)
    _init_db(_relay_config(dsn, webhook_receiver.url, 0))
    started = replicas(lambda port: _relay_config(dsn, webhook_receiver.url, port))
    readyz = [f"http://127.0.0.1:{r.port}/readyz" for r in started]
    wait_for(lambda: all(_answers(url) for url in readyz), left(), "the relays' HTTP ports")
    prometheus = prometheus_for([r.port for r in started])
    since = time.time()
    # Scraped before the burst (a counter first seen after it has no rate), one replica active.
    scraped = f'sum(outbox_relay_leader{{job="{JOB}"}}) == 1 and count(up{{job="{JOB}"}} == 1) == 2'
    wait_for(lambda: prometheus.query(scraped), left(), "both replicas scraped, one active", 0.2)
    delivered = _write_events(dsn)
    _wait_for_every_panel(prometheus, since, timeout=left())
    wait_for(lambda: _active_alerts(prometheus) >= EXPECTED_ALERTS, left(), "the alerts", 0.5)
    _fail_over(prometheus, started, timeout=left())
    receiver.failing.clear()
    wait_for(lambda: receiver.taken_count() >= delivered, left(), "every other event delivered")
    _wait_for_the_end_state(prometheus, timeout=left())
    # (The new holder's series start the alerts' `for:` anew: pending again at the next evaluation.)
    wait_for(
        lambda: _active_alerts(prometheus) >= EXPECTED_ALERTS, left(), "the alerts after the takeover", 0.5
    )
    _assert_live_results(prometheus, since)


def _answers(url: str) -> bool:
    try:
        http_get(url)
    except OSError:
        return False
    return True


def _assert_live_results(prometheus: PrometheusServer, since: float) -> None:
    assert _panels_without_data(prometheus, since) == []
    values = {q.where: _variable_values(prometheus, q) for q in variable_queries(dashboard())}
    assert values == {"variable namespace": [NAMESPACE], "variable outbox": [OUTBOX]}
    unhealthy = [(r["name"], r.get("lastError")) for r in prometheus.rules() if r["health"] != "ok"]
    assert unhealthy == []
    alerts = prometheus.alerts()
    active = {alert["labels"]["alertname"] for alert in alerts}
    assert active >= EXPECTED_ALERTS
    # Prometheus renders a template it cannot expand as text, not as an evaluation error.
    texts = [text for alert in alerts for text in alert["annotations"].values()]
    assert texts
    assert [t for t in texts if "<no value>" in t or "error expanding" in t] == []
    assert not active & {"OutboxRelayAbsent", "OutboxRelayNoLeader", "OutboxRelaySetupProblem"}
