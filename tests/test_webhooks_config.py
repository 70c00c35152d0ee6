"""The ``webhooks:`` config section: defaults, the documented example, file:line errors."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from router.config import ConfigError, RouterConfig, WebhookDelivery, WebhookIngest
from router.config_loader import parse_text, summarize

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "router.example.yaml"

HEAD = """\
instances:
  - name: wa-1
    url: http://127.0.0.1:3101
  - name: wa-2
    url: http://127.0.0.1:3102
"""


def parse(webhooks: str, env: dict[str, str] | None = None) -> RouterConfig:
    return parse_text(HEAD + textwrap.dedent(webhooks), "router.yaml", env=env or {})


def error(webhooks: str, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    with pytest.raises(ConfigError) as info:
        parse(webhooks, env)
    return info.value.line, info.value.reason


def test_absent_means_disabled() -> None:
    assert parse("").webhooks is None


def test_minimal_section_and_defaults() -> None:
    cfg = parse(
        """
        webhooks:
          targets:
            - url: http://app/api/whatsapp/webhooks/webjs?source=router
        """
    )
    wh = cfg.webhooks
    assert wh is not None
    (t,) = wh.targets
    assert (t.name, t.url, t.events, t.sessions, t.hmac_key, t.format) == (
        "target-1",
        "http://app/api/whatsapp/webhooks/webjs?source=router",
        (),
        None,
        None,
        "auto",
    )
    assert wh.delivery == WebhookDelivery()
    assert wh.ingest == WebhookIngest()
    assert wh.ingest.max_age_skew == 300 and wh.ingest.blazz_hmac_key is None
    # Issue 11: bounds on what hostile senders can make the router hold.
    assert (
        wh.ingest.max_buffered_bytes,
        wh.ingest.max_queued_bytes,
        wh.ingest.waha_require_timestamp,
        wh.ingest.dedup_window,
    ) == (64 * 1024 * 1024, 256 * 1024 * 1024, True, 600)
    assert (wh.sqlite_path, wh.sqlite_synchronous, wh.consumer_name) == (
        "./var/webhooks.db",
        "full",
        None,
    )
    assert "webhooks:    1 target(s), queue sqlite ./var/webhooks.db" in summarize(cfg)


def test_the_documented_example_is_valid() -> None:
    text = EXAMPLE.read_text()
    start = text.index("#webhooks:")
    block = "\n".join(
        line[1:] for line in text[start:].splitlines() if line.startswith("#")
    )  # uncomment
    env = {"APP_WEBHOOK_HMAC_SECRET": "app-secret", "BLAZZ_HMAC_SECRET": "blazz-secret"}
    cfg = parse(block, env)
    wh = cfg.webhooks
    assert wh is not None
    assert wh.targets[0].name == "main-app" and wh.targets[0].hmac_key == "app-secret"
    assert wh.ingest.blazz_hmac_key == "blazz-secret"
    assert wh.ingest.waha_hmac_key is None  # ${WAHA_WEBHOOK_HMAC_KEY:-} left empty
    assert wh.ingest.max_body_bytes == 8 * 1024 * 1024
    assert wh.delivery == WebhookDelivery()  # the example shows the defaults
    assert wh.consumer_name == "router-1"
    assert wh.ingest == WebhookIngest(
        blazz_hmac_key="blazz-secret", max_body_bytes=8 * 1024 * 1024
    )  # and the ingest's defaults, keys aside
    # Every WebhookDelivery / WebhookIngest setting is documented there.
    for key in (
        f.name for cls in (WebhookDelivery, WebhookIngest) for f in dataclasses.fields(cls)
    ):
        assert f"#    {key}:" in text, key


def test_full_section_and_secrets_stay_hidden() -> None:
    cfg = parse(
        """
        webhooks:
          sqlite_path: /var/lib/router/wh.db
          sqlite_synchronous: NORMAL
          consumer_name: "router-1:8080"
          ingest:
            blazz_hmac_key: "${BLAZZ}"
            instance_keys: {wa-2: "${WA2}"}
            max_age_skew: 120
            max_body_bytes: 1MiB
          delivery:
            attempts_per_round: 4
            timeout: 5
            ordering: none
            dead_letter_statuses: [422, 400, 422]
          targets:
            - name: app
              url: https://app/hook
              events: message*
              sessions: "webjs_7_.*"
              hmac_key: "${APP}"
              format: blazz
        """,
        env={"BLAZZ": "b-secret", "WA2": "w2-secret", "APP": "a-secret"},
    )
    wh = cfg.webhooks
    assert wh is not None
    assert wh.sqlite_synchronous == "normal" and wh.consumer_name == "router-1:8080"
    assert wh.ingest.instance_keys == {"wa-2": "w2-secret"}
    assert wh.ingest.max_body_bytes == 1024 * 1024
    assert wh.delivery.dead_letter_statuses == (422, 400)
    assert wh.delivery.ordering == "none"
    assert wh.targets[0].events == ("message*",)
    shown = repr(cfg) + summarize(cfg)
    for secret in ("b-secret", "w2-secret", "a-secret"):
        assert secret not in shown


@pytest.mark.parametrize(
    ("snippet", "line", "reason"),
    [
        ("webhooks: {}\n", 6, "webhooks: missing required key 'targets'"),
        ("webhooks:\n  targets: []\n", 7, "webhooks.targets: must be a non-empty list"),
        (
            "webhooks:\n  targets:\n    - url: ftp://x\n",
            8,
            "webhooks.targets[0].url: must start with http:// or https://",
        ),
        (
            "webhooks:\n  targets:\n    - url: http://u:p@x/\n",
            8,
            "webhooks.targets[0].url: must not contain credentials",
        ),
        (
            "webhooks:\n  targets:\n    - url: http://x\n      formt: waha\n",
            9,
            "webhooks.targets[0].formt: unknown key; did you mean 'format'?",
        ),
        (
            "webhooks:\n  targets:\n    - url: http://x\n      format: xml\n",
            9,
            "webhooks.targets[0].format: unknown format 'xml'",
        ),
        (
            "webhooks:\n  targets:\n    - url: http://x\n      sessions: '(['\n",
            9,
            "webhooks.targets[0].sessions: not a valid regular expression",
        ),
        (
            "webhooks:\n  targets:\n    - {url: 'http://x', name: a}\n"
            "    - {url: 'http://y', name: a}\n",
            9,
            "webhooks.targets[1].name: duplicate target name 'a'"
            " (also webhooks.targets[0] at line 8)",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n    instance_keys: {wa-9: k}\n",
            9,
            "webhooks.ingest.instance_keys.wa-9: no instance named 'wa-9'",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n    ordering: random\n",
            9,
            "webhooks.delivery.ordering: must be 'session'",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n    timeout: 0\n",
            9,
            "webhooks.delivery.timeout: must be a number > 0",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n"
            "    dead_letter_statuses: [503]\n",
            9,
            "webhooks.delivery.dead_letter_statuses[0]: must be an integer in 400..499",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n"
            "    attempts_per_round: 5\n    timeout: 60\n",
            9,
            "keep it under 240 s, because a round is signed once",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n    lease: 10\n",
            9,
            "webhooks.delivery.lease (10) must be longer than one delivery round",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  delivery:\n"
            "    backoff_base: 10\n    backoff_max: 5\n",
            10,
            "backoff_max (5) must be >= backoff_base (10)",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n"
            "    max_body_bytes: 1MiB\n    max_buffered_bytes: 512KiB\n",
            10,
            "webhooks.ingest.max_buffered_bytes (524288) must be >= max_body_bytes (1048576)",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n    max_queued_bytes: 1MB\n",
            9,
            "webhooks.ingest.max_queued_bytes (1000000) must be >= max_body_bytes"
            " (default 8388608)",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n    dedup_window: 60\n",
            9,
            "webhooks.ingest.dedup_window (60) must be 0 (off) or >= max_age_skew (default 300)",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n    dedup_window: -1\n",
            9,
            "webhooks.ingest.dedup_window: must be a number >= 0",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  ingest:\n"
            "    waha_require_timestamp: sometimes\n",
            9,
            "webhooks.ingest.waha_require_timestamp: must be true or false",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  sqlite_synchronous: fast\n",
            8,
            "webhooks.sqlite_synchronous: must be 'full'",
        ),
        (
            "webhooks:\n  targets: [{url: 'http://x'}]\n  consumer_name: 'a b'\n",
            8,
            "webhooks.consumer_name: must be 1-100 characters",
        ),
    ],
)
def test_errors_name_file_line_and_reason(snippet: str, line: int, reason: str) -> None:
    got_line, got_reason = error(snippet)
    assert got_line == line, got_reason
    assert reason in got_reason, got_reason


def test_ingest_bounds_parse_and_follow_their_neighbours() -> None:
    cfg = parse(
        """
        webhooks:
          targets: [{url: "http://x"}]
          ingest:
            max_buffered_bytes: 128MiB
            max_queued_bytes: 1GiB
            waha_require_timestamp: false
            dedup_window: 0
        """
    )
    assert cfg.webhooks is not None
    ing = cfg.webhooks.ingest
    assert (ing.max_buffered_bytes, ing.max_queued_bytes) == (128 * 1024**2, 1024**3)
    assert (ing.waha_require_timestamp, ing.dedup_window) == (False, 0)
    # Unset, the window covers twice the freshness window, and the byte
    # bounds make room for at least one largest body.
    cfg = parse(
        """
        webhooks:
          targets: [{url: "http://x"}]
          ingest: {max_age_skew: 900, max_body_bytes: 100MiB}
        """
    )
    assert cfg.webhooks is not None
    ing = cfg.webhooks.ingest
    assert ing.dedup_window == 1800
    assert (ing.max_buffered_bytes, ing.max_queued_bytes) == (100 * 1024**2, 256 * 1024**2)


def test_a_key_from_the_environment_is_never_echoed() -> None:
    _, reason = error(
        "webhooks:\n  targets:\n    - url: http://x\n      hmac_key: '${K}'\n      format: 7\n",
        env={"K": "very-secret-key"},
    )
    assert "very-secret-key" not in reason
    assert re.search(r"format: must be a string", reason)
