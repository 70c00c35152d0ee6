"""The deploy kit (``deploy/``): what can be checked without Docker or a cluster.

* Every YAML / JSON file parses.
* Prometheus: ``promtool check config`` (rule_files resolve), ``check rules``,
  ``test rules`` (every alert has a case where it fires and one where it does
  not), and the scrape jobs keep the router's ``instance`` label.
* Metric names: every ``wa_router_*`` series named by an alert rule or a
  dashboard query is one a real router serves on ``/metrics`` (see
  ``exported_series_names`` for how families without samples are handled).
* Grafana: dashboard structure, its queries parse as PromQL, provisioning.
* Compose, Kubernetes, systemd: structure, cross-references (ports, paths,
  labels, names), and the router configs pass ``session-router check-config``.

promtool comes from Debian's ``prometheus`` package; ``.ci/deploy-checks``
installs it. Without it the promtool tests fail (they do not skip).
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from tests.support.metrics import Scrape, scrape
from tests.support.router import INSTANCE_KEY, StartRouter
from tests.support.simulator import SimFleetFactory

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts.test.yml"
PROM_CONFIGS = (PROM_DIR / "prometheus.yml", PROM_DIR / "prometheus.kubernetes.yml")
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "wa-session-router.json"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_ROUTER_CONFIG = DEPLOY / "compose" / "router.yaml"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "wa-session-router.service"
README = DEPLOY / "README.md"

CONFIG_PATH = "/etc/wa-session-router/router.yaml"  # where the image and the manifests put it
ROUTER_JOB = "wa-session-router"
# The alert group written against the webhook relay's metrics
# (router/webhooks/metrics.py). Only for its rules, a name that the relay
# declares but /metrics does not serve yet is tolerated (and reported).
WEBHOOK_GROUP = "wa-router-webhooks"
# The environment the deploy configs expect (values are dummies).
CONFIG_ENV = {
    "ROUTER_API_KEY": "test-client-key",
    "WA_ROUTER_ADMIN_KEY": "test-admin-key",
    "WA_INSTANCE_KEY": "test-instance-key",
    "REDIS_URL": "redis://redis:6379/0",
}


# -- helpers ----------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool not found: it comes from Debian's `prometheus` package. "
            "Run .ci/deploy-checks (installs it) or `apt-get install prometheus`.",
            pytrace=False,
        )
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{out}"
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def alert_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load_yaml(ALERTS)["groups"]
    return groups


def alert_rules() -> list[dict[str, Any]]:
    return [rule for g in alert_groups() for rule in g["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def walk_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def dashboard_exprs() -> list[str]:
    """PromQL of every panel target, and the metric selector of every query variable."""
    exprs = [
        t["expr"]
        for p in walk_panels(dashboard()["panels"])
        for t in p.get("targets", [])
        if t.get("expr")
    ]
    for var in dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])wa_router_[A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """``wa_router_*`` series names in a PromQL expression, read loosely: string
    literals (label values, regexes) are dropped first, then every identifier
    with the prefix is taken as written (``_total``, ``_bucket``... included)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def series_names(name: str, kind: str) -> set[str]:
    """The series a metric family of this type puts into Prometheus."""
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"}
    if kind == "summary":
        return {name, f"{name}_count", f"{name}_sum", f"{name}_created"}
    if kind == "gaugehistogram":
        return {f"{name}_bucket", f"{name}_gcount", f"{name}_gsum"}
    if kind == "info":
        return {f"{name}_info"}
    return {name}  # gauge, stateset, unknown


