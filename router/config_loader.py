"""Load, interpolate and validate the router's YAML config.

The file is parsed with PyYAML's node API (``yaml.compose`` + ``SafeLoader``)
rather than ``safe_load`` so that every value keeps the line it came from and
every rejection can say ``file:line: key.path: reason``. Nothing is guessed:
unknown keys, duplicate keys, wrong types and out-of-range values are errors.

``${VAR}`` and ``${VAR:-default}`` are expanded inside string scalars (use them
for secrets); ``$${`` writes a literal ``${``. A value that came from the
environment is never echoed in an error message, since it may be a secret.

Public API: ``load_file``, ``parse_text``, ``check_config``, ``parse_size``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

import yaml

from router.config import (
    WEBHOOK_FORMATS,
    AdapterConfig,
    ConfigError,
    DiscoveryConfig,
    FailoverConfig,
    HealthConfig,
    IdempotencyConfig,
    InstanceConfig,
    Limits,
    ListenConfig,
    OutlierConfig,
    RouterConfig,
    RoutesConfig,
    StoreConfig,
    Timeouts,
    WebhookConfig,
    WebhookDelivery,
    WebhookIngest,
    WebhookTarget,
    redact_url,
)

_D = TypeVar("_D")

__all__ = [
    "ADAPTER_KINDS",
    "check_config",
    "load_file",
    "parse_size",
    "parse_text",
    "summarize",
]

ADAPTER_KINDS: tuple[str, ...] = ("waha", "blazz", "wwebjs", "evolution", "generic")

INSTANCE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

# ``$${`` (escape), ``${NAME}``, ``${NAME:-default}``, or a malformed ``${``.
_INTERP_RE = re.compile(
    r"\$\$\{"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
    r"|(?P<bad>\$\{[^}]{0,40}\}?)"
)

_SIZE_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)")
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Guard against alias bombs ("billion laughs") in adapter options.
_MAX_OPTION_NODES = 100_000


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def load_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RouterConfig:
    """Read and validate the YAML config at ``path``.

    ``env`` replaces ``os.environ`` for ``${VAR}`` interpolation (tests).
    Raises ``ConfigError`` (``file:line: reason``) on any problem.
    """
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(
            filename, None, f"cannot read config file: {exc.strerror or exc}"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(filename, line, "file is not valid UTF-8") from None
    return parse_text(text, filename, env=env)


def parse_text(text: str, filename: str, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Validate YAML ``text``; ``filename`` is used in error messages only."""
    parser = _Parser(filename, os.environ if env is None else env)
    return parser.parse(text)


def check_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """For ``session-router check-config FILE``: ``(ok, text)``.

    On success ``text`` is a short human summary without secrets; on failure
    it is the ``file:line: reason`` message.
    """
    try:
        cfg = load_file(path, env=env)
    except ConfigError as exc:
        return False, str(exc)
    return True, summarize(cfg)


def summarize(cfg: RouterConfig) -> str:
    """A few lines describing ``cfg``, safe to print (no keys, no passwords)."""
    lines = [f"{cfg.source or '<config>'}: OK"]
    lines.append(f"  listen:      {_host_port(cfg.listen.host, cfg.listen.port)}")
    opts = f" ({len(cfg.adapter.options)} option(s))" if cfg.adapter.options else ""
    lines.append(f"  adapter:     {cfg.adapter.kind}{opts}")
    lines.append(f"  store:       {redact_url(cfg.store.url)} (prefix {cfg.store.key_prefix!r})")
    n_keys = len(cfg.api_keys)
    auth = f"{n_keys} client key(s)" if n_keys else "DISABLED (no api_keys: anyone may call)"
    lines.append(f"  client auth: {auth}")
    total = sum(i.max_sessions for i in cfg.instances)
    lines.append(f"  instances:   {len(cfg.instances)} (capacity {total} sessions)")
    for inst in cfg.instances:
        key = "key set" if inst.api_key else "no key"
        lines.append(
            f"    - {inst.name}: {inst.url} "
            f"max_sessions={inst.max_sessions} weight={inst.weight:g} ({key})"
        )
    t, h = cfg.timeouts, cfg.health
    lines.append(
        f"  timeouts:    connect={t.connect:g}s read={t.read:g}s"
        f" idle_keepalive={t.idle_keepalive:g}s"
    )
    lines.append(
        f"  health:      every {h.interval:g}s, timeout {h.timeout:g}s,"
        f" rise {h.rise}, fall {h.fall}"
    )
    if cfg.webhooks is not None:
        wh = cfg.webhooks
        queue = (
            f"sqlite {wh.sqlite_path} (synchronous={wh.sqlite_synchronous})"
            if cfg.store.is_memory
            else "redis streams (same store)"
        )
        lines.append(f"  webhooks:    {len(wh.targets)} target(s), queue {queue}")
        for tgt in wh.targets:
            signed = "signed" if tgt.hmac_key else "unsigned"
            lines.append(f"    - {tgt.name}: {tgt.url} (format {tgt.format}, {signed})")
    if t.idle_keepalive >= 5:
        lines.append(
            "  note: timeouts.idle_keepalive is not below Node's default 5 s keepAliveTimeout;"
            " expect occasional stale-connection resets unless the instances keep sockets longer"
        )
    return "\n".join(lines)


def parse_size(value: str) -> int | None:
    """``"10MiB"`` -> 10485760, ``"512KB"`` -> 512000, ``"42"`` -> 42; None if malformed.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (units are
    case-insensitive; a bare number is bytes).
    """
    m = _SIZE_RE.fullmatch(value.strip())
    if m is None:
        return None
    factor = _SIZE_UNITS.get(m.group("unit").lower())
    if factor is None:
        return None
    num = m.group("num")
    if "." in num:
        return int(float(num) * factor)
    return int(num) * factor


