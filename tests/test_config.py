"""YAML config loading and validation (router/config_loader.py)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pytest

from router import config_loader
from router.config import (
    AdapterConfig,
    Check,
    ConfigError,
    Count,
    Regex,
    RouterConfig,
    Seconds,
    Secret,
    Shorthand,
    StoreConfig,
    Unique,
    redact_url,
)
from router.config_loader import (
    check_config,
    load,
    parse_size,
    parse_text,
    read_text,
    setting_paths,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "config"
EXAMPLE = ROOT / "config" / "router.example.yaml"
DEMO = ROOT / "config" / "demo.yaml"

SECRET = "s3cr3t-VALUE-never-printed"
EXAMPLE_ENV = {"ROUTER_API_KEY": "router-" + SECRET, "WA_INSTANCE_KEY": "instance-" + SECRET}

# A valid tail that bad snippets can be prepended to without changing their
# line numbers.
INSTANCES = """\
instances:
  - name: wa-1
    url: http://127.0.0.1:3101
"""


def _parse(text: str, env: dict[str, str] | None = None, tail: str = "") -> RouterConfig:
    return parse_text(textwrap.dedent(text) + tail, "router.yaml", env=env or {})


def keys_of(cfg: RouterConfig) -> tuple[str, ...]:
    return tuple(k.key for k in cfg.api_keys)


def _adapters_available() -> bool:
    return True


# --------------------------------------------------------------------------
# files that must load
# --------------------------------------------------------------------------


def test_example_loads() -> None:
    cfg = load(EXAMPLE, env=EXAMPLE_ENV)
    assert cfg.source == str(EXAMPLE)
    assert [i.name for i in cfg.instances] == ["wa-1", "wa-2", "wa-3"]
    assert cfg.instances[2].weight == 1.5
    assert cfg.instances[0].api_key == "instance-" + SECRET
    # The optional rotation key expands to "" and is skipped.
    assert keys_of(cfg) == ("router-" + SECRET,)
    assert cfg.limits.max_body_bytes == 10 * 1024 * 1024
    assert cfg.timeouts.idle_keepalive < 5
    assert cfg.store.is_memory


def test_example_rotation_key() -> None:
    env = dict(EXAMPLE_ENV, ROUTER_API_KEY_NEXT="next-key")
    cfg = load(EXAMPLE, env=env)
    assert keys_of(cfg) == ("router-" + SECRET, "next-key")


def _example_block(text: str, key: str, start: int) -> tuple[int, int]:
    """Where ``key:`` (commented out or not, a list entry or not) is set at or
    after ``start``, and where its block ends (the next top-level key)."""
    found = re.compile(rf"^[#\s]*(?:- )?{re.escape(key)}:", re.M).search(text, start)
    assert found is not None, key
    end = re.compile(r"^#?[a-z_]+:", re.M).search(text, found.end())
    return found.end(), end.start() if end else len(text)


def test_example_mentions_every_setting() -> None:
    """config/router.example.yaml documents every key RouterConfig reads, each
    inside its own section (derived from the dataclasses: a new field fails
    here until the example has it)."""
    text = EXAMPLE.read_text()
    paths = list(setting_paths())
    assert ("webhooks", "delivery", "lease") in paths and ("instance_defaults",) in paths
    for path in paths:
        at, end = _example_block(text, path[0], 0)
        for key in path[1:]:
            at, _ = _example_block(text[:end], key, at)


def test_demo_loads_with_defaults() -> None:
    cfg = load(DEMO, env={})
    assert [(i.name, i.url) for i in cfg.instances] == [
        ("wa-1", "http://127.0.0.1:3101"),
        ("wa-2", "http://127.0.0.1:3102"),
        ("wa-3", "http://127.0.0.1:3103"),
    ]
    assert all(i.api_key == "demo-instance-key" for i in cfg.instances)
    assert all(i.max_sessions == 50 for i in cfg.instances)
    assert keys_of(cfg) == ("demo-router-key",)
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 8080)
    assert cfg.adapter.kind == "waha"
    assert cfg.store.url == "memory"


def test_demo_env_overrides() -> None:
    env = {"ROUTER_API_KEY": "rk", "WA_DEMO_INSTANCE_KEY": "ik"}
    cfg = load(DEMO, env=env)
    assert keys_of(cfg) == ("rk",)
    assert {i.api_key for i in cfg.instances} == {"ik"}


def test_load_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WA_DEMO_INSTANCE_KEY", raising=False)
    monkeypatch.setenv("ROUTER_API_KEY", "from-os-environ")
    cfg = load(str(DEMO))
    assert keys_of(cfg) == ("from-os-environ",)


def test_minimal_gets_defaults() -> None:
    cfg = load(DATA / "minimal.yaml")
    assert cfg == RouterConfig(
        instances=cfg.instances,
        source=str(DATA / "minimal.yaml"),
    )
    inst = cfg.instances[0]
    assert inst.url == "http://127.0.0.1:3000"  # trailing slash stripped
    assert (inst.max_sessions, inst.weight, inst.api_key) == (100, 1.0, None)
    assert keys_of(cfg) == ()


def test_anchors_and_merge_keys() -> None:
    cfg = load(DATA / "anchors.yaml", env={"ROUTER_KEY": "rk", "INSTANCE_KEY": "ik"})
    a, b, c = cfg.instances
    assert (b.name, b.url, b.max_sessions, b.api_key) == ("b", "http://10.0.0.2:3000", 40, "ik")
    assert (c.name, c.weight, c.max_sessions) == ("c", 0.5, 40)
    assert a.url == "http://10.0.0.1:3000"


def test_redis_store_and_typed_env() -> None:
    env = {"REDIS_URL": "redis://:hunter2-" + SECRET + "@redis.internal:6379/2"}
    cfg = load(DATA / "redis.yaml", env=env)
    assert cfg.store.url == env["REDIS_URL"]
    assert cfg.store.key_prefix == "prod:"
    assert cfg.listen.port == 9090  # unquoted ${ROUTER_PORT:-9090} reads as a number
    assert cfg.limits.max_body_bytes == 512_000
    assert cfg.limits.max_connections_per_instance == 0
    assert cfg.adapter.kind == "blazz"
    assert SECRET not in repr(cfg)
    ok, text = check_config(DATA / "redis.yaml", env=env)
    assert ok, text
    assert SECRET not in text
    assert "redis://:***@redis.internal:6379/2" in text
    cfg = load(DATA / "redis.yaml", env=dict(env, ROUTER_PORT="7000"))
    assert cfg.listen.port == 7000


def test_secrets_not_in_repr() -> None:
    env = dict(EXAMPLE_ENV, ROUTER_API_KEY_NEXT="next-" + SECRET)
    cfg = load(EXAMPLE, env=env)
    assert cfg.instances[0].api_key is not None and SECRET in cfg.instances[0].api_key
    for text in (repr(cfg), str(cfg), repr(cfg.instances), repr(cfg.instances[0])):
        assert SECRET not in text
    assert SECRET not in repr(StoreConfig(url=f"rediss://user:{SECRET}@h:6380/0"))


def test_env_default_and_escape() -> None:
    cfg = _parse(
        """\
        api_keys: ["${A:-fallback}", "${B:-unused}", "lit$${X}eral", "$5 ${C}"]
        store:
          key_prefix: "${PREFIX:-app}:"
        instances:
          - name: wa-1
            url: "${URL:-http://h:1}"
            api_key: ${EMPTY:-empty-gets-default}
        """,
        env={"B": "from-env", "C": "c", "EMPTY": ""},
    )
    assert keys_of(cfg) == ("fallback", "from-env", "lit${X}eral", "$5 c")
    assert cfg.store.key_prefix == "app:"
    assert cfg.instances[0].url == "http://h:1"
    assert cfg.instances[0].api_key == "empty-gets-default"


def test_api_keys_single_string_and_null_instance_key() -> None:
    cfg = _parse(
        """\
        api_keys: only-key
        instances:
          - name: wa-1
            url: http://127.0.0.1:3101
            api_key:
        """
    )
    assert keys_of(cfg) == ("only-key",)
    assert cfg.instances[0].api_key is None


def test_sizes_and_numbers() -> None:
    cfg = _parse(
        """\
        limits: {max_body_bytes: 1.5MiB}
        timeouts: {connect: 0.25, read: 10, idle_keepalive: 3.5}
        health: {interval: 5, timeout: 4.9, rise: 1, fall: 10}
        listen: {port: 0}
        """,
        tail=INSTANCES,
    )
    assert cfg.limits.max_body_bytes == int(1.5 * 1024 * 1024)
    assert (cfg.timeouts.connect, cfg.timeouts.read) == (0.25, 10.0)
    assert cfg.health.timeout == 4.9
    assert cfg.listen.port == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10MiB", 10 * 1024 * 1024),
        ("512KB", 512_000),
        ("512kb", 512_000),
        ("1 GiB", 1024**3),
        ("2MB", 2_000_000),
        ("42", 42),
        ("42B", 42),
        ("0.5KiB", 512),
        ("10XB", None),
        ("MiB", None),
        ("-1KB", None),
        ("10 M", None),
        ("", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


# --------------------------------------------------------------------------
# configs that must be rejected: (id, yaml, env, line, reason fragment)
# --------------------------------------------------------------------------

BAD: list[tuple[str, str, dict[str, str], int, str]] = [
    (
        "syntax-tab",
        "listen:\n  port: 1\n\thost: x\n" + INSTANCES,
        {},
        3,
        "indent with spaces, YAML does not allow tabs",
    ),
    (
        "syntax-unclosed-quote",
        "listen:\n  host: 'abc\n  port: 1\n",
        {},
        4,
        "while scanning a quoted scalar started at line 2",
    ),
    (
        "syntax-flow",
        "listen: [a, b\ninstances: []\n",
        {},
        2,
        "YAML syntax error: expected ',' or ']'",
    ),
    ("two-documents", INSTANCES + "---\nlisten: {}\n", {}, 4, "only one YAML document"),
    ("empty", "", {}, 1, "config file is empty"),
    ("only-comments", "# nothing\n\n", {}, 1, "config file is empty"),
    ("top-level-list", "- a\n- b\n", {}, 1, "top level must be a mapping"),
    (
        "unknown-key-suggestion",
        "timeouts:\n  connect: 1\n  raed: 5\n" + INSTANCES,
        {},
        3,
        "timeouts.raed: unknown key; did you mean 'read'?",
    ),
    (
        "unknown-top-key",
        INSTANCES + "listn:\n  port: 1\n",
        {},
        4,
        "listn: unknown key; did you mean 'listen'?",
    ),
    (
        "unknown-key-no-suggestion",
        "listen:\n  zzz: 1\n" + INSTANCES,
        {},
        2,
        "listen.zzz: unknown key (expected one of: host, port)",
    ),
    (
        "unknown-instance-key",
        INSTANCES + "    max_session: 10\n",
        {},
        4,
        "instances[0].max_session: unknown key; did you mean 'max_sessions'?",
    ),
    (
        "duplicate-key-nested",
        "health:\n  interval: 5\n  rise: 2\n  interval: 6\n" + INSTANCES,
        {},
        4,
        "health.interval: duplicate key (first defined at line 2)",
    ),
    (
        "duplicate-key-in-instance",
        INSTANCES + "    name: wa-2\n",
        {},
        4,
        "instances[0].name: duplicate key (first defined at line 2)",
    ),
    ("missing-instances", "listen:\n  port: 8080\n", {}, 1, "instances: missing required key"),
    (
        "empty-instances",
        "listen: {}\ninstances: []\n",
        {},
        2,
        "instances: must be a non-empty list",
    ),
    ("null-instances", "instances:\n", {}, 1, "instances: must be a non-empty list"),
    (
        "missing-url",
        "instances:\n  - name: wa-1\n    max_sessions: 3\n",
        {},
        2,
        "instances[0]: missing required key 'url'",
    ),
    (
        "duplicate-instance-name",
        INSTANCES + "  - name: wa-1\n    url: http://127.0.0.1:3102\n",
        {},
        4,
        "instances[1].name: duplicate instance name 'wa-1' (also instances[0] at line 2)",
    ),
    (
        "duplicate-instance-url",
        INSTANCES + "  - name: wa-2\n    url: HTTP://127.0.0.1:3101/\n",
        {},
        5,
        "instances[1].url: duplicate URL 'http://127.0.0.1:3101' (also instances[0] at line 3)",
    ),
    (
        "bad-instance-name",
        "instances:\n  - name: -bad name\n    url: http://h:1\n",
        {},
        2,
        "instances[0].name: must be 1-63 characters",
    ),
    (
        "instance-name-bool",
        "instances:\n  - name: no\n    url: http://h:1\n",
        {},
        2,
        "instances[0].name: must be a string, got false (a boolean) (quote it)",
    ),
    (
        "bad-url-scheme",
        "instances:\n  - name: a\n    url: ftp://h:1\n",
        {},
        3,
        "instances[0].url: must start with http:// or https://, got 'ftp://h:1'",
    ),
    (
        "bad-url-no-host",
        "instances:\n  - name: a\n    url: http:///x\n",
        {},
        3,
        "instances[0].url: has no host",
    ),
    (
        "bad-url-query",
        "instances:\n  - name: a\n    url: http://h:1/?x=1\n",
        {},
        3,
        "instances[0].url: must not have a query string",
    ),
    (
        "bad-url-fragment",
        "instances:\n  - name: a\n    url: http://h:1/#top\n",
        {},
        3,
        "instances[0].url: must not have a fragment",
    ),
    (
        "bad-url-port",
        "instances:\n  - name: a\n    url: http://h:99999\n",
        {},
        3,
        "instances[0].url: not a valid URL",
    ),
    (
        "bad-url-port-zero",
        "instances:\n  - name: a\n    url: http://h:0\n",
        {},
        3,
        "instances[0].url: port must be in 1..65535",
    ),
    (
        "max-sessions-word",
        INSTANCES + "    max_sessions: ten\n",
        {},
        4,
        "instances[0].max_sessions: must be an integer >= 1, got 'ten'",
    ),
    (
        "max-sessions-zero",
        INSTANCES + "    max_sessions: 0\n",
        {},
        4,
        "instances[0].max_sessions: must be an integer >= 1, got 0",
    ),
    (
        "max-sessions-float",
        INSTANCES + "    max_sessions: 2.5\n",
        {},
        4,
        "must be an integer >= 1, got 2.5",
    ),
    (
        "weight-zero",
        INSTANCES + "    weight: 0\n",
        {},
        4,
        "instances[0].weight: must be a number > 0, got 0",
    ),
    (
        "weight-bool",
        INSTANCES + "    weight: yes\n",
        {},
        4,
        "instances[0].weight: must be a number > 0, got true (a boolean)",
    ),
    (
        "port-too-big",
        "listen:\n  port: 70000\n" + INSTANCES,
        {},
        2,
        "listen.port: must be an integer in 0..65535, got 70000",
    ),
    (
        "port-negative",
        "listen:\n  port: -1\n" + INSTANCES,
        {},
        2,
        "listen.port: must be an integer in 0..65535, got -1",
    ),
    (
        "port-quoted",
        "listen:\n  port: '8080'\n" + INSTANCES,
        {},
        2,
        "listen.port: must be an integer in 0..65535, got '8080'",
    ),
    (
        "port-bool",
        "listen:\n  port: true\n" + INSTANCES,
        {},
        2,
        "listen.port: must be an integer in 0..65535, got true (a boolean)",
    ),
    (
        "port-null",
        "listen:\n  port:\n" + INSTANCES,
        {},
        2,
        "listen.port: must be an integer in 0..65535, got null",
    ),
    (
        "port-from-env-not-a-number",
        "listen:\n  port: ${PORT}\n" + INSTANCES,
        {"PORT": "eighty"},
        2,
        "listen.port: must be an integer in 0..65535, got a string from ${PORT} (value hidden)",
    ),
    (
        "section-not-mapping",
        "timeouts: 5\n" + INSTANCES,
        {},
        1,
        "timeouts: must be a mapping, got the scalar '5'",
    ),
    (
        "negative-timeout",
        "timeouts:\n  connect: -1\n" + INSTANCES,
        {},
        2,
        "timeouts.connect: must be a number > 0, got -1",
    ),
    (
        "zero-timeout",
        "timeouts:\n  idle_keepalive: 0\n" + INSTANCES,
        {},
        2,
        "timeouts.idle_keepalive: must be a number > 0, got 0",
    ),
    (
        "infinite-timeout",
        "timeouts:\n  read: .inf\n" + INSTANCES,
        {},
        2,
        "timeouts.read: must be a number > 0, got inf",
    ),
    (
        "bool-timeout",
        "timeouts:\n  read: false\n" + INSTANCES,
        {},
        2,
        "timeouts.read: must be a number > 0, got false (a boolean)",
    ),
    (
        "health-timeout-ge-interval",
        "health:\n  interval: 2\n  timeout: 2\n" + INSTANCES,
        {},
        3,
        "health.timeout (2) must be less than health.interval (2)",
    ),
    (
        "health-interval-below-default-timeout",
        "health:\n  interval: 0.4\n" + INSTANCES,
        {},
        2,
        "health.timeout (default 0.5) must be less than health.interval (0.4)",
    ),
    (
        "health-rise-zero",
        "health:\n  rise: 0\n" + INSTANCES,
        {},
        2,
        "health.rise: must be an integer >= 1, got 0",
    ),
    (
        "bad-size-string",
        "limits:\n  max_body_bytes: 10XB\n" + INSTANCES,
        {},
        2,
        "limits.max_body_bytes: must be a size in bytes >= 1",
    ),
    (
        "size-zero",
        "limits:\n  max_body_bytes: 0\n" + INSTANCES,
        {},
        2,
        "got 0",
    ),
    (
        "negative-connections",
        "limits:\n  max_connections_per_instance: -5\n" + INSTANCES,
        {},
        2,
        "limits.max_connections_per_instance: must be an integer >= 0, got -5",
    ),
    (
        "adapter-kind-unknown",
        "adapter:\n  kind: wahaa\n" + INSTANCES,
        {},
        2,
        "adapter.kind: unknown adapter 'wahaa'; did you mean 'waha'?",
    ),
    (
        "adapter-kind-far-off",
        "adapter:\n  kind: twilio\n" + INSTANCES,
        {},
        2,
        "(expected one of: waha, blazz, wwebjs, evolution, generic)",
    ),
    (
        "adapter-options-list",
        "adapter:\n  kind: waha\n  options: [1]\n" + INSTANCES,
        {},
        3,
        "adapter.options: must be a mapping, got a list",
    ),
    (
        "store-scheme",
        "store:\n  url: postgres://db/x\n" + INSTANCES,
        {},
        2,
        "store.url: must be 'memory' or a redis://, rediss:// or unix:// URL, got scheme",
    ),
    (
        "store-redis-no-host",
        "store:\n  url: redis://\n" + INSTANCES,
        {},
        2,
        "store.url: redis:// URL has no host",
    ),
    (
        "api-keys-mapping",
        "api_keys:\n  a: b\n" + INSTANCES,
        {},
        2,
        "api_keys: must be a list of strings or mappings, or one string, got a mapping",
    ),
    (
        "api-keys-all-empty",
        "api_keys:\n  - ${K:-}\n" + INSTANCES,
        {},
        2,
        "api_keys: every entry expanded to an empty string",
    ),
    (
        "api-key-empty-literal",
        "api_keys: ['']\n" + INSTANCES,
        {},
        1,
        "api_keys[0]: must be a non-empty string, got an empty string",
    ),
    (
        "missing-env-var",
        INSTANCES + "    api_key: ${WA_KEY}\n",
        {"OTHER": "x"},
        4,
        "instances[0].api_key: environment variable WA_KEY is not set",
    ),
    (
        "missing-env-var-inside-string",
        "store:\n  url: 'redis://:${REDIS_PW}@h:6379/0'\n" + INSTANCES,
        {},
        2,
        "store.url: environment variable REDIS_PW is not set",
    ),
    (
        "bad-interpolation",
        INSTANCES + "    api_key: '${1BAD}'\n",
        {},
        4,
        "instances[0].api_key: bad interpolation '${1BAD}'",
    ),
    (
        "unterminated-interpolation",
        INSTANCES + "    api_key: '${OPEN'\n",
        {},
        4,
        "bad interpolation '${OPEN'",
    ),
    (
        "non-scalar-key",
        "? [a, b]\n: 1\n" + INSTANCES,
        {},
        1,
        "top level: keys must be plain strings",
    ),
    (
        "unknown-tag",
        "listen:\n  host: !secret x\n" + INSTANCES,
        {},
        2,
        "listen.host: cannot read value: could not determine a constructor for the tag '!secret'",
    ),
    (
        "recursive-merge",
        "health: &h\n  <<: *h\n" + INSTANCES,
        {},
        1,
        "health: recursive '<<' merge",
    ),
    (
        "control-character",
        "listen:\n  host: a\x01b\n" + INSTANCES,
        {},
        2,
        "YAML syntax error: character U+0001",
    ),
    (
        "merge-non-mapping",
        "instances:\n  - <<: [1]\n    name: a\n    url: http://h:1\n",
        {},
        2,
        "'<<' merges only mappings",
    ),
]


@pytest.mark.parametrize(
    ("text", "env", "line", "fragment"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_config(text: str, env: dict[str, str], line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env=env)
    err = info.value
    assert (err.file, err.line) == ("router.yaml", line), str(err)
    assert fragment in err.reason, str(err)
    assert str(err) == f"router.yaml:{line}: {err.reason}"


def test_duplicate_top_level_key_file() -> None:
    path = DATA / "duplicate_key.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == 7
    assert str(info.value) == f"{path}:7: listen: duplicate key (first defined at line 1)"


# --------------------------------------------------------------------------
# secrets never leak into messages
# --------------------------------------------------------------------------

LEAK_CASES: list[tuple[str, dict[str, str]]] = [
    # A missing variable next to a set one: only the name may appear.
    (INSTANCES + "    api_key: ${WA_KEY}\napi_keys: ['${ROUTER_KEY}']\n", {"ROUTER_KEY": SECRET}),
    (
        "api_keys: ['${ROUTER_KEY}']\n" + INSTANCES + "    api_key: ${WA_KEY}\n",
        {"ROUTER_KEY": SECRET},
    ),
    # A secret in a field of the wrong shape.
    (INSTANCES + "    max_sessions: ${K}\n", {"K": SECRET}),
    ("listen:\n  port: ${K}\n" + INSTANCES, {"K": SECRET}),
    ("limits:\n  max_body_bytes: ${K}\n" + INSTANCES, {"K": SECRET}),
    # A secret with stray whitespace, and an instance URL with credentials.
    (INSTANCES + "    api_key: '${K}'\n", {"K": SECRET + " "}),
    ("instances:\n  - name: a\n    url: http://u:" + SECRET + "@h:1\n", {}),
    ("instances:\n  - name: a\n    url: '${U}'\n", {"U": "ftp://u:" + SECRET + "@h"}),
    # Store URLs carry Redis passwords.
    ("store:\n  url: 'mysql://u:" + SECRET + "@h/db'\n" + INSTANCES, {}),
    ("store:\n  url: '${R}'\n" + INSTANCES, {"R": "redis://:" + SECRET + "@h/x"}),
]


@pytest.mark.parametrize(("text", "env"), LEAK_CASES)
def test_errors_never_contain_secrets(text: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env=env)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_missing_env_message_names_variable_only() -> None:
    text = INSTANCES + "    api_key: ${WA_KEY}\n"
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env={"WA_KEY_OTHER": SECRET})
    msg = str(info.value)
    assert msg.startswith("router.yaml:4: instances[0].api_key: environment variable WA_KEY")
    assert "${WA_KEY:-default}" in msg
    assert SECRET not in msg


def test_summary_has_no_secrets() -> None:
    env = dict(EXAMPLE_ENV, ROUTER_API_KEY_NEXT="next-" + SECRET)
    ok, text = check_config(EXAMPLE, env=env)
    assert ok
    assert SECRET not in text
    assert "instances:   3" in text
    assert "adapter:     waha" in text
    assert "store:       memory" in text
    assert "2 client key(s)" in text


# --------------------------------------------------------------------------
# check_config and file handling
# --------------------------------------------------------------------------


def test_check_config_failure_text(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(INSTANCES + "    max_sessions: ten\n")
    ok, text = check_config(path)
    assert not ok
    assert text == f"{path}:4: instances[0].max_sessions: must be an integer >= 1, got 'ten'"


def test_check_config_warns_about_keepalive(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("timeouts: {idle_keepalive: 6}\n" + INSTANCES)
    ok, text = check_config(path)
    assert ok
    assert "keepAliveTimeout" in text


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line is None
    assert str(info.value).startswith(f"{path}: cannot read config file")
    ok, text = check_config(path)
    assert not ok and "cannot read" in text


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(INSTANCES.encode() + b"    api_key: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.line == 4
    assert "not valid UTF-8" in info.value.reason


def test_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + INSTANCES.encode())
    assert load(path).instances[0].name == "wa-1"


def test_recursive_alias_in_options_is_rejected() -> None:
    text = "adapter:\n  kind: generic\n  options:\n    loop: &a [*a]\n" + INSTANCES
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env={})
    assert info.value.line == 4
    assert "recursive alias" in info.value.reason


def test_alias_bomb_in_options_is_rejected() -> None:
    lines = [
        "adapter:",
        "  kind: generic",
        "  options:",
        "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]",
    ]
    for i in range(1, 9):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"    l{i}: &l{i} [{refs}]")
    text = "\n".join(lines) + "\n" + INSTANCES
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env={})
    assert "too much data" in info.value.reason


def test_config_is_immutable() -> None:
    cfg = load(DEMO, env={})
    with pytest.raises(AttributeError):
        cfg.listen = cfg.listen  # type: ignore[misc]


# --------------------------------------------------------------------------
# adapter option validation through router.adapters.build_adapter
# --------------------------------------------------------------------------


def _fake_build(calls: list[AdapterConfig]) -> Callable[[AdapterConfig], object]:
    def build(cfg: AdapterConfig) -> object:
        calls.append(cfg)
        if "bogus" in cfg.options:
            raise ValueError(f"adapter.options.bogus: unknown option, got {cfg.options['bogus']!r}")
        return object()

    return build


def test_adapter_options_passed_to_build_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[AdapterConfig] = []
    monkeypatch.setattr(config_loader, "build_adapter", _fake_build(calls))
    cfg = parse_text(
        "adapter:\n"
        "  kind: generic\n"
        "  options:\n"
        "    timeout: ${T:-5}\n"
        "    header: '${H:-X-Api-Key}'\n"
        "    session: {in: path, index: 2}\n"
        "    list: [a, b]\n" + INSTANCES,
        "router.yaml",
        env={},
    )
    assert calls == [cfg.adapter]
    opts: dict[str, Any] = dict(cfg.adapter.options)
    assert opts == {
        "timeout": 5,
        "header": "X-Api-Key",
        "session": {"in": "path", "index": 2},
        "list": ["a", "b"],
    }


def test_adapter_build_error_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_loader, "build_adapter", _fake_build([]))
    text = "adapter:\n  kind: generic\n  options:\n    bogus: '${TOKEN}'\n" + INSTANCES
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env={"TOKEN": SECRET})
    assert info.value.line == 1
    assert "adapter: invalid generic adapter settings: adapter.options.bogus" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.skipif(not _adapters_available(), reason="router.adapters.build_adapter not there yet")
@pytest.mark.parametrize("kind", ["waha", "blazz", "wwebjs", "evolution"])
def test_real_adapters_accept_defaults(kind: str) -> None:
    cfg = parse_text(f"adapter:\n  kind: {kind}\n" + INSTANCES, "router.yaml", env={})
    assert cfg.adapter.kind == kind


@pytest.mark.skipif(not _adapters_available(), reason="router.adapters.build_adapter not there yet")
def test_real_adapter_rejects_unknown_option() -> None:
    text = "adapter:\n  kind: waha\n  options:\n    no_such_option_xyz: 1\n" + INSTANCES
    with pytest.raises(ConfigError) as info:
        parse_text(text, "router.yaml", env={})
    assert info.value.line == 1
    assert info.value.reason.startswith("adapter: ")


def test_routes_section() -> None:
    cfg = _parse("routes:\n  allow: ['/api/*']\n  deny: ['/API/Server/*']\n", tail=INSTANCES)
    assert cfg.routes.allow == ("/api/*",) and cfg.routes.deny == ("/api/server/*",)
    assert cfg.routes.permits("/api/sendText") and not cfg.routes.permits("/api/server/stop")
    assert not cfg.routes.permits("/ping")
    with pytest.raises(ConfigError) as info:
        _parse("routes:\n  deny: ['api/x']\n", tail=INSTANCES)
    assert "must start with '/'" in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@db.local:6380/2", "redis://user:***@db.local:6380/2"),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://u:p@s3cret@[::1]:6380/1", "rediss://u:***@[::1]:6380/1"),
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock"),
        ("redis://user@h:6379/0#s3cret", "redis://user@h:6379/0"),
        ("http://h/path/?token=s3cret", "http://h/path/"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("memory", "memory"),
        ("redis://[s3cret", "<unparseable url>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """One redaction for every URL the router prints (config summary, reprs,
    redis store and webhook queue errors): the password masked, query and
    fragment dropped, the rest kept so the URL is still recognisable."""
    assert redact_url(url) == shown
    assert "s3cret" not in shown


# --------------------------------------------------------------------------
# the declaration machinery, on shapes RouterConfig may not use (yet)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    sessions: Annotated[str, Regex, Unique("sessions pattern")]
    per_minute: Annotated[int, Count(lo=1)] = 20


@dataclass(frozen=True, slots=True)
class _Key:
    key: Annotated[str, Secret, Shorthand] = field(repr=False)
    sessions: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Shapes:
    rules: tuple[_Rule, ...] = ()
    keys: tuple[_Key, ...] = field(default=(), repr=False)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    burst: Annotated[int, Count(lo=1)] = 5
    window: Annotated[float, Seconds] = 60.0

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            ("burst", "window"),
            lambda s: s.burst <= s.window,
            "{path}burst ({burst}) must be <= window ({window})",
        ),
    )


def test_declared_shapes_are_read() -> None:
    """A list of dataclasses, an entry that is a string or a mapping, a
    str -> str mapping, an optional list, as the note in router/config.py says."""
    shapes = read_text(
        _Shapes,
        "rules:\n"
        "  - {sessions: 'webjs_.*', per_minute: 3}\n"
        "  - sessions: '.*'\n"
        "keys: ['${K}', {key: k2, sessions: [a, b]}, '${NEXT:-}', {key: k3, sessions: null}]\n"
        "labels: {zone: eu-1, tier: '2'}\n",
        env={"K": SECRET},
    )
    assert shapes.rules == (_Rule("webjs_.*", 3), _Rule(".*", 20))
    assert [(k.key, k.sessions) for k in shapes.keys] == [
        (SECRET, None),
        ("k2", ("a", "b")),
        ("k3", None),
    ]
    assert shapes.labels == {"zone": "eu-1", "tier": "2"}


def test_declared_shapes_report_every_problem_at_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        read_text(
            _Shapes,
            "rules:\n"
            "  - {sessions: '(', per_minute: 0}\n"
            "  - sessions: a\n"
            "  - sessions: a\n"
            "keys: [{key: '${K}', sesions: [a]}]\n"
            "labels: {zone: [1]}\n",
            "x.yaml",
            env={"K": SECRET},
        )
    assert str(info.value) == (
        "x.yaml:2: rules[0].sessions: not a valid regular expression:"
        " missing ), unterminated subpattern at position 0, got '('\n"
        "x.yaml:2: rules[0].per_minute: must be an integer >= 1, got 0\n"
        "x.yaml:5: keys[0].sesions: unknown key; did you mean 'sessions'?\n"
        "x.yaml:6: labels.zone: must be a single value, got a list"
    )
    with pytest.raises(ConfigError) as info:
        read_text(_Shapes, "rules: [{sessions: a}, {sessions: a}]\n", "x.yaml")
    assert str(info.value) == (
        "x.yaml:1: rules[1].sessions: duplicate sessions pattern 'a' (also rules[0] at line 1)"
    )
    with pytest.raises(ConfigError) as info:
        read_text(_Shapes, "window: 5\nburst: 9\n", "x.yaml")
    assert str(info.value) == "x.yaml:2: burst (9) must be <= window (5)"
    with pytest.raises(ConfigError) as info:
        read_text(_Shapes, "burst: 90\n", "x.yaml")
    assert str(info.value) == "x.yaml:1: burst (90) must be <= window (default 60)"
