"""The admin API as an OpenAPI 3.1 document (``GET /admin/openapi.json``), generated.

Each route of ``router.admin`` is declared with an ``Operation``: a summary,
its query parameters, and the model of its request body and of each answer
(``router.admin_models``). ``document`` turns them into OpenAPI: schemas come
from the models through ``msgspec.json.schema_components`` (JSON Schema
2020-12, the dialect of OpenAPI 3.1), path parameters from the path
template. The webhook relay's ``/admin/webhooks/...`` endpoints (served by
``router.webhooks.admin``) are described here and listed when the relay is
configured; ``/healthz`` and ``/readyz`` (no key) are always listed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from router import __version__
from router import admin_models as m
from router.config import SESSION_ID_PATTERN

JSON = "application/json"
_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# An answer: its description (the body is an ``Error``), or (description, body model).
Answer = str | tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter; ``type`` is what msgspec describes (Annotated for bounds)."""

    name: str
    type: Any
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """One endpoint as OpenAPI shows it; ``body`` is the request body's model."""

    summary: str
    responses: Mapping[int, Answer]
    tag: str = ""
    operation_id: str = ""
    description: str = ""
    query: tuple[Param, ...] = ()
    body: Any = None
    body_required: bool = True
    # No admin key (the probes): no 401, ``security: []``.
    public: bool = False


def bounded(kind: type[float] | type[int], low: float, high: float, default: float) -> Any:
    """A number type between ``low`` and ``high`` (a query parameter's schema)."""
    return Annotated[kind, Meta(ge=low, le=high, extra_json_schema={"default": default})]


PATH_PARAMS = {
    "name": Param("name", str, "An instance name from the config."),
    "session": Param(
        "session", Annotated[str, Meta(pattern=f"^{SESSION_ID_PATTERN}$")], "A session id."
    ),
    "id": Param("id", str, "A dead letter's id."),
}


def describe(handler: Callable[..., Any], path: str) -> Operation:
    """An operation for a route added without one: its handler's docstring, any JSON."""
    doc = inspect.getdoc(handler) or ""
    summary = doc.splitlines()[0] if doc else path
    return Operation(summary, {200: ("OK.", dict[str, Any])})


# -- the webhook relay's admin endpoints (router.webhooks.admin) ------------------------

_TARGET = Param("target", str, "Only this target's dead letters.")
_QUEUE_DOWN = "The queue's store is unreachable."
_NO_DEAD = "No such dead letter."


def _hook(
    method: str,
    path: str,
    summary: str,
    responses: Mapping[int, Answer],
    query: tuple[Param, ...] = (),
) -> tuple[str, str, Operation]:
    answers = {**responses, 503: _QUEUE_DOWN}
    return method, path, Operation(summary, answers, tag="webhooks", query=query)


WEBHOOK_OPERATIONS = (
    _hook(
        "GET",
        "/admin/webhooks/stats",
        "Backlog, oldest pending age, lanes, dead letters",
        {200: ("Queue statistics.", m.WebhookStats)},
    ),
    _hook(
        "GET",
        "/admin/webhooks/dead-letters",
        "Dead letters, oldest first (no bodies)",
        {200: ("A page of dead letters.", m.DeadLetterPage), 400: "Bad limit."},
        (
            Param("limit", bounded(int, 1, 1000, 100), "Dead letters per page."),
            Param("after", str, "next of the previous page."),
            _TARGET,
        ),
    ),
    _hook(
        "DELETE",
        "/admin/webhooks/dead-letters",
        "Purge dead letters (of a target, dead before a time)",
        {200: ("How many were purged.", m.Purged), 400: "before is not a unix time."},
        (_TARGET, Param("before", float, "Unix time.")),
    ),
    _hook(
        "POST",
        "/admin/webhooks/dead-letters/replay",
        "Queue every dead letter (of a target) again",
        {200: ("How many were queued.", m.Replayed)},
        (_TARGET,),
    ),
    _hook(
        "GET",
        "/admin/webhooks/dead-letters/{id}",
        "One dead letter, with its body",
        {200: ("The dead letter.", m.DeadLetter), 404: _NO_DEAD},
    ),
    _hook(
        "DELETE",
        "/admin/webhooks/dead-letters/{id}",
        "Purge one dead letter",
        {200: ("Purged.", m.Purged), 404: _NO_DEAD},
    ),
    _hook(
        "POST",
        "/admin/webhooks/dead-letters/{id}/replay",
        "Queue one dead letter again",
        {200: ("Queued.", m.Replayed), 404: _NO_DEAD},
    ),
)

