"""The Helm chart, linted and rendered by Helm's own engine (helm-python-sdk bundles Helm v4's Go
library: no helm binary, no cluster), the manifests validated against Kubernetes' JSON schemas
(kubernetes-validate ships them) and checked for the chart's contract: probes, the config where
the image's CMD reads it, secrets only by reference, the security context, the PDB, the alerts."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from outbox_relay import metrics
from tests.deploy.support import CHART, container_env, final_stage, image_cmd, instruction, relay_check

RELEASE, NAMESPACE = "orders", "shop"
FULLNAME = "orders-outbox-relay"
KUBE_VERSIONS = ["1.25.0", "1.37.0"]  # Chart.yaml's kubeVersion floor, and the newest schemas shipped
MONITORING = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
}
SIDECAR = {"mode": "sidecar", "sidecar": {"podSelector": {"app.kubernetes.io/name": "orders-service"}}}
EXAMPLES = CHART / "examples"

Manifests = list[dict[str, Any]]


def render_files(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, str]:
    with helm.Chart.load(str(chart)) as loaded:
        return loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def manifests(files: dict[str, str]) -> Manifests:
    docs: Manifests = []
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> Manifests:
    return manifests(render_files(values, chart))


def only(docs: Manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def kinds(docs: Manifests) -> list[str]:
    return sorted(d["kind"] for d in docs)


def relay_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    (container,) = [c for c in containers if c["name"] == "outbox-relay"]
    return container


def config_text(docs: Manifests) -> str:
    return str(only(docs, "ConfigMap", FULLNAME)["data"]["relay.yaml"])


@pytest.fixture(scope="module")
def default() -> Manifests:
    return render()


@pytest.fixture(scope="module")
def monitoring() -> Manifests:
    return render(MONITORING)


@pytest.fixture(scope="module")
def sidecar_only() -> Manifests:
    return render(SIDECAR)


def _app_chart(tmp: Path) -> Path:
    """The example application chart with this chart as its dependency, exactly as a user gets it
    with `helm dependency build` (the file:// dependency, packaged with .helmignore applied)."""
    shutil.copytree(CHART, tmp / "outbox-relay", ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    app = tmp / "outbox-relay" / "examples" / "app-chart"
    helm.dependency_build(str(app))
    assert [p.name for p in (app / "charts").iterdir()] == ["outbox-relay-0.1.0.tgz"]
    return app


def _sidecar_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((EXAMPLES / "sidecar-values.yaml").read_text())
    return values


@pytest.fixture(scope="module")
def app_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _app_chart(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def sidecar_app(app_chart: Path) -> Manifests:
    return render(_sidecar_values(), app_chart)


def _scenarios() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "default", {}
    yield "monitoring", MONITORING
    yield "sidecar", SIDECAR


# --- lint ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), list(_scenarios()), ids=[n for n, _ in _scenarios()])
def test_lint_is_clean(name: str, values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], report


def test_example_app_chart_lints_clean(app_chart: Path) -> None:
    report = helm.lint(str(app_chart), _sidecar_values(), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


# --- what is rendered ----------------------------------------------------------------------------


def test_default_renders_a_deployment_with_its_companions(default: Manifests) -> None:
    assert kinds(default) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    deployment = only(default, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_monitoring_renders_service_monitor_rule_and_dashboard(monitoring: Manifests) -> None:
    assert kinds(monitoring) == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize(("name", "values"), list(_scenarios()), ids=[n for n, _ in _scenarios()])
def test_manifests_match_the_kubernetes_schemas(name: str, values: dict[str, Any], version: str) -> None:
    unchecked = []
    for doc in render(values):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(doc["apiVersion"])
    # Only the Prometheus Operator's CRDs have no schema in kubernetes-validate.
    assert set(unchecked) <= {"monitoring.coreos.com/v1"}


def test_schema_validation_is_strict(default: Manifests) -> None:
    """The validator above does reject a misspelt field (so passing it means something)."""
    deployment = copy.deepcopy(only(default, "Deployment"))
    context = relay_container(deployment["spec"]["template"]["spec"])["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


# --- probes and ports ----------------------------------------------------------------------------


def _assert_probes(container: dict[str, Any], port: int) -> None:
    (http,) = [p for p in container["ports"] if p["name"] == "relay-http"]
    assert http["containerPort"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "relay-http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "relay-http"}


def test_probes_hit_healthz_and_readyz_on_the_relays_http_port(default: Manifests) -> None:
    container = relay_container(only(default, "Deployment")["spec"]["template"]["spec"])
    _assert_probes(container, 9400)
    service = only(default, "Service")
    assert service["spec"]["ports"] == [
        {"name": "relay-http", "port": 9400, "targetPort": "relay-http", "protocol": "TCP"}
    ]
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_probes_and_service_follow_config_http_port() -> None:
    values: dict[str, Any] = {"config": copy.deepcopy(_chart_values()["config"])}
    values["config"]["http"] = {"port": 9555}
    docs = render(values)
    _assert_probes(relay_container(only(docs, "Deployment")["spec"]["template"]["spec"]), 9555)
    assert only(docs, "Service")["spec"]["ports"][0]["port"] == 9555
    assert "port: 9555" in config_text(docs)


DEFAULT_LEASE_TIME = 5.0  # lease.time's default in the relay (relay/config.py)


def _probe_bounds(probe: dict[str, Any]) -> tuple[int, int]:
    """(worst case, best case) seconds from the moment a pod stops answering to the kubelet
    acting on it: the next probe may come up to a period later, then failureThreshold probes in
    a row each time out. The best case is also the shortest silence that can trigger it."""
    period, timeout, failures = probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"]
    return period + (failures - 1) * period + timeout, (failures - 1) * period + timeout


def test_liveness_restarts_a_silent_pod_well_within_a_minute_but_never_a_merely_busy_one(
    default: Manifests,
) -> None:
    liveness = relay_container(only(default, "Deployment")["spec"]["template"]["spec"])["livenessProbe"]
    worst, shortest_silence = _probe_bounds(liveness)
    assert worst <= 40, "a frozen (SIGSTOP) or hung pod is restarted well within a minute"
    assert shortest_silence >= 20, "a loop busy for some seconds is never taken for a dead one"
    assert liveness["timeoutSeconds"] >= 3, "an answer delayed by a busy loop is not a failure"
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]


def test_readiness_sees_a_takeover_within_the_lease_time(default: Manifests) -> None:
    readiness = relay_container(only(default, "Deployment")["spec"]["template"]["spec"])["readinessProbe"]
    assert readiness["periodSeconds"] <= DEFAULT_LEASE_TIME
    assert readiness["failureThreshold"] == 2, "one late answer does not take a replica out"
    assert readiness["timeoutSeconds"] < readiness["periodSeconds"]
    worst, _ = _probe_bounds(readiness)
    assert worst <= 3 * DEFAULT_LEASE_TIME


def _with_lease(lease: dict[str, Any] | None, period: int, **probe: Any) -> dict[str, Any]:
    config = copy.deepcopy(_chart_values()["config"])
    if lease is None:
        del config["outboxes"][0]["lease"]
    else:
        config["outboxes"][0]["lease"] = lease
    return {"config": config, "readinessProbe": {"periodSeconds": period, **probe}}


@pytest.mark.parametrize(
    ("lease", "period", "ok"),
    [
        (None, 5, True),  # lease.time defaults to 5s
        (None, 6, False),
        ({"enabled": True}, 6, False),
        ({"time": "2s"}, 2, True),
        ({"time": "2s"}, 3, False),
        ({"time": "1m"}, 30, True),
        ({"time": "1m"}, 61, False),
        ({"time": 10}, 10, True),
        ({"time": 2.5}, 3, False),
        ({"time": "2500ms"}, 2, True),
        ({"time": "500ms"}, 1, True),  # (1s is the shortest period there is)
        ({"time": "500ms"}, 2, False),
        ({"time": "2s", "enabled": False}, 30, True),  # no lease, nothing to take over
    ],
    ids=lambda v: json.dumps(v),
)
def test_readiness_period_is_checked_against_the_lease_time(
    lease: dict[str, Any] | None, period: int, ok: bool
) -> None:
    values = _with_lease(lease, period)
    if ok:
        render_files(values)
    else:
        with pytest.raises(
            helm.HelmRenderError, match=r"readinessProbe.periodSeconds .* lease time of outbox orders"
        ):
            render_files(values)


def test_the_shortest_lease_time_of_all_outboxes_counts_and_is_named() -> None:
    values = _with_lease({"time": "30s"}, 10)
    second = {**copy.deepcopy(values["config"]["outboxes"][0]), "name": "invoices", "lease": {"time": "8s"}}
    values["config"]["outboxes"].append(second)
    with pytest.raises(helm.HelmRenderError) as refused:
        render_files(values)
    assert "lease time of outbox invoices (lease.time: 8s)" in str(refused.value)
    assert "set periodSeconds to at most 8" in str(refused.value)


def test_no_readiness_probe_means_no_lease_time_rule() -> None:
    docs = render(_with_lease({"time": "2s"}, 30, enabled=False))
    assert "readinessProbe" not in relay_container(only(docs, "Deployment")["spec"]["template"]["spec"])


def test_a_lease_time_that_is_not_a_duration_fails_at_render() -> None:
    with pytest.raises(helm.HelmValuesError):
        render_files(_with_lease({"time": "soon"}, 5))


# --- the config, where the image reads it ---------------------------------------------------------


def _assert_config_mounted_at_cmd_path(pod: dict[str, Any], docs: Manifests, configmap: str) -> None:
    container = relay_container(pod)
    config_path = Path(image_cmd()[-1])
    assert container["args"] == image_cmd(), "the same command as the image's CMD"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap
    assert config_path.name in only(docs, "ConfigMap", configmap)["data"]


def test_config_is_mounted_where_the_dockerfile_cmd_reads_it(default: Manifests) -> None:
    pod = only(default, "Deployment")["spec"]["template"]["spec"]
    _assert_config_mounted_at_cmd_path(pod, default, FULLNAME)


def _chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def test_values_yaml_config_passes_outbox_relay_check(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(_chart_values()["config"]))
    env = {"DATABASE_URL": "postgresql://relay@db:5432/app", "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}
    result = relay_check(config, env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_configmap_passes_check_with_the_pods_environment(
    default: Manifests, tmp_path: Path
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(config_text(default))
    container = relay_container(only(default, "Deployment")["spec"]["template"]["spec"])
    result = relay_check(config, container_env(container))
    assert result.returncode == 0, result.stdout + result.stderr


# --- secrets only by reference -------------------------------------------------------------------

SECRET_VALUES = {
    "database": {"existingSecret": "orders-db", "secretKey": "url", "envVar": "DATABASE_URL"},
    "secretEnv": {"KAFKA_PASSWORD": {"secretName": "orders-kafka", "key": "password"}},
}


def _assert_secrets_by_reference(docs: Manifests, container: dict[str, Any]) -> None:
    text = "\n".join(yaml.safe_dump(d) for d in docs)
    assert "postgresql://" not in text
    assert "postgres://" not in text
    assert "hunter2" not in text
    assert "stand-in" not in text
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart creates no Secret: it references them"
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
    assert "value" not in env["DATABASE_URL"]
    assert "dsn: ${DATABASE_URL}" in next(
        str(d["data"]["relay.yaml"]) for d in docs if d["kind"] == "ConfigMap" and "relay.yaml" in d["data"]
    )


def test_secrets_only_by_reference(default: Manifests) -> None:
    docs = render(SECRET_VALUES)
    container = relay_container(only(docs, "Deployment")["spec"]["template"]["spec"])
    _assert_secrets_by_reference(docs, container)
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "orders-db", "key": "url"}}
    assert env["KAFKA_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "orders-kafka", "key": "password"}}
    _assert_secrets_by_reference(
        default, relay_container(only(default, "Deployment")["spec"]["template"]["spec"])
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": {"dsn": "postgresql://relay:hunter2@db:5432/app"}}, "URL with a password"),
        ({"source": {"dsn": "host=db user=relay password=hunter2"}}, "written inline"),
        ({"sink": {"producer": {"sasl.password": "hunter2"}}}, "written inline"),
    ],
    ids=["url-dsn", "keyword-dsn", "sasl-password"],
)
def test_a_secret_written_into_the_config_is_refused(change: dict[str, Any], message: str) -> None:
    config = copy.deepcopy(_chart_values()["config"])
    for section, settings in change.items():
        config["outboxes"][0][section].update(settings)
    with pytest.raises(helm.HelmRenderError, match=message):
        render_files({"config": config})


def test_a_password_url_in_a_plain_env_value_is_refused() -> None:
    env = [{"name": "AMQP_URL", "value": "amqp://relay:hunter2@rabbit:5672/"}]
    with pytest.raises(helm.HelmRenderError, match="secretKeyRef"):
        render_files({"env": env})


# --- security context, /tmp, grace period --------------------------------------------------------


def _assert_container_security(container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp["name"] == "outbox-relay-tmp"


def test_security_context_and_a_writable_tmp(default: Manifests) -> None:
    pod = only(default, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    _assert_container_security(relay_container(pod))
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "outbox-relay-tmp"]
    assert "emptyDir" in tmp
    # The image's USER is the same uid, so runAsNonRoot and file ownership agree.
    (user,) = instruction(final_stage(), "USER")
    assert user.value[0].split(":")[0] == str(pod["securityContext"]["runAsUser"])


def test_termination_grace_exceeds_shutdown_grace(default: Manifests) -> None:
    pod = only(default, "Deployment")["spec"]["template"]["spec"]
    assert _chart_values()["config"]["shutdown_grace"] == "30s"
    assert pod["terminationGracePeriodSeconds"] > 30


@pytest.mark.parametrize(
    ("grace", "termination", "ok"),
    [("30s", 30, False), ("1m", 45, False), ("500ms", 5, True), (20, 21, True), ("0.5h", 1801, True)],
)
def test_termination_grace_is_checked_against_shutdown_grace(grace: Any, termination: int, ok: bool) -> None:
    config = copy.deepcopy(_chart_values()["config"])
    config["shutdown_grace"] = grace
    values = {"config": config, "terminationGracePeriodSeconds": termination}
    if ok:
        render_files(values)
    else:
        with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
            render_files(values)


# --- PDB -----------------------------------------------------------------------------------------


def test_pod_disruption_budget_covers_the_relay_pods(default: Manifests) -> None:
    pdb = only(default, "PodDisruptionBudget", FULLNAME)
    pod_labels = only(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    pdb = only(render({"pdb": {"minAvailable": 1}}), "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": pdb["spec"]["selector"]}


# --- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": "two"},
        {"replicas": 0},
        {"replicas": 1.5},
        {"mode": "daemonset"},
        {"image": {"repository": ""}},
        {"image": {"digest": "latest"}},
        {"config": None},
        {"config": {"outboxes": []}},
        {"config": {"http": {"port": 0}}},
        {"database": {"existingSecret": ""}},
        {"secretEnv": {"KAFKA_PASSWORD": "hunter2"}},
        {"replica": 3},
        {"terminationGracePeriodSeconds": "45s"},
    ],
    ids=lambda v: json.dumps(v),
)
def test_bad_values_fail_at_render_and_lint(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render_files(values)
    report = helm.lint(str(CHART), values, namespace=NAMESPACE)
    assert report["errors"], report


# --- sidecar mode --------------------------------------------------------------------------------


def test_sidecar_mode_renders_config_and_service_but_no_workload(sidecar_only: Manifests) -> None:
    assert kinds(sidecar_only) == ["ConfigMap", "Service"]
    service = only(sidecar_only, "Service")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "orders-service"}
    monitored = kinds(render({**SIDECAR, **MONITORING}))
    assert "ServiceMonitor" in monitored
    assert "PrometheusRule" in monitored
    assert "Deployment" not in monitored


def test_sidecar_mode_needs_the_application_pod_selector() -> None:
    with pytest.raises(helm.HelmRenderError, match="podSelector"):
        render_files({"mode": "sidecar"})
    assert kinds(render({"mode": "sidecar", "service": {"enabled": False}})) == ["ConfigMap"]


def test_sidecar_in_an_application_chart(sidecar_app: Manifests, tmp_path: Path) -> None:
    """examples/app-chart + examples/sidecar-values.yaml: the relay container joins the
    application's pod with the same config, probes and security context."""
    deployment = only(sidecar_app, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["orders-service", "outbox-relay"]
    container = relay_container(pod)
    _assert_probes(container, 9400)
    _assert_container_security(container)
    _assert_config_mounted_at_cmd_path(pod, sidecar_app, FULLNAME)
    _assert_secrets_by_reference(sidecar_app, container)
    assert pod["terminationGracePeriodSeconds"] > 30
    # The subchart's metrics Service selects the application's pods.
    service = only(sidecar_app, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert "restartPolicy" not in container
    config = tmp_path / "relay.yaml"
    config.write_text(config_text(sidecar_app))
    result = relay_check(config, container_env(container))
    assert result.returncode == 0, result.stdout + result.stderr
    for doc in sidecar_app:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_native_sidecar_goes_under_init_containers(app_chart: Path) -> None:
    values = _sidecar_values()
    values["outbox-relay"]["sidecar"]["native"] = True
    docs = render(values, app_chart)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["orders-service"]
    (init,) = pod["initContainers"]
    assert init["name"] == "outbox-relay"
    assert init["restartPolicy"] == "Always"
    kubernetes_validate.validate(only(docs, "Deployment"), "1.29.0", strict=True)


# --- alerts and dashboard ------------------------------------------------------------------------


def _exported_series() -> set[str]:
    """Every series name the relay exports (counters with _total, histograms with _bucket...)."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
                names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def _selectors(expr: str) -> list[str]:
    found: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.append(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_service_monitor_scrapes_the_service(monitoring: Manifests) -> None:
    monitor = only(monitoring, "ServiceMonitor")
    service = only(monitoring, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def test_alert_rules(monitoring: Manifests) -> None:
    (group,) = only(monitoring, "PrometheusRule")["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == {
        "OutboxRelayLagHigh",
        "OutboxRelayDeadLetters",
        "OutboxRelayNoLeader",
        "OutboxRelaySetupProblem",
        "OutboxRelayReplicationSlotLagHigh",
        "OutboxRelayPublishFailures",
        "OutboxRelayAbsent",
    }
    exported = _exported_series()
    for name, rule in rules.items():
        used = _selectors(rule["expr"])
        assert used, f"{name}: {used} not all exported by relay/metrics.py"
        assert set(used) <= exported, f"{name}: {used} not all exported by relay/metrics.py"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    selector = f'job="{FULLNAME}", namespace="{NAMESPACE}"'
    assert rules["OutboxRelayNoLeader"]["expr"] == (
        f"sum by (namespace, outbox) (outbox_relay_leader{{{selector}}}) == 0"
    )
    assert rules["OutboxRelayNoLeader"]["for"] == "1m"
    # A replica that lost its lease keeps its last backlog values: the leader series drops them.
    active_only = ["outbox_relay_leader"]
    assert _selectors(rules["OutboxRelayLagHigh"]["expr"]) == ["outbox_relay_lag_seconds", *active_only]
    assert rules["OutboxRelayLagHigh"]["expr"].endswith("> 300")
    assert _selectors(rules["OutboxRelayDeadLetters"]["expr"]) == ["outbox_relay_dead_letters", *active_only]
    assert _selectors(rules["OutboxRelaySetupProblem"]["expr"]) == ["outbox_relay_setup_problem"]
    assert rules["OutboxRelaySetupProblem"]["labels"]["severity"] == "critical"
    assert rules["OutboxRelayReplicationSlotLagHigh"]["expr"].endswith("> 1000000000")
    assert "rate(outbox_relay_publish_failures_total" in rules["OutboxRelayPublishFailures"]["expr"]
    # Prometheus' own template syntax survives Helm's.
    assert "{{ $labels.outbox }}" in rules["OutboxRelayLagHigh"]["annotations"]["summary"]


def test_alert_thresholds_come_from_values() -> None:
    values = {
        "prometheusRule": {"enabled": True, "lagSeconds": 60, "lagFor": "2m", "metricSelector": 'app="x"'}
    }
    (group,) = only(render(values), "PrometheusRule")["spec"]["groups"]
    lag = next(r for r in group["rules"] if r["alert"] == "OutboxRelayLagHigh")
    assert lag["expr"] == (
        'max by (namespace, outbox) (outbox_relay_lag_seconds{app="x"}'
        ' unless on (job, instance, outbox) (outbox_relay_leader{app="x"} == 0)) > 60'
    )
    assert lag["for"] == "2m"


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((CHART / "dashboards" / "outbox-relay.json").read_text())
    return dashboard


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$outbox", ".*")


def test_dashboard_panels_cover_the_relays_metrics() -> None:
    dashboard = _dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exported = _exported_series()
    used: set[str] = set()
    for expr in exprs:
        names = _selectors(_grafana_to_promql(expr))
        assert set(names) <= exported, expr
        used.update(names)
    assert {
        "outbox_relay_lag_seconds",
        "outbox_relay_pending_events",
        "outbox_relay_events_published_total",
        "outbox_relay_publish_failures_total",
        "outbox_relay_retries_total",
        "outbox_relay_dead_letters",
        "outbox_relay_end_to_end_seconds_bucket",
        "outbox_relay_leader",
        "outbox_relay_replication_slot_lag_bytes",
        "outbox_relay_in_flight_events",
    } <= used
    joined = "\n".join(exprs)
    for counter in ("events_published_total", "publish_failures_total", "retries_total"):
        assert f"rate(outbox_relay_{counter}" in joined
    for quantile in ("0.5", "0.99"):
        bucket_rate = "sum by (outbox, le) (rate(outbox_relay_end_to_end_seconds_bucket"
        assert f"histogram_quantile({quantile}, {bucket_rate}" in joined
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "outbox"]


def test_dashboard_configmap_is_labelled_for_grafana(monitoring: Manifests) -> None:
    configmap = only(monitoring, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["outbox-relay.json"]) == _dashboard()


# --- NOTES ---------------------------------------------------------------------------------------


def test_notes_tell_how_to_see_the_lag() -> None:
    notes = render_files()["outbox-relay/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} port-forward deploy/{FULLNAME} 9400:9400" in notes
    assert "curl -s localhost:9400/metrics | grep" in notes
    assert "lag_seconds" in notes
    assert f"exec deploy/{FULLNAME} -- outbox-relay status -c /etc/outbox-relay/relay.yaml" in notes
