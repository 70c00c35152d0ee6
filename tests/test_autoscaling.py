"""The autoscaling signal: free capacity per label selector on a real router's
``/metrics``, the recording rules and KEDA query in
``deploy/kubernetes/autoscaling`` checked by promtool (on sample series, and
on series scraped from a real router), and an instance added by a config
reload taking new sessions with slow start.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from router.config import PlacementConfig, PlacementRule
from router.labels import Selector
from tests.support.metrics import Scrape, scrape
from tests.support.router import INSTANCE_KEY, StartRouter, router_config
from tests.support.simulator import SimFleetFactory
from tests.test_placement_labels import created_on as create
from tests.test_placement_labels import labelled

REPO = Path(__file__).resolve().parents[1]
AUTOSCALING = REPO / "deploy" / "kubernetes" / "autoscaling"
RULES = AUTOSCALING / "capacity-rules.yml"
RULE_TESTS = AUTOSCALING / "capacity-rules.test.yml"
SCALED_OBJECT = AUTOSCALING / "keda-scaledobject.yaml"
FAMILIES = (
    "wa_router_selector_instances",
    "wa_router_selector_capacity_sessions",
    "wa_router_selector_sessions",
    "wa_router_selector_free_sessions",
    "wa_router_selector_instance_max_sessions",
)


def promtool(*args: str, cwd: Path = REPO) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: apt-get install prometheus (.ci/deploy-checks)")
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{out}"
    return out


def by_selector(snap: Scrape, family: str) -> dict[str, float]:
    return {dict(labels)["selector"]: v for labels, v in snap.series(family).items()}


# -- the deploy kit -------------------------------------------------------------------


def test_recording_rules_and_the_keda_query_pass_promtool() -> None:
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS: 5 rules found" in out, out
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))

    (scaled,) = [d for d in yaml.safe_load_all(SCALED_OBJECT.read_text()) if d]
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["kind"] == "StatefulSet"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # Removing a pod kills its sessions: shrinking is a drain, never the HPA's.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["selectPolicy"] == "Disabled"
    (trigger,) = spec["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
    meta = trigger["metadata"]
    # The CRD wants every metadata value a string; threshold 1 with
    # AverageValue makes the query's value the replica count.
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["threshold"] == "1"
    # The query the ScaledObject runs is the one the promtool test checks.
    tested = {
        case["expr"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["promql_expr_test"]
    }
    assert meta["query"] in tested
    pool = re.fullmatch(
        r'max\(wa_router_selector:desired_instances\{selector="(.+)"\}\)', meta["query"]
    )
    # The selector as the router writes it (canonical), or no series would match.
    assert pool is not None and str(Selector.parse(pool[1])) == pool[1]
    # Every series the rules read is one the router exports.
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    read = {n for r in rules for n in re.findall(r"\bwa_router_selector_[a-z_]+", r["expr"])}
    assert read <= set(FAMILIES), read
    kustomization = yaml.safe_load((AUTOSCALING / "kustomization.yaml").read_text())
    files = [*kustomization["resources"], *kustomization["configMapGenerator"][0]["files"]]
    assert all((AUTOSCALING / f).is_file() for f in files)
    checks = (REPO / ".ci" / "deploy-checks").read_text()
    assert f"promtool test rules {RULE_TESTS.relative_to(REPO)}" in checks


# -- the metric on a real router ------------------------------------------------------


async def test_capacity_per_selector_counts_healthy_active_instances_only(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    eu = {"engine": "waha", "region": "eu"}
    us = {"engine": "waha", "region": "us"}
    fleet = sim_fleet(3, api_key=INSTANCE_KEY, start_delay=0.02)
    base = router_config(fleet.urls, names=[p.name for p in fleet], max_sessions=[2, 2, 4])
    placement = PlacementConfig(rules=(PlacementRule({"region": "eu"}, sessions="eu_*"),))
    router = await start_router(config=labelled(base, [eu, eu, us], placement))
    rt = router.runtime
    async with router.client() as http:
        owners = [await create(http, router, n) for n in ("eu_1", "eu_2", "eu_3", "x1", "x2")]
        assert Counter(owners) == {"wa-1": 2, "wa-2": 1, "wa-3": 2}
        # wa-2 stops taking sessions (maintenance): its capacity goes, its session stays.
        rt.migration.maintenance("wa-2")
        snap = await scrape(http, router.url)

    got = {family: by_selector(snap, family) for family in FAMILIES}
    selectors = ["*", "region=eu", "engine=waha,region=eu", "engine=waha,region=us"]
    assert all(sorted(got[f]) == sorted(selectors) for f in FAMILIES), got
    expect = {  # instances, capacity, sessions, free, instance_max_sessions
        "*": (2, 6, 5, 2, 4),
        "region=eu": (1, 2, 3, 0, 2),
        "engine=waha,region=eu": (1, 2, 3, 0, 2),
        "engine=waha,region=us": (1, 4, 2, 2, 4),
    }
    for sel, values in expect.items():
        assert tuple(got[f][sel] for f in FAMILIES) == values, sel

    # The recording rules on these very series (two replicas reporting the
    # same): the replica count KEDA would run for each pool.
    series = [
        {
            "series": f'{family}{{job="wa-session-router",replica="{replica}",selector="{sel}"}}',
            "values": f"{int(value)}x3",
        }
        for family in FAMILIES
        for sel, value in got[family].items()
        for replica in ("r1", "r2")
    ]
    cases = [
        {
            "expr": f'max(wa_router_selector:desired_instances{{selector="{sel}"}})',
            "eval_time": "1m",
            "exp_samples": [{"labels": "{}", "value": max(1, math.ceil(n / (m * 0.8)))}],
        }
        for sel, (_, _, n, _, m) in expect.items()
    ]
    assert [c["exp_samples"][0]["value"] for c in cases] == [2, 2, 2, 1]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "30s",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}],
    }
    path = tmp_path / "scraped.test.yml"
    path.write_text(yaml.safe_dump(unit))
    assert "SUCCESS" in promtool("test", "rules", str(path))


# -- slow start for an instance a reload adds -----------------------------------------------


async def test_an_instance_added_by_a_reload_ramps_up_instead_of_taking_every_create(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY, start_delay=0.02)
    full = router_config(fleet.urls, names=[p.name for p in fleet], max_sessions=100)
    two = dataclasses.replace(full, instances=full.instances[:2])
    router = await start_router(config=two)
    rt = router.runtime
    assert rt.config.outlier.slow_start == 30
    reloader = router.server.reloader
    assert reloader is not None
    async with router.client() as http:
        for i in range(10):
            await create(http, router, f"old-{i}")
        result = await reloader.apply(full)
        assert result.added == ["wa-3"]
        new = [await create(http, router, f"new-{i}") for i in range(12)]
    # At 10 % of its capacity the empty newcomer is "as loaded" as the others
    # at 10 sessions: it gets its first session only once they have about
    # that many. Without slow start it would take the next 5 in a row and a
    # third of the rest (7 of 12).
    counts = Counter(new)
    assert 1 <= counts["wa-3"] <= 2, counts
    assert new[:8].count("wa-3") == 0, new
    inst = rt.fleet.get("wa-3")
    assert inst is not None and inst.healthy_since > 0