# --------------------------------------------------------------------------
# implementation
# --------------------------------------------------------------------------


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(value: object) -> str:
    """A YAML-flavoured description of a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


@dataclass(frozen=True, slots=True)
class _Value:
    """One scalar after interpolation, with where it came from."""

    value: Any
    node: yaml.Node
    path: str
    env_vars: tuple[str, ...] = ()
    # A plain (unquoted) scalar that contained ``${...}``: its expansion may
    # be read as a number, e.g. ``port: ${PORT:-8080}``.
    retypable: bool = False
    secret: bool = False

    @property
    def line(self) -> int:
        return _line(self.node)

    def shown(self) -> str:
        """How the value may appear in an error message."""
        if self.value == "":
            kind = "an empty string"
            return (
                f"{kind} from {', '.join(f'${{{n}}}' for n in self.env_vars)}"
                if self.env_vars
                else kind
            )
        if self.env_vars:
            names = ", ".join(f"${{{n}}}" for n in self.env_vars)
            return f"{_kind(self.value)} from {names} (value hidden)"
        if self.secret:
            return f"{_kind(self.value)} (value hidden)"
        v = self.value
        if v is None:
            return "null"
        if isinstance(v, bool):
            return f"{'true' if v else 'false'} (a boolean)"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return repr(v) if len(v) <= 80 else repr(v[:77] + "...")
        return _kind(v)


class _Parser:
    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        self.file = filename
        self.env = env
        self._loader = yaml.SafeLoader("")
        self._option_nodes = 0
        # Expanded ${...} values inside adapter options, scrubbed from messages.
        self._env_strings: set[str] = set()
        # webhooks.ingest.instance_keys names, checked against instances at the end.
        self._webhook_instance_nodes: dict[str, yaml.ScalarNode] = {}
        # ``instance_defaults``: fields every instance gets unless it sets them.
        self._instance_defaults: dict[str, Any] = {}
        # Problems found so far: the whole file is checked, then all are reported.
        self._errors: list[ConfigError] = []

    # -- errors ---------------------------------------------------------

    def note(self, exc: ConfigError) -> None:
        """Keep a problem and go on checking. One per place: a second problem
        at the same line and column is a consequence of the first (an unset
        variable making a value empty), not news."""
        if all((e.line, e.column) != (exc.line, exc.column) for e in self._errors):
            self._errors.append(exc)

    def _collecting(self, fn: Callable[[], _D]) -> tuple[bool, _D | None]:
        """``(True, fn())``, or ``(False, None)`` after noting what stopped it."""
        try:
            return True, fn()
        except ConfigError as exc:
            self.note(exc)
        except _Noted:
            pass
        return False, None

    def fail(self, where: yaml.Node | int | None, reason: str) -> NoReturn:
        raise self._error(where, reason)

    def _error(self, where: yaml.Node | int | None, reason: str) -> ConfigError:
        if isinstance(where, yaml.Node):
            return ConfigError(self.file, _line(where), reason, column=where.start_mark.column)
        return ConfigError(self.file, where, reason)

    # -- document -------------------------------------------------------

    def parse(self, text: str) -> RouterConfig:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = int(mark.line) + 1 if mark is not None else None
            what = exc.problem or exc.context or "invalid YAML"
            if exc.context and exc.problem:
                ctx = exc.context
                cmark = exc.context_mark
                if cmark is not None and line is not None and int(cmark.line) + 1 != line:
                    ctx = f"{ctx} started at line {int(cmark.line) + 1}"
                what = f"{exc.problem} ({ctx})"
            if exc.context == "expected a single document in the stream":
                what = "only one YAML document is allowed, found a second one"
            elif "'\\t'" in what:
                what += "; indent with spaces, YAML does not allow tabs"
            raise ConfigError(self.file, line, f"YAML syntax error: {what}") from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, max(exc.position, 0)) + 1
            raise ConfigError(
                self.file, line, f"YAML syntax error: character U+{exc.character:04X}: {exc.reason}"
            ) from None
        except yaml.YAMLError as exc:  # pragma: no cover - other YAMLErrors carry no mark
            raise ConfigError(self.file, None, f"YAML error: {exc}") from None

        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
            self.fail(1 if root is None else root, "config file is empty")
        if not isinstance(root, yaml.MappingNode):
            self.fail(root, f"top level must be a mapping of settings, got {self._node_kind(root)}")

        self._check_structure(root)
        self._check_env(root)
        _, cfg = self._collecting(lambda: self._router(root))
        if self._errors:
            ordered = sorted(self._errors, key=lambda e: (e.line or 0, e.column or 0))
            raise ConfigError.combine(ordered)
        assert cfg is not None
        return cfg

    def _node_kind(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if node.tag == _NULL:
            return "null"
        return f"the scalar {str(node.value)[:40]!r}"

    def _check_env(self, root: yaml.Node) -> None:
        """Note every unset ``${VAR}`` of the file up front, so one run names
        them all (a section stops at its first problem)."""
        seen: set[int] = set()

        def walk(node: yaml.Node, path: str) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    walk(v, _join(path, str(k.value)))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, f"{path}[{i}]")
            elif node.tag == _STR and "$" in str(node.value):
                self._collecting(lambda: self._interpolate(str(node.value), node, path))

        walk(root, "")

    def _check_structure(self, root: yaml.Node) -> None:
        """Reject duplicate keys anywhere in the document (PyYAML keeps the last)."""
        seen: set[int] = set()

        def walk(node: yaml.Node, path: str) -> None:
            if id(node) in seen:  # aliases (and recursive aliases) are visited once
                return
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                first: dict[str, yaml.Node] = {}
                for k, v in node.value:
                    if not isinstance(k, yaml.ScalarNode):
                        self.fail(k, f"{path or 'top level'}: keys must be plain strings")
                    if k.tag == _MERGE:
                        walk(v, path)
                        continue
                    key = str(k.value)
                    sub = _join(path, key)
                    if key in first:
                        self.fail(
                            k, f"{sub}: duplicate key (first defined at line {_line(first[key])})"
                        )
                    first[key] = k
                    walk(v, sub)
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, f"{path}[{i}]")

        walk(root, "")

    # -- mappings ---------------------------------------------------------

    def _pairs(
        self, node: yaml.MappingNode, path: str, stack: frozenset[int] = frozenset()
    ) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        """Key/value pairs with ``<<`` merge keys applied (explicit keys win)."""
        if id(node) in stack:
            self.fail(node, f"{path or 'top level'}: recursive '<<' merge")
        stack = stack | {id(node)}
        explicit: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        merged: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        for k, v in node.value:
            if k.tag == _MERGE:
                sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
                for src in sources:
                    if not isinstance(src, yaml.MappingNode):
                        self.fail(src, f"{path or 'top level'}: '<<' merges only mappings")
                    merged.extend(self._pairs(src, path, stack))
            else:
                explicit.append((k, v))
        names = {str(k.value) for k, _ in explicit}
        out: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        for k, v in merged:
            key = str(k.value)
            if key not in names:
                names.add(key)
                out.append((k, v))
        return out + explicit

    def _mapping(
        self,
        node: yaml.Node,
        path: str,
        allowed: tuple[str, ...],
        *,
        required: tuple[str, ...] = (),
    ) -> dict[str, tuple[yaml.ScalarNode, yaml.Node]]:
        """A schema'd mapping: ``{key: (key_node, value_node)}``; null counts as empty."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            pairs: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        elif isinstance(node, yaml.MappingNode):
            pairs = self._pairs(node, path)
        else:
            self.fail(node, f"{path}: must be a mapping, got {self._node_kind(node)}")
        out: dict[str, tuple[yaml.ScalarNode, yaml.Node]] = {}
        for k, v in pairs:
            key = str(k.value)
            if key not in allowed:
                # Noted, not fatal: the rest of the mapping is still checked.
                self.note(
                    self._error(k, f"{_join(path, key)}: unknown key{_suggest(key, allowed)}")
                )
                continue
            out[key] = (k, v)
        for key in required:
            if key not in out:
                self.fail(node, f"{path}: missing required key '{key}'")
        return out

    # -- scalars ----------------------------------------------------------

    def _scalar(self, node: yaml.Node, path: str, *, secret: bool = False) -> _Value:
        if not isinstance(node, yaml.ScalarNode):
            kind = self._node_kind(node)
            self.fail(node, f"{path}: must be a single value, got {kind}")
        if node.tag == _STR:
            text, names = self._interpolate(str(node.value), node, path)
            return _Value(text, node, path, names, bool(names) and node.style is None, secret)
        return _Value(self._construct(node, path), node, path, (), False, secret)

    def _construct(self, node: yaml.Node, path: str) -> Any:
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.fail(node, f"{path or 'top level'}: cannot read value: {exc.problem or exc}")

    def _interpolate(self, text: str, node: yaml.Node, path: str) -> tuple[str, tuple[str, ...]]:
        if "$" not in text:
            return text, ()
        names: list[str] = []

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            if m.group("bad") is not None:
                self.fail(
                    node,
                    f"{path}: bad interpolation {m.group('bad')!r}: "
                    "expected ${NAME} or ${NAME:-default} (write $${ for a literal ${)",
                )
            name = m.group("name")
            names.append(name)
            value = self.env.get(name)
            default = m.group("default")
            if default is not None:
                return value if value else default
            if value is None:
                self.fail(
                    node,
                    f"{path}: environment variable {name} is not set "
                    f"(set it, or give a default: ${{{name}:-default}})",
                )
            return value

        out = _INTERP_RE.sub(repl, text)
        return out, tuple(dict.fromkeys(names))

    def _retyped(self, v: _Value) -> Any:
        """The value, reading an expanded plain ``${...}`` as YAML would read it."""
        if v.retypable and isinstance(v.value, str):
            resolver: Any = self._loader  # Resolver.resolve is untyped in the stubs
            tag = resolver.resolve(yaml.ScalarNode, v.value, (True, False))
            if tag != _STR:
                return self._construct(yaml.ScalarNode(tag, v.value, v.node.start_mark), v.path)
        return v.value

    # -- typed getters ----------------------------------------------------

    def _str(
        self,
        node: yaml.Node,
        path: str,
        *,
        secret: bool = False,
        allow_empty: bool = False,
    ) -> str:
        v = self._scalar(node, path, secret=secret)
        if not isinstance(v.value, str):
            hint = " (quote it)" if isinstance(v.value, bool | int | float) else ""
            self.fail(node, f"{path}: must be a string, got {v.shown()}{hint}")
        if not allow_empty and not v.value.strip():
            self.fail(node, f"{path}: must be a non-empty string, got {v.shown()}")
        if secret and v.value != v.value.strip():
            self.fail(node, f"{path}: must not start or end with whitespace ({v.shown()})")
        return v.value

    def _int(self, node: yaml.Node, path: str, lo: int, hi: int | None = None) -> int:
        v = self._scalar(node, path)
        value = self._retyped(v)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            rule = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
            self.fail(node, f"{path}: must be {rule}, got {v.shown()}")
        return value

    def _positive(self, node: yaml.Node, path: str) -> float:
        v = self._scalar(node, path)
        value = self._retyped(v)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.fail(node, f"{path}: must be a number > 0, got {v.shown()}")
        return float(value)

    def _size(self, node: yaml.Node, path: str) -> int:
        v = self._scalar(node, path)
        value = self._retyped(v)
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str):
            size = parse_size(value)
        if size is None or size < 1:
            self.fail(
                node,
                f"{path}: must be a size in bytes >= 1, as an integer or a string like "
                f"'10MiB' or '512KB' (units B, KB, MB, GB, KiB, MiB, GiB), got {v.shown()}",
            )
        return size

    def _plain(self, node: yaml.Node, path: str, stack: frozenset[int] = frozenset()) -> Any:
        """Free-form data (adapter options) as plain Python, interpolated."""
        self._option_nodes += 1
        if self._option_nodes > _MAX_OPTION_NODES:
            self.fail(node, f"{path}: too much data (alias expansion?)")
        if id(node) in stack:
            self.fail(node, f"{path}: recursive alias")
        inner = stack | {id(node)}
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in self._pairs(node, path):
                key = str(k.value)
                if k.tag != _STR:
                    key_v = self._construct(k, _join(path, key))
                    if not isinstance(key_v, str):
                        self.fail(k, f"{_join(path, key)}: option keys must be strings")
                out[key] = self._plain(v, _join(path, key), inner)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(item, f"{path}[{i}]", inner) for i, item in enumerate(node.value)]
        sv = self._scalar(node, path)
        if sv.env_vars and isinstance(sv.value, str) and sv.value:
            self._env_strings.add(sv.value)
        return self._retyped(sv)

    def _bool(self, node: yaml.Node, path: str) -> bool:
        v = self._scalar(node, path)
        value = self._retyped(v)
        if not isinstance(value, bool):
            self.fail(node, f"{path}: must be true or false, got {v.shown()}")
        return value

    def _number(self, node: yaml.Node, path: str, lo: float) -> float:
        v = self._scalar(node, path)
        value = self._retyped(v)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < lo
        ):
            self.fail(node, f"{path}: must be a number >= {lo:g}, got {v.shown()}")
        return float(value)

    def _section(self, node: yaml.Node, name: str, cls: type[_D]) -> _D:
        """A flat section read straight from its dataclass: every field is
        optional and typed by its default (bool, int >= 0, float >= 0)."""
        defaults = cls()
        names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        m = self._mapping(node, name, names)
        values: dict[str, Any] = {}
        for key, (_, v) in m.items():
            path = f"{name}.{key}"
            default = getattr(defaults, key)
            if isinstance(default, bool):
                values[key] = self._bool(v, path)
            elif isinstance(default, int):
                values[key] = self._int(v, path, 0)
            else:
                values[key] = self._number(v, path, 0.0)
        return dataclasses.replace(defaults, **values)  # type: ignore[type-var]

    # -- sections ---------------------------------------------------------

    def _router(self, root: yaml.MappingNode) -> RouterConfig:
        sections: dict[str, Callable[[yaml.ScalarNode, yaml.Node], Any]] = {
            "listen": lambda k, v: self._listen(v),
            "api_keys": lambda k, v: self._api_keys(v),
            "adapter": self._adapter,
            "store": lambda k, v: self._store(v),
            "timeouts": lambda k, v: self._timeouts(v),
            "limits": lambda k, v: self._limits(v),
            "health": lambda k, v: self._health(v),
            "instance_defaults": lambda k, v: self._read_instance_defaults(v),
            "instances": lambda k, v: self._instances(v),
            "outlier": lambda k, v: self._section(v, "outlier", OutlierConfig),
            "failover": lambda k, v: self._section(v, "failover", FailoverConfig),
            "discovery": lambda k, v: self._section(v, "discovery", DiscoveryConfig),
            "idempotency": lambda k, v: self._section(v, "idempotency", IdempotencyConfig),
            "admin_key": lambda k, v: self._opt_secret(v, "admin_key"),
            "webhooks": lambda k, v: self._webhooks(v),
            "routes": lambda k, v: self._routes(v),
        }
        top = self._mapping(root, "", tuple(sections))
        values: dict[str, Any] = {}
        failed = False
        # In file order, but the defaults before the instances they apply to.
        for key, (k, v) in sorted(top.items(), key=lambda kv: kv[0] != "instance_defaults"):
            ok, values[key] = self._collecting(functools.partial(sections[key], k, v))
            failed = failed or not ok
        values.pop("instance_defaults", None)
        if "instances" not in top:
            self.fail(root, "instances: missing required key (list at least one instance)")
        if failed or self._errors:
            raise _Noted  # the later checks would only repeat what is noted
        if values.get("webhooks") is not None:
            self._check_webhook_instances(values["instances"])
        return RouterConfig(source=self.file, **values)

    def _routes(self, node: yaml.Node) -> RoutesConfig:
        m = self._mapping(node, "routes", ("allow", "deny"))
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("allow", "deny"):
            if key in m:
                patterns = self._str_list(m[key][1], f"routes.{key}")
                for p in patterns:
                    if not p.startswith("/"):
                        self.fail(m[key][1], f"routes.{key}: {p!r} must start with '/'")
                lists[key] = tuple(p.lower() for p in patterns)
        return RoutesConfig(**lists)

    def _listen(self, node: yaml.Node) -> ListenConfig:
        m = self._mapping(node, "listen", ("host", "port"))
        d = ListenConfig()
        host = self._str(m["host"][1], "listen.host") if "host" in m else d.host
        if any(c.isspace() for c in host):
            self.fail(m["host"][1], f"listen.host: must not contain whitespace, got {host!r}")
        port = self._int(m["port"][1], "listen.port", 0, 65535) if "port" in m else d.port
        return ListenConfig(host=host, port=port)

    def _api_keys(self, node: yaml.Node) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
            return (self._str(node, "api_keys", secret=True),)
        if not isinstance(node, yaml.SequenceNode):
            self.fail(
                node,
                f"api_keys: must be a list of strings or one string, got {self._node_kind(node)}"
                " (omit the key, or write [], to disable client authentication)",
            )
        keys: list[str] = []
        for i, item in enumerate(node.value):
            path = f"api_keys[{i}]"
            v = self._scalar(item, path, secret=True)
            if v.env_vars and v.value == "":
                continue  # an optional key, e.g. "${ROUTER_API_KEY_NEXT:-}", left unset
            key = self._str(item, path, secret=True)
            if key not in keys:
                keys.append(key)
        if node.value and not keys:
            self.fail(
                node,
                "api_keys: every entry expanded to an empty string, which would disable "
                "client authentication; write api_keys: [] to disable it on purpose",
            )
        return tuple(keys)

    def _adapter(self, key_node: yaml.ScalarNode, node: yaml.Node) -> AdapterConfig:
        m = self._mapping(node, "adapter", ("kind", "options"))
        kind = AdapterConfig().kind
        if "kind" in m:
            kind_node = m["kind"][1]
            kind = self._str(kind_node, "adapter.kind")
            if kind not in ADAPTER_KINDS:
                self.fail(
                    kind_node,
                    f"adapter.kind: unknown adapter {kind!r}{_suggest(kind, ADAPTER_KINDS)}",
                )
        options: dict[str, Any] = {}
        if "options" in m:
            opt_node = m["options"][1]
            if not (
                isinstance(opt_node, yaml.MappingNode)
                or (isinstance(opt_node, yaml.ScalarNode) and opt_node.tag == _NULL)
            ):
                self.fail(
                    opt_node, f"adapter.options: must be a mapping, got {self._node_kind(opt_node)}"
                )
            if isinstance(opt_node, yaml.MappingNode):
                options = self._plain(opt_node, "adapter.options")
        cfg = AdapterConfig(kind=kind, options=options)
        self._validate_adapter(key_node, cfg)
        return cfg

    def _validate_adapter(self, key_node: yaml.Node, cfg: AdapterConfig) -> None:
        build = _build_adapter_fn()
        if build is None:
            return
        try:
            build(cfg)
        except (ValueError, TypeError) as exc:
            reason = str(exc)
            for secret in sorted(self._env_strings, key=len, reverse=True):
                reason = reason.replace(secret, "***")
            self.fail(key_node, f"adapter: invalid {cfg.kind} adapter settings: {reason}")

    def _store(self, node: yaml.Node) -> StoreConfig:
        m = self._mapping(node, "store", ("url", "key_prefix"))
        d = StoreConfig()
        url = d.url
        if "url" in m:
            url_node = m["url"][1]
            url = self._str(url_node, "store.url", secret=True)
            reason = _store_url_problem(url)
            if reason:
                self.fail(url_node, f"store.url: {reason}")
        prefix = d.key_prefix
        if "key_prefix" in m:
            p_node = m["key_prefix"][1]
            prefix = self._str(p_node, "store.key_prefix")
            if any(c.isspace() for c in prefix):
                self.fail(p_node, f"store.key_prefix: must not contain whitespace, got {prefix!r}")
        return StoreConfig(url=url, key_prefix=prefix)

    def _timeouts(self, node: yaml.Node) -> Timeouts:
        m = self._mapping(node, "timeouts", ("connect", "read", "idle_keepalive"))
        d = Timeouts()
        vals = {k: self._positive(v, f"timeouts.{k}") for k, (_, v) in m.items()}
        return Timeouts(
            connect=vals.get("connect", d.connect),
            read=vals.get("read", d.read),
            idle_keepalive=vals.get("idle_keepalive", d.idle_keepalive),
        )

    def _limits(self, node: yaml.Node) -> Limits:
        sizes = ("max_body_bytes", "max_buffered_bytes")
        counts = ("max_connections_per_instance", "max_client_connections")
        seconds = ("header_timeout", "body_timeout", "idle_timeout")
        m = self._mapping(node, "limits", (*sizes, *counts, *seconds))
        values: dict[str, Any] = {}
        for key in sizes:
            if key in m:
                values[key] = self._size(m[key][1], f"limits.{key}")
        for key in counts:
            if key in m:
                values[key] = self._int(m[key][1], f"limits.{key}", 0)
        for key in seconds:
            if key in m:
                values[key] = self._positive(m[key][1], f"limits.{key}")
        return dataclasses.replace(Limits(), **values)

    def _health(self, node: yaml.Node) -> HealthConfig:
        m = self._mapping(node, "health", ("interval", "timeout", "rise", "fall"))
        d = HealthConfig()
        interval = self._positive(m["interval"][1], "health.interval") if "interval" in m else None
        timeout = self._positive(m["timeout"][1], "health.timeout") if "timeout" in m else None
        rise = self._int(m["rise"][1], "health.rise", 1) if "rise" in m else d.rise
        fall = self._int(m["fall"][1], "health.fall", 1) if "fall" in m else d.fall
        iv = d.interval if interval is None else interval
        to = d.timeout if timeout is None else timeout
        if to >= iv:
            where = m["timeout"][1] if "timeout" in m else m["interval"][1]
            to_s = f"{to:g}" if timeout is not None else f"default {to:g}"
            iv_s = f"{iv:g}" if interval is not None else f"default {iv:g}"
            self.fail(
                where,
                f"health.timeout ({to_s}) must be less than health.interval ({iv_s}), "
                "so one check ends before the next begins",
            )
        return HealthConfig(interval=iv, timeout=to, rise=rise, fall=fall)

    def _read_instance_defaults(self, node: yaml.Node) -> None:
        m = self._mapping(node, "instance_defaults", _INSTANCE_KEYS[2:])
        self._instance_defaults = self._instance_fields(m, "instance_defaults")

    def _instance_fields(
        self, m: dict[str, tuple[yaml.ScalarNode, yaml.Node]], path: str
    ) -> dict[str, Any]:
        """The optional fields of an instance that ``m`` sets."""
        out: dict[str, Any] = {}
        if "max_sessions" in m:
            out["max_sessions"] = self._int(m["max_sessions"][1], f"{path}.max_sessions", 1)
        if "weight" in m:
            out["weight"] = self._positive(m["weight"][1], f"{path}.weight")
        if "api_key" in m:
            out["api_key"] = self._opt_secret(m["api_key"][1], f"{path}.api_key")
        return out

    def _instances_from_text(self, node: yaml.ScalarNode) -> tuple[InstanceConfig, ...]:
        """``instances: "wa-1=http://h1:3000 wa-2=http://h2:3000"`` (commas or spaces
        between entries), typically from ``${WA_INSTANCES}`` in a container; the
        other fields come from ``instance_defaults``."""
        v = self._scalar(node, "instances")
        items = [t for t in re.split(r"[\s,]+", str(v.value)) if t]
        if not isinstance(v.value, str) or not items:
            self.fail(
                node,
                "instances: must be a non-empty list of instances, or a string of "
                f"NAME=URL entries, got {v.shown()}",
            )
        out: list[InstanceConfig] = []
        for i, item in enumerate(items):
            path = f"instances[{i}]"
            name, sep, url_text = item.partition("=")
            if not sep or not INSTANCE_NAME_RE.fullmatch(name):
                self.fail(
                    node,
                    f"{path}: expected NAME=URL with NAME of letters, digits, '_', '.', '-' "
                    f"(entry {i + 1} of {v.shown()})",
                )
            url_node = yaml.ScalarNode(_STR, url_text, node.start_mark, node.end_mark, style="'")
            url = self._instance_url(url_node, f"{path}.url")
            out.append(InstanceConfig(name=name, url=url, **self._instance_defaults))
        self._check_unique(out, [(node, node)] * len(out))
        return tuple(out)

    def _instances(self, node: yaml.Node) -> tuple[InstanceConfig, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return self._instances_from_text(node)
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            got = "an empty list" if isinstance(node, yaml.SequenceNode) else self._node_kind(node)
            self.fail(node, f"instances: must be a non-empty list of instances, got {got}")
        out: list[InstanceConfig] = []
        where: list[tuple[yaml.Node, yaml.Node]] = []
        failed = False
        for i, item in enumerate(node.value):
            path = f"instances[{i}]"
            ok, checked = self._collecting(functools.partial(self._instance, item, path))
            if not ok or checked is None:
                failed = True  # noted; go on with the next instance
                continue
            inst, m = checked
            out.append(inst)
            where.append((m["name"][1], m["url"][1]))
        if failed:
            raise _Noted
        self._check_unique(out, where)
        return tuple(out)

    def _check_unique(
        self, instances: list[InstanceConfig], where: list[tuple[yaml.Node, yaml.Node]]
    ) -> None:
        """No two instances share a name or reach the same URL."""
        names: dict[str, tuple[int, int]] = {}
        urls: dict[str, tuple[int, int]] = {}
        for i, (inst, (name_node, url_node)) in enumerate(zip(instances, where, strict=True)):
            path = f"instances[{i}]"
            if inst.name in names:
                j, line = names[inst.name]
                self.fail(
                    name_node,
                    f"{path}.name: duplicate instance name {inst.name!r} "
                    f"(also instances[{j}] at line {line})",
                )
            names[inst.name] = (i, _line(name_node))
            ukey = _url_identity(inst.url)
            if ukey in urls:
                j, line = urls[ukey]
                self.fail(
                    url_node,
                    f"{path}.url: {inst.url} is already used by instances[{j}] (line {line})",
                )
            urls[ukey] = (i, _line(url_node))

    def _instance(
        self, node: yaml.Node, path: str
    ) -> tuple[InstanceConfig, dict[str, tuple[yaml.ScalarNode, yaml.Node]]]:
        m = self._mapping(node, path, _INSTANCE_KEYS, required=("name", "url"))
        name_node = m["name"][1]
        name = self._str(name_node, f"{path}.name")
        if not INSTANCE_NAME_RE.fullmatch(name):
            self.fail(
                name_node,
                f"{path}.name: must be 1-63 characters of letters, digits, '_', '.', '-' "
                f"starting with a letter or digit, got {name!r}",
            )
        url = self._instance_url(m["url"][1], f"{path}.url")
        fields = {**self._instance_defaults, **self._instance_fields(m, path)}
        return InstanceConfig(name=name, url=url, **fields), m

    def _http_url(
        self, node: yaml.Node, path: str, *, query: bool, credentials_hint: str = ""
    ) -> tuple[str, SplitResult]:
        """An http(s) URL with a host, no user-info, fragment or whitespace
        (and no query unless ``query``): the stripped text and its parts."""
        v = self._scalar(node, path)
        raw = v.value
        if not isinstance(raw, str) or not raw.strip():
            self.fail(node, f"{path}: must be an http:// or https:// URL, got {v.shown()}")
        raw = raw.strip()
        shown = v.shown()
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            self.fail(node, f"{path}: not a valid URL ({exc}): {shown}")
        problem = None
        if parts.scheme.lower() not in ("http", "https"):
            problem = "must start with http:// or https://"
        elif parts.username is not None or parts.password is not None:
            # Do not echo: the user-info part is a credential.
            self.fail(
                node, f"{path}: must not contain credentials (user:password@){credentials_hint}"
            )
        elif not parts.hostname:
            problem = "has no host"
        elif port == 0:
            problem = "port must be in 1..65535"
        elif not query and (parts.query or raw.endswith("?")):
            problem = "must not have a query string"
        elif parts.fragment or "#" in raw:
            problem = "must not have a fragment"
        elif any(c.isspace() for c in raw):
            problem = "must not contain whitespace"
        if problem:
            self.fail(node, f"{path}: {problem}, got {shown}")
        return raw, parts

    def _instance_url(self, node: yaml.Node, path: str) -> str:
        _, parts = self._http_url(node, path, query=False, credentials_hint="; use api_key")
        clean = SplitResult(parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", "")
        return urlunsplit(clean)

    # -- webhooks ---------------------------------------------------------

    def _webhooks(self, node: yaml.Node) -> WebhookConfig:
        m = self._mapping(
            node,
            "webhooks",
            (
                "targets",
                "ingest",
                "delivery",
                "sqlite_path",
                "sqlite_synchronous",
                "consumer_name",
                "main_app_url",
                "public_url",
            ),
            required=("targets",),
        )
        d = WebhookConfig(targets=())
        ingest = self._webhook_ingest(m["ingest"][1]) if "ingest" in m else d.ingest
        delivery = self._webhook_delivery(m["delivery"][1]) if "delivery" in m else d.delivery
        targets = self._webhook_targets(m["targets"][1])
        sqlite_path = d.sqlite_path
        if "sqlite_path" in m:
            sqlite_path = self._str(m["sqlite_path"][1], "webhooks.sqlite_path")
        sync = d.sqlite_synchronous
        if "sqlite_synchronous" in m:
            s_node = m["sqlite_synchronous"][1]
            sync = self._str(s_node, "webhooks.sqlite_synchronous").lower()
            if sync not in ("full", "normal"):
                self.fail(
                    s_node,
                    f"webhooks.sqlite_synchronous: must be 'full' (an event survives power loss)"
                    f" or 'normal' (survives a process crash), got {sync!r}",
                )
        consumer: str | None = None
        if "consumer_name" in m:
            c_node = m["consumer_name"][1]
            consumer = self._str(c_node, "webhooks.consumer_name")
            if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,100}", consumer):
                self.fail(
                    c_node,
                    "webhooks.consumer_name: must be 1-100 characters of letters, digits,"
                    f" '_', '.', ':', '@', '-', got {consumer!r}",
                )
        urls = {
            key: self._instance_url(m[key][1], f"webhooks.{key}")
            for key in ("main_app_url", "public_url")
            if key in m
        }
        return WebhookConfig(
            targets=targets,
            ingest=ingest,
            delivery=delivery,
            sqlite_path=sqlite_path,
            sqlite_synchronous=sync,
            consumer_name=consumer,
            **urls,
        )

    def _webhook_targets(self, node: yaml.Node) -> tuple[WebhookTarget, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            got = "an empty list" if isinstance(node, yaml.SequenceNode) else self._node_kind(node)
            self.fail(
                node,
                f"webhooks.targets: must be a non-empty list of targets ({{url: ...}}), got {got}",
            )
        out: list[WebhookTarget] = []
        names: dict[str, int] = {}
        keys = ("name", "url", "events", "sessions", "hmac_key", "format")
        for i, item in enumerate(node.value):
            path = f"webhooks.targets[{i}]"
            m = self._mapping(item, path, keys, required=("url",))
            url = self._target_url(m["url"][1], f"{path}.url")
            name = f"target-{i + 1}"
            name_node: yaml.Node = item
            if "name" in m:
                name_node = m["name"][1]
                name = self._str(name_node, f"{path}.name")
                if not INSTANCE_NAME_RE.fullmatch(name):
                    self.fail(
                        name_node,
                        f"{path}.name: must be 1-63 characters of letters, digits, '_', '.', '-'"
                        f" starting with a letter or digit, got {name!r}",
                    )
            if name in names:
                self.fail(
                    name_node,
                    f"{path}.name: duplicate target name {name!r} (also at line {names[name]})",
                )
            names[name] = _line(name_node)
            events: tuple[str, ...] = ()
            if "events" in m:
                events = self._str_list(m["events"][1], f"{path}.events")
            sessions: str | None = None
            if "sessions" in m:
                s_node = m["sessions"][1]
                sessions = self._str(s_node, f"{path}.sessions")
                try:
                    re.compile(sessions)
                except re.error as exc:
                    self.fail(s_node, f"{path}.sessions: not a valid regular expression: {exc}")
            hmac_key: str | None = None
            if "hmac_key" in m:
                hmac_key = self._opt_secret(m["hmac_key"][1], f"{path}.hmac_key")
            fmt = "auto"
            if "format" in m:
                f_node = m["format"][1]
                fmt = self._str(f_node, f"{path}.format").lower()
                if fmt not in WEBHOOK_FORMATS:
                    self.fail(
                        f_node,
                        f"{path}.format: unknown format {fmt!r}{_suggest(fmt, WEBHOOK_FORMATS)}",
                    )
            out.append(
                WebhookTarget(
                    url=url,
                    name=name,
                    events=events,
                    sessions=sessions,
                    hmac_key=hmac_key,
                    format=fmt,
                )
            )
        return tuple(out)

    def _webhook_ingest(self, node: yaml.Node) -> WebhookIngest:
        keys = (
            "blazz_hmac_key",
            "waha_hmac_key",
            "instance_keys",
            "max_age_skew",
            "max_body_bytes",
            "max_buffered_bytes",
            "waha_require_timestamp",
            "max_queued_bytes",
            "dedup_window",
        )
        m = self._mapping(node, "webhooks.ingest", keys)
        d = WebhookIngest()
        blazz = d.blazz_hmac_key
        if "blazz_hmac_key" in m:
            blazz = self._opt_secret(m["blazz_hmac_key"][1], "webhooks.ingest.blazz_hmac_key")
        waha = d.waha_hmac_key
        if "waha_hmac_key" in m:
            waha = self._opt_secret(m["waha_hmac_key"][1], "webhooks.ingest.waha_hmac_key")
        instance_keys: dict[str, str] = {}
        if "instance_keys" in m:
            path = "webhooks.ingest.instance_keys"
            ik = self._mapping_any(m["instance_keys"][1], path)
            for k_node, v_node in ik:
                inst = str(k_node.value)
                key = self._opt_secret(v_node, f"{path}.{inst}")
                if key is not None:
                    instance_keys[inst] = key
                self._webhook_instance_nodes[inst] = k_node
        skew = d.max_age_skew
        if "max_age_skew" in m:
            skew = self._positive(m["max_age_skew"][1], "webhooks.ingest.max_age_skew")
        body = d.max_body_bytes
        if "max_body_bytes" in m:
            body = self._size(m["max_body_bytes"][1], "webhooks.ingest.max_body_bytes")
        # Both bounds must leave room for one largest event, or it could never be accepted.
        bounds: dict[str, int] = {}
        for key in ("max_buffered_bytes", "max_queued_bytes"):
            bounds[key] = max(getattr(d, key), body)
            if key in m:
                b_node = m[key][1]
                bounds[key] = self._size(b_node, f"webhooks.ingest.{key}")
                if bounds[key] < body:
                    self.fail(
                        b_node,
                        f"webhooks.ingest.{key} ({bounds[key]}) must be >= max_body_bytes"
                        f" ({body}), or the largest event could never be accepted",
                    )
        require_ts = d.waha_require_timestamp
        if "waha_require_timestamp" in m:
            require_ts = self._bool(
                m["waha_require_timestamp"][1], "webhooks.ingest.waha_require_timestamp"
            )
        # Default: long enough that a captured signed event cannot be replayed
        # (it goes stale after max_age_skew) once its id is forgotten.
        window = max(d.dedup_window, 2 * skew)
        if "dedup_window" in m:
            w_node = m["dedup_window"][1]
            window = self._number(w_node, "webhooks.ingest.dedup_window", 0)
            if 0 < window < skew:
                self.fail(
                    w_node,
                    f"webhooks.ingest.dedup_window ({window:g}) must be 0 (off) or >="
                    f" max_age_skew ({skew:g}): a replay still fresh after the window"
                    " would be queued twice",
                )
        return WebhookIngest(
            blazz_hmac_key=blazz,
            waha_hmac_key=waha,
            instance_keys=instance_keys,
            max_age_skew=skew,
            max_body_bytes=body,
            waha_require_timestamp=require_ts,
            dedup_window=window,
            **bounds,
        )

    def _webhook_delivery(self, node: yaml.Node) -> WebhookDelivery:
        path = "webhooks.delivery"
        keys = (
            "attempts_per_round",
            "round_backoff",
            "backoff_base",
            "backoff_max",
            "max_age",
            "concurrency",
            "timeout",
            "ordering",
            "dead_letter_statuses",
            "lease",
        )
        m = self._mapping(node, path, keys)
        d = WebhookDelivery()
        values: dict[str, Any] = {}
        for key in ("attempts_per_round", "concurrency"):
            if key in m:
                values[key] = self._int(m[key][1], f"{path}.{key}", 1, 10_000)
        for key in ("round_backoff", "backoff_base", "backoff_max", "max_age", "timeout", "lease"):
            if key in m:
                values[key] = self._positive(m[key][1], f"{path}.{key}")
        if "ordering" in m:
            o_node = m["ordering"][1]
            ordering = self._str(o_node, f"{path}.ordering").lower()
            if ordering not in ("session", "none"):
                self.fail(
                    o_node,
                    f"{path}.ordering: must be 'session' (each session's events in order)"
                    f" or 'none', got {ordering!r}",
                )
            values["ordering"] = ordering
        if "dead_letter_statuses" in m:
            s_node = m["dead_letter_statuses"][1]
            if not isinstance(s_node, yaml.SequenceNode):
                self.fail(
                    s_node,
                    f"{path}.dead_letter_statuses: must be a list of HTTP statuses 400..499,"
                    f" got {self._node_kind(s_node)}",
                )
            statuses: list[int] = []
            for i, item in enumerate(s_node.value):
                code = self._int(item, f"{path}.dead_letter_statuses[{i}]", 400, 499)
                if code not in statuses:
                    statuses.append(code)
            values["dead_letter_statuses"] = tuple(statuses)
        cfg = dataclasses.replace(d, **values)
        if cfg.backoff_max < cfg.backoff_base:
            where = m["backoff_max"][1] if "backoff_max" in m else m["backoff_base"][1]
            self.fail(
                where,
                f"{path}.backoff_max ({cfg.backoff_max:g}) must be >= backoff_base"
                f" ({cfg.backoff_base:g})",
            )
        # A delivery round signs once, then makes up to attempts_per_round
        # attempts: the signed timestamp must still be fresh on the last one.
        round_max = cfg.round_seconds
        if round_max > 240:
            where = next((m[k][1] for k in ("attempts_per_round", "timeout") if k in m), node)
            self.fail(
                where,
                f"{path}: one delivery round may take {round_max:g} s"
                " (attempts_per_round x timeout + waits); keep it under 240 s, because a round"
                " is signed once and receivers reject timestamps older than 300 s",
            )
        if cfg.lease <= round_max:
            where = m["lease"][1] if "lease" in m else node
            self.fail(
                where,
                f"{path}.lease ({cfg.lease:g}) must be longer than one delivery round"
                f" ({round_max:g} s), or another replica would take over a lane mid-delivery",
            )
        return cfg

    def _check_webhook_instances(self, instances: tuple[InstanceConfig, ...]) -> None:
        known = tuple(i.name for i in instances)
        for name, k_node in self._webhook_instance_nodes.items():
            if name not in known:
                self.fail(
                    k_node,
                    f"webhooks.ingest.instance_keys.{name}: no instance named {name!r}"
                    f"{_suggest(name, known)}",
                )

    def _mapping_any(self, node: yaml.Node, path: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{path}: must be a mapping, got {self._node_kind(node)}")
        return self._pairs(node, path)

    def _opt_secret(self, node: yaml.Node, path: str) -> str | None:
        """A secret string; null, or ``${VAR:-}`` left empty, means "none"."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return None
        v = self._scalar(node, path, secret=True)
        if v.env_vars and v.value == "":
            return None
        return self._str(node, path, secret=True)

    def _str_list(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
            return (self._str(node, path),)
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{path}: must be a list of strings, got {self._node_kind(node)}")
        return tuple(self._str(item, f"{path}[{i}]") for i, item in enumerate(node.value))

    def _target_url(self, node: yaml.Node, path: str) -> str:
        return self._http_url(node, path, query=True)[0]


class _Noted(Exception):
    """A part of the file stopped at a problem that ``_Parser.note`` already kept."""


_INSTANCE_KEYS = ("name", "url", "max_sessions", "weight", "api_key")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f"; did you mean {lower[word.lower()]!r}?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
        close = [lower[c] for c in close]
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (expected one of: {', '.join(choices)})"


def _url_identity(url: str) -> str:
    """Two instance URLs that reach the same place compare equal."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


def _store_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable store URL, without echoing it (passwords)."""
    if url == "memory":
        return None
    expected = "must be 'memory' or a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        return f"{expected}; the URL does not parse"
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            return f"{scheme}:// URL has no host (write {scheme}://HOST:6379/0)"
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            return f"{scheme}:// URL path must be a database number (like /0)"
        return None
    if scheme == "unix":
        if not parts.path:
            return "unix:// URL has no socket path (write unix:///run/redis.sock)"
        return None
    if not scheme:
        return f"{expected}, got a value without a scheme"
    return f"{expected}, got scheme {scheme!r}"


_BuildFn = Callable[[AdapterConfig], object]


def _build_adapter_fn() -> _BuildFn | None:
    """``router.adapters.build_adapter`` if it exists yet, else None."""
    try:
        from router import adapters
    except ModuleNotFoundError as exc:
        if exc.name in ("router.adapters", "router"):
            return None
        raise
    fn = getattr(adapters, "build_adapter", None)
    return fn if callable(fn) else None