def exported_series_names(exposition: str) -> set[str]:
    """Every series name a ``/metrics`` text can produce.

    A labelled metric nobody has recorded yet has no samples, but the client
    library still writes its ``# HELP``/``# TYPE`` lines, so the parser yields
    the family (name and type) with no samples. Expanding each family by its
    type (counter -> ``_total``; histogram -> ``_bucket``/``_count``/``_sum``)
    therefore covers metrics not yet used, not only the ones with samples.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= series_names(family.name, family.type)
        names |= {s.name for s in family.samples}
    return names


def declared_webhook_series() -> set[str]:
    """Series the webhook relay declares (whatever registry it registers them in)."""
    module: types.ModuleType
    try:
        import router.webhooks.metrics as module
    except ImportError:
        return set()
    names: set[str] = set()
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.collect():
                names |= series_names(family.name, family.type)
    return names


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def split_volume(spec: str) -> tuple[str, str, str]:
    source, target, *mode = spec.split(":")
    return source, target, (mode[0] if mode else "rw")


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def check_config_cli(path: Path) -> str:
    """``session-router check-config PATH`` as an operator runs it."""
    exe = Path(sys.executable).with_name("session-router")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "router.cli"]
    env = {**os.environ, **CONFIG_ENV}
    proc = subprocess.run(
        [*cmd, "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return assert_ok(proc)


# -- every file parses --------------------------------------------------------


def test_every_yaml_and_json_file_in_the_kit_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    yamls = [p for p in files if p.suffix in (".yml", ".yaml")]
    jsons = [p for p in files if p.suffix == ".json"]
    assert len(yamls) >= 12 and jsons
    for path in yamls:
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as exc:
            pytest.fail(f"{path.relative_to(REPO)}: {exc}")
        assert docs, f"{path.relative_to(REPO)} is empty"
    for path in jsons:
        json.loads(path.read_text())


# -- Prometheus -------------------------------------------------------------------


def test_promtool_check_config_and_rule_files_resolve() -> None:
    for config in PROM_CONFIGS:
        out = assert_ok(promtool("check", "config", str(config)))
        assert "SUCCESS: 1 rule files found" in out, out
        rule_files = load_yaml(config)["rule_files"]
        assert [(config.parent / f).resolve() for f in rule_files] == [ALERTS.resolve()]


def test_promtool_check_rules() -> None:
    out = assert_ok(promtool("check", "rules", str(ALERTS)))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_promtool_rule_unit_tests_pass() -> None:
    out = assert_ok(promtool("test", "rules", str(ALERT_TESTS)))
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert len(names) == len(alert_rules()), "duplicate alert names"
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert (fires | silent) - names == set(), "tests of alerts that do not exist"


def test_the_required_alerts_exist_and_are_documented() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    for required in (
        "WaRouterInstanceDown",
        "WaRouterNoHealthyInstance",
        "WaRouterFailoverStorm",
        "WaRouterHighUpstreamErrorRate",
        "WaRouterConfigReloadFailed",
        "WaRouterWebhookBacklogStale",
    ):
        assert required in rules
    groups = {g["name"] for g in alert_groups()}
    assert WEBHOOK_GROUP in groups
    readme = README.read_text()
    headings = set(re.findall(r"^#+ +(\S+)\s*$", readme, re.MULTILINE))
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook"] == f"deploy/README.md#{name.lower()}", name
        assert name in headings, f"deploy/README.md has no section for {name}"


def test_router_scrape_jobs_keep_the_instance_label_and_name_the_replica() -> None:
    # The router's `instance` label names a WhatsApp instance. Without
    # honor_labels Prometheus renames it to exported_instance and every
    # alert and panel grouping by instance would be empty.
    for config in PROM_CONFIGS:
        jobs = {j["job_name"]: j for j in load_yaml(config)["scrape_configs"]}
        job = jobs[ROUTER_JOB]
        assert job.get("honor_labels") is True, config.name
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [r.get("target_label") for r in job.get("relabel_configs", [])]
        assert "replica" in targets, config.name
    # Every alert that groups on the fleet uses the job the scrape defines.
    for rule in alert_rules():
        for selector_job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert selector_job == ROUTER_JOB


# -- metric names -----------------------------------------------------------------


async def test_every_metric_the_rules_and_dashboard_name_is_exported(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], admin_key="admin")
    async with router.client() as http:
        # Some traffic, so labelled series exist where the router records them.
        async with http.post(f"{router.url}/api/sessions", json={"name": "deploy-kit"}) as resp:
            assert resp.status == 201, await resp.text()
        for path in ("/api/deploy-kit/me", "/api/deploy-kit/me", "/api/nobody-has-this/me"):
            async with http.get(router.url + path) as resp:
                await resp.read()
        async with http.get(router.url + "/metrics") as resp:
            assert resp.status == 200
            exposition = await resp.text()
    exported = exported_series_names(exposition)

    # The scrape carries every family router/metrics.py declares, used or not.
    from router.metrics import REGISTRY

    for family in REGISTRY.collect():
        missing = series_names(family.name, family.type) - exported
        assert not missing, f"/metrics lacks {missing}"
    assert {"wa_router_sessions", "wa_router_instance_healthy"} <= exported  # fleet collector

    referenced: dict[str, set[str]] = {}
    for group in alert_groups():
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                referenced.setdefault(name, set()).add(f"rule group {group['name']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            referenced.setdefault(name, set()).add("dashboard")
    assert len(referenced) >= 20, sorted(referenced)

    unknown = {n: sorted(w) for n, w in referenced.items() if n not in exported}
    # Only the webhook group may name a series /metrics does not serve yet,
    # and only one the webhook relay really declares.
    webhook = declared_webhook_series()
    pending = {
        n
        for n, where in unknown.items()
        if where == [f"rule group {WEBHOOK_GROUP}"] and n in webhook
    }
    if pending:
        warnings.warn(
            f"alert group {WEBHOOK_GROUP} names webhook metrics that /metrics does not "
            f"serve yet (declared in router/webhooks/metrics.py): {sorted(pending)}",
            stacklevel=1,
        )
    assert {n: w for n, w in unknown.items() if n not in pending} == {}


def test_metric_name_extraction_handles_suffixes_and_strings() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) ("
        'rate(wa_router_request_duration_seconds_bucket{job=~"wa_router_x"}[5m])))'
        " / wa_router_requests_total unless wa_router:recorded"
    )
    assert metric_names(expr) == {
        "wa_router_request_duration_seconds_bucket",
        "wa_router_requests_total",
    }
    text = (
        "# HELP wa_router_a_total A.\n# TYPE wa_router_a_total counter\n"
        "# HELP wa_router_h_seconds H.\n# TYPE wa_router_h_seconds histogram\n"
        "# HELP wa_router_g G.\n# TYPE wa_router_g gauge\nwa_router_g 1.0\n"
    )
    exported = exported_series_names(text)
    assert {
        "wa_router_a_total",
        "wa_router_h_seconds_bucket",
        "wa_router_h_seconds_sum",
    } <= exported
    assert {"wa_router_a", "wa_router_h_seconds", "wa_router_g_total"}.isdisjoint(exported)


# -- Grafana --------------------------------------------------------------------


def test_dashboard_structure_and_coverage() -> None:
    dash = dashboard()
    assert dash["uid"] == "wa-session-router"
    panels = list(walk_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
    # The panels the deploy kit promises, by the series they are built on.
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for series in (
        "wa_router_requests_total",
        "wa_router_request_duration_seconds_bucket",
        "wa_router_upstream_duration_seconds_bucket",
        "wa_router_upstream_errors_total",
        "wa_router_sessions",
        "wa_router_instance_capacity_sessions",
        "wa_router_instance_healthy",
        "wa_router_instance_admin_state",
        "wa_router_failovers_total",
        "wa_router_restore_duration_seconds_bucket",
        "wa_router_retries_total",
        "wa_router_cache_lookups_total",
        "wa_router_config_reloads_total",
    ):
        assert series in used, f"no dashboard panel uses {series}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool has no "check expression": each query becomes a recording rule.
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    assert len(rules) >= 25
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(path)))


def test_grafana_provisioning_matches_compose() -> None:
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"]
    assert ds[0]["url"] == "http://prometheus:9090" and ds[0]["isDefault"] is True
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "wa-session-router.yml")
    path = providers["providers"][0]["options"]["path"]
    mounts = {
        split_volume(v)[1]: split_volume(v)[0] for v in compose()["services"]["grafana"]["volumes"]
    }
    assert mounts[path] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"
    env = compose()["services"]["grafana"]["environment"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == posixpath.join(path, DASHBOARD.name)


# -- docker compose -----------------------------------------------------------------


def test_compose_stack_structure() -> None:
    c = compose()
    services: dict[str, dict[str, Any]] = c["services"]
    expected = {"router-1", "router-2", "redis", "wa-1", "wa-2", "wa-3", "prometheus", "grafana"}
    assert expected <= set(services)

    routers = {
        n: s
        for n, s in services.items()
        if s.get("image") == "wa-session-router:local" and "entrypoint" not in s
    }
    assert set(routers) == {"router-1", "router-2"}, "two router replicas from the repo's image"
    sims = {
        n: s for n, s in services.items() if s.get("entrypoint") == ["session-router", "simulate"]
    }
    assert set(sims) == {"wa-1", "wa-2", "wa-3"}

    published: set[str] = set()
    for name, svc in routers.items():
        assert svc["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").exists()
        assert flag(svc["command"], "-c") == CONFIG_PATH, name
        mounts = {split_volume(v)[1]: split_volume(v) for v in svc["volumes"]}
        assert mounts[CONFIG_PATH][0] == "./compose/router.yaml" and mounts[CONFIG_PATH][2] == "ro"
        assert set(CONFIG_ENV) - {"REDIS_URL"} <= set(svc["environment"]), name
        for dep in ("redis", *sims):
            assert svc["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
        (port,) = svc["ports"]
        assert port.startswith("127.0.0.1:") and port.endswith(":8080"), port
        published.add(port.split(":")[1])
    assert len(published) == 2, "each replica on its own host port"

    auth_volumes = set()
    for name, svc in sims.items():
        args = [str(a) for a in svc["command"]]
        assert flag(args, "--name") == name
        assert flag(args, "--dialect") == "waha"
        assert flag(args, "--host") == "0.0.0.0"
        assert flag(args, "--port") == "3000"
        assert flag(args, "--auth-dir") == "/auth"
        assert float(flag(args, "--start-delay")) == 0.5
        assert flag(args, "--api-key")
        (auth,) = [split_volume(v) for v in svc["volumes"] if split_volume(v)[1] == "/auth"]
        auth_volumes.add(auth[0])
        assert svc["depends_on"]["auth-init"]["condition"] == "service_completed_successfully"
    assert len(auth_volumes) == 1, "the simulators share one auth volume"

    for name, svc in services.items():
        if name != "auth-init":
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for spec in svc.get("volumes", []):
            source = split_volume(spec)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in c["volumes"], f"{name}: volume {source} is not declared"


def test_compose_prometheus_scrapes_both_replicas_and_finds_its_rules() -> None:
    c = compose()
    prom = c["services"]["prometheus"]
    mounts = {split_volume(v)[1]: split_volume(v)[0] for v in prom["volumes"]}
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_target = config_arg.split("=", 1)[1]
    assert mounts[config_target] == "./prometheus/prometheus.yml"
    config = load_yaml(PROM_DIR / "prometheus.yml")
    # rule_files are relative to the config file: each must be mounted beside it.
    for rule_file in config["rule_files"]:
        target = posixpath.join(posixpath.dirname(config_target), rule_file)
        assert (DEPLOY / mounts[target]).resolve() == (PROM_DIR / rule_file).resolve()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {t for sc in jobs[ROUTER_JOB]["static_configs"] for t in sc["targets"]}
    assert targets == {"router-1:8080", "router-2:8080"}


def test_compose_router_config_passes_check_config(monkeypatch: pytest.MonkeyPatch) -> None:
    out = check_config_cli(COMPOSE_ROUTER_CONFIG)
    assert "OK" in out
    from router.config_loader import load

    for key, value in CONFIG_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = load(str(COMPOSE_ROUTER_CONFIG))
    assert cfg.store.url == "redis://redis:6379/0"
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8080)
    assert cfg.admin_key and cfg.api_keys
    assert cfg.adapter.kind == "waha"
    # The instances are the compose simulators, by name and port.
    sims = {n: s for n, s in compose()["services"].items() if n.startswith("wa-")}
    assert {i.name: i.url for i in cfg.instances} == {
        n: f"http://{n}:{flag([str(a) for a in s['command']], '--port')}" for n, s in sims.items()
    }
    assert all(i.api_key == CONFIG_ENV["WA_INSTANCE_KEY"] for i in cfg.instances)


def test_compose_config_with_the_docker_client(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if not docker or not plugin or plugin.returncode:
        pytest.skip("the docker compose plugin is not installed (structure checked above)")
    env = {**os.environ, **CONFIG_ENV, "GRAFANA_ADMIN_PASSWORD": "x"}
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert_ok(proc)


# -- Kubernetes -------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(K8S / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kubernetes_manifests(tmp_path: Path) -> None:
    objs = k8s_objects()
    kinds = {kind for kind, _ in objs}
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds

    dep = objs[("Deployment", "wa-session-router")]
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    selector = spec["selector"]["matchLabels"]
    pod = spec["template"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else int(port)

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(container[probe]) == 8080, probe

    # The ConfigMap lands exactly where the router is told to read it.
    assert flag(container["args"], "-c") == CONFIG_PATH
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [
        m for m in container["volumeMounts"] if posixpath.dirname(CONFIG_PATH) == m["mountPath"]
    ]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["configMap"]
    (item,) = [i for i in source["items"] if i["path"] == posixpath.basename(CONFIG_PATH)]
    cm = objs[("ConfigMap", source["name"])]
    router_yaml = cm["data"][item["key"]]

    # ... and it is a config the router accepts, listening on the probed port.
    path = tmp_path / "router.yaml"
    path.write_text(router_yaml)
    check_config_cli(path)
    config = yaml.safe_load(router_yaml)
    assert config["listen"] == {"host": "0.0.0.0", "port": 8080}
    assert "${REDIS_URL}" in config["store"]["url"], "replicas must share a store"
    # Every ${VAR} it needs comes from the Secret the pod loads.
    secret_refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    assert secret_refs == ["wa-session-router-secrets"]
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", router_yaml))
    assert needed == set(CONFIG_ENV)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    pdb = objs[("PodDisruptionBudget", "wa-session-router")]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]

    services = [doc for (kind, _), doc in objs.items() if kind == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"] == selector
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
    # The headless Service is the one Prometheus resolves.
    headless = next(s for s in services if s["spec"].get("clusterIP") == "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    prom = load_yaml(PROM_DIR / "prometheus.kubernetes.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == ROUTER_JOB)
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"]
    assert sd["port"] == 8080


# -- systemd ------------------------------------------------------------------------


def unit_entries() -> list[tuple[str, str, str]]:
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"bad unit line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_systemd_unit(tmp_path: Path) -> None:
    entries = unit_entries()
    sections = {s for s, _, _ in entries}
    assert sections == {"Unit", "Service", "Install"}
    values = {(s, k): v for s, k, v in entries}
    start = values[("Service", "ExecStart")].split()
    assert start[1:4] == ["run", "-c", CONFIG_PATH] and start[0].endswith("/session-router")
    pre = values[("Service", "ExecStartPre")].split()
    assert pre[1:] == ["check-config", CONFIG_PATH]
    drain = float(flag(start, "--drain-timeout"))
    assert float(values[("Service", "TimeoutStopSec")]) > drain
    assert values[("Service", "KillSignal")] == "SIGTERM"
    assert values[("Service", "Restart")] == "on-failure"
    assert values[("Install", "WantedBy")] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # structure checked above; .ci/deploy-checks installs systemd-analyze
    # verify wants the executables to exist: point them at this checkout's.
    exe = Path(sys.executable).with_name("session-router")
    if not exe.exists():
        return
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(start[0], str(exe)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on unknown keys and bad values; it only warns. Any output is a finding.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        proc.stdout + proc.stderr
    )


# -- CI script ------------------------------------------------------------------------


def test_deploy_checks_script_is_executable_bash() -> None:
    script = REPO / ".ci" / "deploy-checks"
    assert os.access(script, os.X_OK)
    assert_ok(
        subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    )


# -- the Docker image ---------------------------------------------------------------

CONTAINER_CONFIG = REPO / "config" / "container.yaml"
DOCKERFILE = REPO / "Dockerfile"


def test_dockerfile_installs_from_the_lock_and_ships_the_container_config() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY config/container.yaml " + CONFIG_PATH in text
    # Every pip install in the image reads the same pins as CI.
    for line in (ln for ln in text.splitlines() if "pip " in ln and "install" in ln):
        assert "-c constraints.txt" in line or "--no-index" in line, line
    assert "pip wheel" in text and "-c constraints.txt" in text.split("pip wheel", 1)[1]


async def test_the_image_config_serves_with_environment_variables_only(
    sim_fleet: SimFleetFactory, tmp_path: Path
) -> None:
    """What ``docker run -e ...`` does, without an engine: the image's entrypoint
    (``session-router run -c /etc/.../router.yaml``, i.e. config/container.yaml)
    in a real process whose only input is its environment; a client reaches an
    instance through it on a non-loopback listen address."""
    import aiohttp

    from tests.support.webhook_target import free_port

    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "WA_ROUTER_INSTANCES": " ".join(
            f"{p.name}={url}" for p, url in zip(fleet, fleet.urls, strict=True)
        ),
        "ROUTER_API_KEY": "image-client-key",
        "WA_INSTANCE_KEY": INSTANCE_KEY,
        "WA_ROUTER_PORT": str(port),
    }
    exe = Path(sys.executable).with_name("session-router")
    checked = await asyncio.to_thread(
        subprocess.run,
        [str(exe), "check-config", str(CONTAINER_CONFIG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    out = assert_ok(checked)
    assert f"listen:      0.0.0.0:{port}" in out and "instances:   2" in out
    log = tmp_path / "router.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            str(exe),
            "run",
            "-c",
            str(CONTAINER_CONFIG),
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        headers = {"X-Api-Key": "image-client-key"}
        async with aiohttp.ClientSession(headers=headers) as http:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                assert proc.returncode is None, log.read_text()
                try:
                    async with http.get(url + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the router did not become ready:\n" + log.read_text())
            async with http.post(url + "/api/sessions", json={"name": "from-env"}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.get(url + "/api/sessions/from-env") as resp:
                assert resp.status == 200
                assert (await resp.json())["name"] == "from-env"
            async with http.get(url + "/api/sessions/from-env", headers={"X-Api-Key": "no"}) as r:
                assert r.status == 401
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    assert "image-client-key" not in log.read_text()


# -- every metric an alert or a panel reads moves -------------------------------------

# Identity series: the value is 1 by definition, only its labels say anything.
_IDENTITY = {"wa_router_build_info"}


def _is_cumulative(name: str) -> bool:
    return name.endswith(("_total", "_bucket", "_count", "_sum"))


def _moved(scrapes: list[Scrape], name: str) -> bool:
    """A counter or histogram grew from the first scrape to the last; a gauge
    took two different values (or gained or lost a series) between scrapes."""
    if _is_cumulative(name):
        return scrapes[-1].total(name) > scrapes[0].total(name)
    seen = {tuple(sorted(s.series(name).items())) for s in scrapes}
    return len(seen) > 1


async def test_every_metric_the_rules_and_dashboard_use_moves_in_a_fleet_story(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    """Existing on /metrics is not enough: an alert on a metric nothing moves
    never fires. One story through a real router moves them all (creates,
    sends, an unknown session, an Idempotency-Key repeat, a lost answer, a
    slow request in flight, an ejection, a SIGKILLed owner and its failover,
    maintenance, a rejected then an accepted reload, webhooks dead-lettered
    and backlogged), and each series is read from the real endpoint."""

    from router.config_loader import load
    from tests.support.webhook_target import TargetServer, free_port, waha_body

    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    app = TargetServer()
    app.status_for = lambda d: 422  # every event is refused for good: a dead letter
    await app.start()
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: a backlog

    def config_text(max_sessions: int) -> str:
        items = "\n".join(
            f"  - {{name: {p.name}, url: '{url}', max_sessions: {max_sessions},"
            f" api_key: {INSTANCE_KEY}}}"
            for p, url in zip(fleet, fleet.urls, strict=True)
        )
        return f"""
