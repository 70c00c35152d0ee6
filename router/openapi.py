"""The admin API as an OpenAPI 3.1 document (``GET /admin/openapi.json``).

``OPERATIONS`` describes every route of ``router.admin.ROUTES``, keyed by
method and path template; ``tests/test_admin.py`` checks that the two agree
both ways. Routes added later with ``AdminAPI.add_route`` carry their own
operation (or get a summary from their handler's docstring), and the
webhook relay's ``/admin/webhooks/...`` endpoints are listed when the relay
is configured. ``/healthz`` and ``/readyz`` (no key) are listed too.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from router import __version__
from router.config import SESSION_ID_PATTERN

if TYPE_CHECKING:
    from router.admin import Route

JSON = "application/json"

# -- building blocks -------------------------------------------------------------------


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


def _err(description: str) -> dict[str, Any]:
    return {"$ref": "#/components/responses/Error", "description": description}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


_NAME = {"$ref": "#/components/parameters/InstanceName"}
_SESSION = {"$ref": "#/components/parameters/SessionId"}
_WAIT = _query(
    "wait",
    "Seconds to wait for the drain to finish before answering (0..300).",
    {"type": "number", "minimum": 0, "maximum": 300, "default": 0},
)
_UNAUTHORIZED = _err("Missing or invalid admin key.")
_STR_LIST = {"type": "array", "items": {"type": "string"}}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "description": "A stable code (unknown_instance, busy, ...).",
            },
            "message": {"type": "string"},
        },
    },
    "Instance": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "url": {"type": "string", "description": "Without user info or query."},
            "healthy": {"type": "boolean"},
            "admin": {"type": "string", "enum": ["active", "draining", "maintenance"]},
            "placeable": {
                "type": "boolean",
                "description": "Healthy and active: takes new sessions.",
            },
            "sessions": {"type": "integer"},
            "capacity": {"type": "integer", "description": "max_sessions"},
            "weight": {"type": "number"},
            "load": {"type": "number", "description": "sessions / (capacity * weight)"},
            "removed": {
                "type": "boolean",
                "description": "Gone from the config; leaves the fleet once its sessions moved.",
            },
        },
    },
    "Fleet": {
        "type": "object",
        "properties": {
            "instances": {"type": "array", "items": _ref("Instance")},
            "sessions": {"type": "integer"},
            "orphans": {"type": "integer"},
            "duplicates": {"type": "integer"},
        },
    },
    "MoveResult": {
        "type": "object",
        "properties": {
            "session": {"type": "string"},
            "source": {"type": ["string", "null"]},
            "target": {"type": ["string", "null"]},
            "ok": {"type": "boolean"},
            "outcome": {
                "type": "string",
                "enum": ["moved", "already_there", "found_elsewhere", "failed"],
            },
            "error": {"type": ["string", "null"]},
            "detail": {"type": "string"},
            "seconds": {"type": "number"},
        },
    },
    "DrainJob": {
        "type": "object",
        "properties": {
            "instance": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "done", "cancelled"]},
            "done": {"type": "boolean"},
            "total": {"type": "integer"},
            "moved": {"type": "integer"},
            "skipped": {"type": "integer"},
            "failed": {"type": "integer"},
            "remaining": {"type": "integer"},
            "failures": {"type": "array", "items": _ref("MoveResult")},
            "started": {"type": "number"},
            "finished": {"type": ["number", "null"]},
            "seconds": {"type": "number"},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "session": {"type": "string"},
            "instance": {"type": "string"},
            "known_instance": {"type": "boolean"},
            "instance_healthy": {"type": ["boolean", "null"]},
            "instance_admin": {"type": ["string", "null"]},
            "status": {
                "type": ["string", "null"],
                "description": "Its state on the instance, 'absent' or 'unreachable'.",
            },
            "orphan": {"type": "boolean"},
            "duplicate_on": _STR_LIST,
            "moving": {"type": "boolean"},
            "recovering": {"type": "boolean"},
            "pinned": {"type": "boolean"},
        },
    },
    "SessionPage": {
        "type": "object",
        "properties": {
            "sessions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "session": {"type": "string"},
                        "instance": {"type": "string"},
                        "pinned": {"type": "boolean"},
                    },
                },
            },
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as cursor for the next page; null at the end.",
            },
            "scanned": {"type": "integer", "description": "Map entries this page looked at."},
            "total": {"type": "integer", "description": "Sessions in the map."},
        },
    },
    "Pin": {
        "type": "object",
        "properties": {
            "session": {"type": "string"},
            "instance": {"type": "string"},
            "previous": {"type": ["string", "null"]},
            "status": {"type": "string"},
            "pinned": {"type": "boolean"},
            "was_pinned": {"type": "boolean"},
        },
    },
    "Forgotten": {
        "type": "object",
        "properties": {
            "session": {"type": "string"},
            "forgotten": {"type": "boolean"},
            "instance": {"type": "string"},
        },
    },
    "Events": {
        "type": "object",
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["ts", "kind"],
                    "properties": {"ts": {"type": "number"}, "kind": {"type": "string"}},
                    "additionalProperties": True,
                },
            }
        },
    },
    "ReconcileRound": {
        "type": "object",
        "properties": {
            "round": {"type": "integer"},
            "initial": {"type": "boolean"},
            "seconds": {"type": "number"},
            "listed": {"type": "object", "additionalProperties": {"type": "integer"}},
            "failed": {"type": "object", "additionalProperties": {"type": "string"}},
            "assigned": {"type": "integer"},
            "changed": {"type": "integer"},
            "orphan_count": {"type": "integer"},
            "forgotten_count": {"type": "integer"},
            "skipped": {"type": "integer"},
        },
        "additionalProperties": True,
    },
    "Reload": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "cause": {"type": "string", "enum": ["api", "sighup", "file", "manual"]},
            "source": {"type": ["string", "null"]},
            "started": {"type": "number"},
            "seconds": {"type": "number"},
            "error": {"type": ["string", "null"], "description": "file:line: reason"},
            "file": {"type": ["string", "null"]},
            "line": {"type": ["integer", "null"]},
            "reason": {"type": ["string", "null"]},
            "changed": {"type": "boolean"},
            "added": _STR_LIST,
            "removed": {**_STR_LIST, "description": "Draining; leave the fleet once empty."},
            "dropped": {**_STR_LIST, "description": "Removed; owned no session."},
            "readdressed": _STR_LIST,
            "updated": {"type": "object", "additionalProperties": _STR_LIST},
            "repooled": _STR_LIST,
            "readded": _STR_LIST,
            "adapter_changed": {"type": "boolean"},
            "settings": _STR_LIST,
            "restart_required": {
                **_STR_LIST,
                "description": "Sections changed in the file that apply only after a restart.",
            },
        },
    },
    "ReloadStatus": {
        "type": "object",
        "properties": {
            "source": {"type": ["string", "null"]},
            "loaded_at": {"type": "number"},
            "attempts": {"type": "integer"},
            "applied": {"type": "integer"},
            "watching": {"type": "boolean"},
            "watch_interval": {"type": ["number", "null"]},
            "retiring": _STR_LIST,
            "last": {"oneOf": [_ref("Reload"), {"type": "null"}]},
        },
    },
}

# -- the admin routes (router.admin.ROUTES) ---------------------------------------------

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/admin/instances"): {
        "operationId": "listInstances",
        "tags": ["instances"],
        "summary": "Every instance with health, admin state and load",
        "responses": {"200": _ok("The fleet.", _ref("Fleet"))},
    },
    ("POST", "/admin/instances/{name}/drain"): {
        "operationId": "drainInstance",
        "tags": ["instances"],
        "summary": "Move every session off an instance and keep it empty",
        "description": "Runs in the background; `wait` waits for it up to that many seconds.",
        "parameters": [_NAME, _WAIT],
        "responses": {
            "200": _ok("The drain finished.", _ref("DrainJob")),
            "202": _ok("The drain is running.", _ref("DrainJob")),
            "404": _err("No such instance."),
        },
    },
    ("GET", "/admin/instances/{name}/drain"): {
        "operationId": "getDrain",
        "tags": ["instances"],
        "summary": "The instance's last drain",
        "parameters": [_NAME, _WAIT],
        "responses": {
            "200": _ok("The drain job.", _ref("DrainJob")),
            "404": _err("No such instance, or it was never drained."),
        },
    },
    ("POST", "/admin/instances/{name}/undrain"): {
        "operationId": "undrainInstance",
        "tags": ["instances"],
        "summary": "Back to active (a running drain starts no further moves)",
        "parameters": [_NAME],
        "responses": {
            "200": _ok("The instance.", _ref("Instance")),
            "404": _err("No such instance."),
        },
    },
    ("POST", "/admin/instances/{name}/maintenance"): {
        "operationId": "maintenanceInstance",
        "tags": ["instances"],
        "summary": "No new sessions; existing ones stay",
        "parameters": [_NAME],
        "responses": {
            "200": _ok("The instance.", _ref("Instance")),
            "404": _err("No such instance."),
        },
    },
    ("GET", "/admin/sessions"): {
        "operationId": "listSessions",
        "tags": ["sessions"],
        "summary": "The session map, paged and searchable",
        "description": (
            "Pages follow the map's own order (not sorted). A page stops after `limit` "
            "matches or 200,000 scanned entries; follow `next_cursor` until null."
        ),
        "parameters": [
            _query("q", "Case-insensitive substring of the session id.", {"type": "string"}),
            _query("prefix", "Case-sensitive prefix of the session id.", {"type": "string"}),
            _query("instance", "Only sessions mapped to this instance.", {"type": "string"}),
            _query(
                "limit",
                "Sessions per page.",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            ),
            _query("cursor", "next_cursor of the previous page.", {"type": "string"}),
        ],
        "responses": {
            "200": _ok("One page.", _ref("SessionPage")),
            "400": _err("Bad parameter."),
            "410": _err("The cursor expired (2 minutes unused): start again."),
        },
    },
    ("GET", "/admin/sessions/{session}"): {
        "operationId": "getSession",
        "tags": ["sessions"],
        "summary": "Where a session is mapped, and its state there",
        "parameters": [_SESSION],
        "responses": {
            "200": _ok("The session.", _ref("Session")),
            "400": _err("Invalid session id."),
            "404": _err("Not mapped."),
        },
    },
    ("DELETE", "/admin/sessions/{session}"): {
        "operationId": "forgetSession",
        "tags": ["sessions"],
        "summary": "Forget the map entry (the instances are not touched)",
        "parameters": [_SESSION],
        "responses": {"200": _ok("Forgotten.", _ref("Forgotten")), "404": _err("Not mapped.")},
    },
    ("POST", "/admin/sessions/{session}/move"): {
        "operationId": "moveSession",
        "tags": ["sessions"],
        "summary": "Move a session to a named instance (stop there, start here)",
        "parameters": [_SESSION],
        "requestBody": _body(
            {"type": "object", "required": ["to"], "properties": {"to": {"type": "string"}}}
        ),
        "responses": {
            "200": _ok("Moved (or already there).", _ref("MoveResult")),
            "400": _err("Bad body."),
            "404": _err("Unknown session or instance."),
            "409": _err("Target not healthy / active / full, or the session is busy."),
            "502": _ok("The move ran and failed.", _ref("MoveResult")),
        },
    },
    ("POST", "/admin/sessions/{session}/pin"): {
        "operationId": "pinSession",
        "tags": ["sessions"],
        "summary": "Map a session to the instance it runs on and keep rebalancing off it",
        "description": (
            "The instance is probed first. Without a body, the mapped owner is pinned. "
            "Drains, moves and failovers still move a pinned session."
        ),
        "parameters": [_SESSION],
        "requestBody": _body(
            {"type": "object", "properties": {"instance": {"type": "string"}}}, required=False
        ),
        "responses": {
            "200": _ok("Pinned.", _ref("Pin")),
            "404": _err("Unknown instance, or no instance named and the session is not mapped."),
            "409": _err("It does not run there (not_running), or it is being moved (busy)."),
            "502": _err("The instance did not answer."),
        },
    },
    ("DELETE", "/admin/sessions/{session}/pin"): {
        "operationId": "unpinSession",
        "tags": ["sessions"],
        "summary": "Unpin a session",
        "parameters": [_SESSION],
        "responses": {"200": _ok("Unpinned.", _ref("Pin"))},
    },
    ("GET", "/admin/events"): {
        "operationId": "listEvents",
        "tags": ["fleet"],
        "summary": "Recent failovers, health changes, moves and reloads, oldest first",
        "parameters": [
            _query(
                "limit",
                "At most this many (the latest).",
                {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100},
            ),
            _query(
                "kind",
                "Only kinds starting with this (failover, down, healthy, ejected, move, "
                "drain, config_reload, ...).",
                {"type": "string"},
            ),
        ],
        "responses": {"200": _ok("The events.", _ref("Events")), "400": _err("Bad parameter.")},
    },
    ("POST", "/admin/reconcile"): {
        "operationId": "reconcile",
        "tags": ["fleet"],
        "summary": "One reconcile round now (list every instance, fix the map)",
        "responses": {"200": _ok("The round's report.", _ref("ReconcileRound"))},
    },
    ("POST", "/admin/reload"): {
        "operationId": "reload",
        "tags": ["config"],
        "summary": "Reload the config file",
        "description": (
            "Parsed and validated first; a bad file changes nothing (422 with file:line: "
            "reason). listen, store and webhooks changes wait for a restart "
            "(restart_required)."
        ),
        "responses": {
            "200": _ok("Applied.", _ref("Reload")),
            "409": _err("The config did not come from a file."),
            "422": _ok(
                "Rejected; the config in force stays.",
                {"allOf": [_ref("Error"), _ref("Reload")]},
            ),
        },
    },
    ("GET", "/admin/reload"): {
        "operationId": "reloadStatus",
        "tags": ["config"],
        "summary": "The config file, the last reload and the file watch",
        "responses": {"200": _ok("Reload status.", _ref("ReloadStatus"))},
    },
    ("GET", "/admin/openapi.json"): {
        "operationId": "openapi",
        "tags": ["meta"],
        "summary": "This document",
        "responses": {"200": _ok("An OpenAPI 3.1 document.")},
    },
}

# -- the webhook relay's admin endpoints (router.webhooks.admin) ------------------------

_DEAD_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A dead letter's id.",
    "schema": {"type": "string"},
}
_TARGET = _query("target", "Only this target's dead letters.", {"type": "string"})

WEBHOOK_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/admin/webhooks/stats"): {
        "summary": "Backlog, oldest pending age, lanes, dead letters",
        "responses": {"200": _ok("Queue statistics.")},
    },
    ("GET", "/admin/webhooks/dead-letters"): {
        "summary": "Dead letters, oldest first (no bodies)",
        "parameters": [
            _query("limit", "1..1000", {"type": "integer", "minimum": 1, "maximum": 1000}),
            _query("after", "next of the previous page", {"type": "string"}),
            _TARGET,
        ],
        "responses": {"200": _ok("A page of dead letters.")},
    },
    ("DELETE", "/admin/webhooks/dead-letters"): {
        "summary": "Purge dead letters (of a target, dead before a time)",
        "parameters": [_TARGET, _query("before", "Unix time.", {"type": "number"})],
        "responses": {"200": _ok("How many were purged.")},
    },
    ("POST", "/admin/webhooks/dead-letters/replay"): {
        "summary": "Queue every dead letter (of a target) again",
        "parameters": [_TARGET],
        "responses": {"200": _ok("How many were queued.")},
    },
    ("GET", "/admin/webhooks/dead-letters/{id}"): {
        "summary": "One dead letter, with its body",
        "parameters": [_DEAD_ID],
        "responses": {"200": _ok("The dead letter."), "404": _err("No such dead letter.")},
    },
    ("DELETE", "/admin/webhooks/dead-letters/{id}"): {
        "summary": "Purge one dead letter",
        "parameters": [_DEAD_ID],
        "responses": {"200": _ok("Purged."), "404": _err("No such dead letter.")},
    },
    ("POST", "/admin/webhooks/dead-letters/{id}/replay"): {
        "summary": "Queue one dead letter again",
        "parameters": [_DEAD_ID],
        "responses": {"200": _ok("Queued."), "404": _err("No such dead letter.")},
    },
}

# -- no key -----------------------------------------------------------------------------

PROBES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/healthz"): {
        "operationId": "healthz",
        "tags": ["probes"],
        "summary": "The process is alive",
        "security": [],
        "responses": {"200": _ok("Alive.")},
    },
    ("GET", "/readyz"): {
        "operationId": "readyz",
        "tags": ["probes"],
        "summary": "Config loaded, store reachable, at least one healthy instance",
        "security": [],
        "responses": {"200": _ok("Ready."), "503": _ok("Not ready (the body says why).")},
    },
}

_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _fallback(route: Route) -> dict[str, Any]:
    doc = inspect.getdoc(route.handler) or ""
    summary = doc.splitlines()[0] if doc else route.path
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(route.path)
    ]
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _ok("OK.")}}
    if params:
        op["parameters"] = params
    return op


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.replace("/admin/", "/"))
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


def document(routes: Iterable[Route], *, webhooks: bool = False) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (the admin API's route table)."""
    paths: dict[str, dict[str, Any]] = {}

    def add(method: str, path: str, op: dict[str, Any]) -> None:
        op = copy.deepcopy(op)
        op.setdefault("operationId", _operation_id(method, path))
        responses = op.setdefault("responses", {})
        if op.get("security") != []:
            responses.setdefault("401", _UNAUTHORIZED)
        paths.setdefault(path, {})[method.lower()] = op

    for route in routes:
        op = route.spec or OPERATIONS.get((route.method, route.path)) or _fallback(route)
        add(route.method, route.path, op)
    if webhooks:
        for (method, path), op in WEBHOOK_OPERATIONS.items():
            add(method, path, {**op, "tags": ["webhooks"]})
    for (method, path), op in PROBES.items():
        add(method, path, op)

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wa-session-router admin API",
            "version": __version__,
            "description": (
                "Operate a session-router: the fleet, the session map, drains and moves, "
                "events and config reloads. Every /admin endpoint needs the router's "
                "admin_key (X-Admin-Key or Authorization: Bearer); client api_keys never "
                "open it. Errors are {error, message}."
            ),
        },
        "security": [{"adminKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "parameters": {
                "InstanceName": {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "description": "An instance name from the config.",
                    "schema": {"type": "string"},
                },
                "SessionId": {
                    "name": "session",
                    "in": "path",
                    "required": True,
                    "description": "A session id.",
                    "schema": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN}$"},
                },
            },
            "responses": {
                "Error": {
                    "description": "An error.",
                    "content": {JSON: {"schema": _ref("Error")}},
                }
            },
            "schemas": copy.deepcopy(SCHEMAS),
        },
    }