# -- no key ---------------------------------------------------------------------------

PROBES: tuple[tuple[str, str, Operation], ...] = (
    (
        "GET",
        "/healthz",
        Operation(
            "The process is alive",
            {200: ("Alive.", m.Healthz)},
            tag="probes",
            operation_id="healthz",
            public=True,
        ),
    ),
    (
        "GET",
        "/readyz",
        Operation(
            "Config loaded, store reachable, at least one healthy instance",
            {200: ("Ready.", m.Readyz), 503: ("Not ready (the body says why).", m.Readyz)},
            tag="probes",
            operation_id="readyz",
            public=True,
        ),
    ),
)

# -- the document -----------------------------------------------------------------------


class _Schemas:
    """JSON schemas of types, filled in by one ``msgspec`` call at the end (``finish``);
    named models go to ``components`` and are referenced."""

    def __init__(self) -> None:
        self._wanted: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, kind: Any) -> dict[str, Any]:
        schema: dict[str, Any] = {}
        self._wanted.append((kind, schema))
        return schema

    def content(self, kind: Any) -> dict[str, Any]:
        return {JSON: {"schema": self(kind)}}

    def finish(self) -> dict[str, Any]:
        """Fill every schema handed out; the components they refer to."""
        kinds = [kind for kind, _ in self._wanted]
        found, components = msgspec.json.schema_components(kinds, ref_template=_REF)
        for (_, schema), generated in zip(self._wanted, found, strict=True):
            schema.update(generated)
        for model in _subclasses(m.Model):
            if model.open_schema is not None and model.__name__ in components:
                components[model.__name__]["additionalProperties"] = model.open_schema
        return dict(sorted(components.items()))


def _subclasses(cls: type[m.Model]) -> Iterable[type[m.Model]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.replace("/admin/", "/"))
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


def _parameter(where: str, param: Param, schemas: _Schemas) -> dict[str, Any]:
    out = {"name": param.name, "in": where, "required": where == "path"}
    if param.description:
        out["description"] = param.description
    return {**out, "schema": schemas(param.type)}


def _operation(method: str, path: str, op: Operation, schemas: _Schemas) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id or _operation_id(method, path)}
    if op.tag:
        out["tags"] = [op.tag]
    out["summary"] = op.summary
    if op.description:
        out["description"] = op.description
    params = [
        _parameter("path", PATH_PARAMS.get(name, Param(name, str)), schemas)
        for name in _PATH_PARAM.findall(path)
    ]
    params += [_parameter("query", q, schemas) for q in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": schemas.content(op.body)}
    answers = dict(op.responses)
    if op.public:
        out["security"] = []
    else:
        answers.setdefault(401, "Missing or invalid admin key.")
    responses: dict[str, Any] = {}
    for status, answer in sorted(answers.items()):
        description, model = (answer, m.Error) if isinstance(answer, str) else answer
        responses[str(status)] = {"description": description, "content": schemas.content(model)}
    out["responses"] = responses
    return out


def document(
    routes: Iterable[tuple[str, str, Operation]], *, webhooks: bool = False
) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (method, path template, operation)."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    every = [*routes, *(WEBHOOK_OPERATIONS if webhooks else ()), *PROBES]
    for method, path, op in every:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, schemas)
    error = schemas.content(m.Error)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wa-session-router admin API",
            "version": __version__,
            "description": (
                "Operate a session-router: the fleet, the session map, drains and moves, "
                "events and config reloads. Every /admin endpoint needs the router's "
                "admin_key (X-Admin-Key or Authorization: Bearer); client api_keys never "
                "open it, and without an admin_key every /admin path answers 404. "
                "Errors are {error, message}: an unknown path answers 404 (NotFound), a "
                "method a path does not take 405 with Allow (MethodNotAllowed)."
            ),
        },
        "security": [{"adminKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "responses": {
                "NotFound": {"description": "No such endpoint.", "content": error},
                "MethodNotAllowed": {
                    "description": "The path does not take this method.",
                    "headers": {
                        "Allow": {
                            "description": "The methods it takes.",
                            "schema": {"type": "string"},
                        }
                    },
                    "content": error,
                },
            },
            "schemas": schemas.finish(),
        },
    }