listen: {{host: 127.0.0.1, port: 0}}
api_keys: [router-key]
admin_key: admin
health: {{interval: 0.2, timeout: 0.15, rise: 1, fall: 2}}
outlier: {{consecutive_failures: 3, base_ejection: 60, max_ejected_percent: 50}}
failover: {{wait: 10, ready_timeout: 5}}
discovery: {{interval: 0}}
instances:
{items}
webhooks:
  sqlite_path: "{tmp_path / "webhooks.db"}"
  delivery: {{attempts_per_round: 1, round_backoff: 0.02, backoff_base: 0.1,
              backoff_max: 0.3, timeout: 1, lease: 5}}
  targets:
    - {{name: app, url: "{app.url}"}}
    - {{name: down, url: "{down}"}}
"""

    path = tmp_path / "router.yaml"
    path.write_text(config_text(100))
    router = await start_router(config=load(str(path)))
    scrapes: list[Scrape] = []
    admin = {"X-Admin-Key": "admin"}
    try:
        async with router.client() as http:

            async def look() -> Scrape:
                scrapes.append(await scrape(http, router.url))
                return scrapes[-1]

            async def until(check: Callable[[Scrape], bool], what: str) -> None:
                for _ in range(300):
                    if check(await look()):
                        return
                    await asyncio.sleep(0.02)
                pytest.fail(f"never saw {what}")

            async def send(session: str, **headers: str) -> int:
                body = {"session": session, "chatId": "1@c.us", "text": "hi"}
                async with http.post(
                    router.url + "/api/sendText", json=body, headers=headers
                ) as resp:
                    await resp.read()
                    return resp.status

            await look()
            owners: dict[str, str] = {}
            for s in ("m-a", "m-b", "m-c"):
                async with http.post(router.url + "/api/sessions", json={"name": s}) as resp:
                    assert resp.status == 201, await resp.text()
                owner = router.runtime.smap.cached(s)
                assert owner is not None
                owners[s] = owner
                await fleet.by_name(owner).wait_session(s)
            assert len(set(owners.values())) == 3, owners
            a, b, c = (fleet.by_name(owners[s]) for s in ("m-a", "m-b", "m-c"))
            await look()

            # Sends, a repeat of an Idempotency-Key, an unknown session.
            assert await send("m-c") == 201
            assert await send("m-c", **{"Idempotency-Key": "k-1"}) == 201
            assert await send("m-c", **{"Idempotency-Key": "k-1"}) == 201
            async with http.get(router.url + "/api/nobody/me") as resp:
                assert resp.status == 404

            # A request in flight while the endpoint is read.
            await c.fault("slow", delay=1.0, paths="/api/m-c/me", count=1)
            slow = asyncio.ensure_future(http.get(router.url + "/api/m-c/me"))
            await until(lambda s: s.total("wa_router_requests_in_flight") >= 1, "in flight")
            (await slow).release()

            # A send whose answer was lost: never resent (retries denied, unsafe).
            await c.fault("drop_after", paths="/api/sendText", count=1)
            assert await send("m-c") == 502

            # Three 503s in a row eject b; an operator puts it in maintenance and back.
            await b.fault("error", status=503, paths="/api/m-b/me", count=3)
            for _ in range(3):
                async with http.get(router.url + "/api/m-b/me") as resp:
                    assert resp.status == 503
            await look()
            for action in ("maintenance", "undrain"):
                async with http.post(
                    f"{router.url}/admin/instances/{b.name}/{action}", headers=admin
                ) as resp:
                    assert resp.status == 200, await resp.text()
                await look()

            # The owner of m-a dies: health checks fail, a send fails it over to c.
            a.kill()
            assert await send("m-a") == 201
            assert router.runtime.smap.cached("m-a") == c.name
            await until(
                lambda s: s.series("wa_router_instance_healthy").get((("instance", a.name),)) == 0,
                f"{a.name} down",
            )

            # A rejected reload, then an accepted one with new capacities.
            path.write_text(config_text(100) + "bogus: 1\n")
            async with http.post(router.url + "/admin/reload", headers=admin) as resp:
                assert resp.status == 422, await resp.text()
            await look()
            path.write_text(config_text(120))
            async with http.post(router.url + "/admin/reload", headers=admin) as resp:
                assert resp.status == 200, await resp.text()
            await look()

            # An event from an instance: refused by one target, undeliverable to the other.
            event = waha_body("message", "m-c", eid="evt-1", body="hello")
            async with http.post(f"{router.url}/webhooks/waha/{c.name}", data=event) as resp:
                assert resp.status == 200, await resp.text()
            await until(
                lambda s: (
                    s.total("wa_router_webhook_dead_letters") >= 1
                    and s.total("wa_router_webhook_backlog") >= 1
                    and s.total("wa_router_webhook_oldest_pending_age_seconds") > 0
                ),
                "a dead letter and a backlog",
            )
    finally:
        await app.stop()

    referenced = {n for r in alert_rules() for n in metric_names(r["expr"])}
    referenced |= {n for e in dashboard_exprs() for n in metric_names(e)}
    still = sorted(n for n in referenced - _IDENTITY if not _moved(scrapes, n))
    assert still == [], f"alerts or panels read metrics that never moved: {still}"
    # Nothing was sent twice: m-a once (after its failover), m-c three times
    # (the plain send, the first of the two Idempotency-Key sends, the lost answer).
    assert (len(fleet.sent("m-a")), len(fleet.sent("m-c"))) == (1, 3)


BLAZZ_UNIT = DEPLOY / "systemd" / "blazz-whatsapp@.service"


def test_blazz_instance_unit_takes_its_browsers_with_it(tmp_path: Path) -> None:
    text = BLAZZ_UNIT.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "KillMode=control-group" in lines  # detached Chromium dies with node
    assert "Environment=LARAVEL_URL=http://127.0.0.1:8080/webhooks/blazz/wa-%i" in lines
    analyze = shutil.which("systemd-analyze")
    node = shutil.which("node")
    if analyze is None or node is None:
        return  # structure checked above; ./dev test installs both
    unit = tmp_path / "blazz-whatsapp@3001.service"
    unit.write_text(
        text.replace("/usr/bin/node", node)
        .replace("WorkingDirectory=/opt/blazz/whatsapp-service", f"WorkingDirectory={tmp_path}")
        .replace("EnvironmentFile=/etc/blazz/whatsapp.env", "")
    )
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
