"""Load, interpolate and validate the router's YAML config.

The file is parsed with PyYAML's node API (``yaml.compose`` + ``SafeLoader``)
rather than ``safe_load`` so that every value keeps the line it came from and
every rejection can say ``file:line: key.path: reason``. Nothing is guessed:
unknown keys, duplicate keys, wrong types and out-of-range values are errors.

``${VAR}`` and ``${VAR:-default}`` are expanded inside string scalars (use them
for secrets); ``$${`` writes a literal ``${``. A value that came from the
environment is never echoed in an error message, since it may be a secret.

Every section is read from its dataclass in ``router.config``: a field's type
and markers say how its value is read and checked (see the note at the top of
``router/config.py``). Problems are collected, not raised one at a time: one
run reports every problem of the file, sorted by line.

Public API: ``load`` (the one entry point), ``parse_text``, ``check_config``,
``summarize``, ``parse_size``, ``setting_paths``, ``read_text``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import SplitResult, urlsplit, urlunsplit

import yaml

from router.adapters import ADAPTERS, build_adapter
from router.config import (
    AdapterConfig,
    Check,
    Choice,
    ConfigError,
    Count,
    DefaultFrom,
    HttpUrl,
    Internal,
    ItemDefaults,
    Lower,
    Number,
    Numbered,
    Ref,
    RouterConfig,
    SecondsOrOff,
    Secret,
    Shorthand,
    Size,
    TextForm,
    Unique,
    Valid,
    redact_url,
)

_D = TypeVar("_D")

__all__ = [
    "check_config",
    "load",
    "parse_size",
    "parse_text",
    "read_text",
    "setting_paths",
    "summarize",
]

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"

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

# Guard against alias bombs ("billion laughs") in free-form data (adapter options).
_MAX_OPTION_NODES = 100_000


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RouterConfig:
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
    return read_text(RouterConfig, text, filename, env)


def read_text(
    cls: type[_D], text: str, filename: str = "<text>", env: Mapping[str, str] | None = None
) -> _D:
    """YAML ``text`` read as any dataclass declared like ``RouterConfig``'s
    sections (tests of a new section's shape, tools)."""
    return _Parser(filename, os.environ if env is None else env).parse(text, cls)


def check_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """For ``session-router check-config FILE``: ``(ok, text)``.

    On success ``text`` is a short human summary without secrets; on failure
    it is the ``file:line: reason`` message.
    """
    try:
        cfg = load(path, env=env)
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
    scoped = sum(1 for k in cfg.api_keys if k.sessions is not None)
    if scoped:
        auth += f", {scoped} limited to some sessions"
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
# the schema: what router.config's dataclasses declare
# --------------------------------------------------------------------------

_M = TypeVar("_M")


@dataclass(frozen=True, slots=True)
class _Type:
    """An annotation taken apart: the bare type, its markers, whether null is allowed."""

    base: Any
    markers: tuple[object, ...] = ()
    optional: bool = False

    def has(self, flag: type) -> bool:
        return flag in self.markers

    def get(self, kind: type[_M]) -> _M | None:
        return next((m for m in self.markers if isinstance(m, kind)), None)

    def all(self, kind: type[_M]) -> list[_M]:
        return [m for m in self.markers if isinstance(m, kind)]

    @property
    def item(self) -> _Type:
        """The type of the entries of a ``tuple[X, ...]``."""
        return _type(get_args(self.base)[0])

    @property
    def is_list(self) -> bool:
        return get_origin(self.base) is tuple


def _type(annotation: Any) -> _Type:
    markers: list[object] = []
    optional = False
    tp = annotation
    while True:
        if get_origin(tp) is Annotated:
            markers.extend(tp.__metadata__)
            tp = tp.__origin__
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            optional = True
            (tp,) = (a for a in get_args(tp) if a is not type(None))
        else:
            return _Type(tp, tuple(markers), optional)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    type: _Type
    required: bool


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    """The settings of dataclass ``cls``, in declaration order."""
    hints = get_type_hints(cls, include_extras=True)
    out: list[_Field] = []
    for f in dataclasses.fields(cls):
        t = _type(hints[f.name])
        if not t.has(Internal):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append(_Field(f.name, t, required))
    return tuple(out)


def _dataclass_of(t: _Type) -> type | None:
    """The dataclass a field holds, itself or as list entries."""
    base = t.item.base if t.is_list else t.base
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _shorthand(cls: type) -> str | None:
    return next((f.name for f in _fields(cls) if f.type.has(Shorthand)), None)


def setting_paths(
    cls: type = RouterConfig, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every key a file may set, as key paths (list entries have no index)."""
    for f in _fields(cls):
        path = (*prefix, f.name)
        yield path
        defaults = f.type.get(ItemDefaults)
        if defaults is not None:
            yield (*prefix, defaults.key)
        inner = _dataclass_of(f.type)
        if inner is not None:
            yield from setting_paths(inner, path)


class _Shown(dict[str, str]):
    """The placeholders of a ``Check.why``: ``{path}``, and each field's value
    as the file would write it ("default X" when the file does not set it)."""

    def __init__(self, obj: Any, path: str, given: Mapping[str, object]) -> None:
        super().__init__(path=path)
        self._obj = obj
        self._given = given

    def __missing__(self, name: str) -> str:
        value = getattr(self._obj, name)
        text = f"{value:g}" if isinstance(value, float) else str(value)
        is_field = any(f.name == name for f in dataclasses.fields(self._obj))
        return f"default {text}" if is_field and name not in self._given else text


class _Skip:
    """An entry whose ``${...}`` expanded to nothing: left out of its list."""


_SKIP = _Skip()

# One read entry of a list of dataclasses: the object, its fields' nodes, its
# own node and its position (for the ``Unique`` checks).
_Entry = tuple[Any, dict[str, yaml.Node], yaml.Node, int]


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
        # Expanded ${...} values inside free-form data, scrubbed from messages.
        self._env_strings: set[str] = set()
        # Names that must name an item of a list (``Ref``), checked at the end.
        self._refs: list[tuple[Ref, str, yaml.Node, str]] = []
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

    def parse(self, text: str, cls: type[_D]) -> _D:
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
        _, got = self._collecting(lambda: self._object(root, cls, "", root)[0])
        cfg: _D | None = got
        if cfg is not None and not self._errors:
            if isinstance(cfg, RouterConfig):
                cfg = dataclasses.replace(cfg, source=self.file)
            self._check_refs(cfg)
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
        self, node: yaml.Node, path: str, allowed: tuple[str, ...]
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

    def _number(self, node: yaml.Node, path: str, rule: Number) -> float:
        v = self._scalar(node, path)
        value = self._retyped(v)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not rule.admits(value)
        ):
            self.fail(node, f"{path}: must be {rule.rule()}, got {v.shown()}")
        return float(value)

    # -- reading by type ----------------------------------------------------

    def _read(self, node: yaml.Node, t: _Type, path: str, where: yaml.Node | None = None) -> Any:
        """The value of ``node`` as type ``t`` says; ``where`` is the key of a
        section (its hook reports there)."""
        if t.optional and (_is_null(node) or self._env_empty(node, path)):
            return None
        base = t.base
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            return self._object(node, base, path, where or node)[0]
        if t.is_list:
            return self._list(node, t, path)
        if get_origin(base) in (Mapping, dict):
            return self._dict(node, t, path)
        if base is bool:
            return self._bool(node, path)
        if base is int:
            if t.has(Size):
                return self._size(node, path)
            count = t.get(Count) or Count()
            return self._int(node, path, count.lo, count.hi)
        if base is float:
            return self._number(node, path, t.get(Number) or SecondsOrOff)
        if base is str:
            return self._text(node, t, path)
        raise TypeError(f"{path}: no reader for {base!r}")  # a declaration mistake

    def _text(self, node: yaml.Node, t: _Type, path: str) -> str:
        secret = t.has(Secret)
        url = t.get(HttpUrl)
        value = self._str(node, path, secret=secret) if url is None else self._url(node, path, url)
        shown = self._scalar(node, path, secret=secret).shown()
        choice = t.get(Choice)
        if t.has(Lower) or choice is not None:
            value = value.lower()
        if choice is not None and value not in choice.values:
            if choice.noun:
                reason = f"unknown {choice.noun} {shown}{_suggest(value, choice.values)}"
            else:
                reason = f"must be {_one_of(choice.values)}, got {shown}"
            self.fail(node, f"{path}: {reason}")
        for check in t.all(Valid):
            problem = check.problem(value)
            if problem:
                self.fail(node, f"{path}: {problem}" + ("" if secret else f", got {shown}"))
        ref = t.get(Ref)
        if ref is not None:
            self._refs.append((ref, value, node, path))
        return value

    def _url(self, node: yaml.Node, path: str, url: HttpUrl) -> str:
        raw, parts = self._http_url(node, path, query=url.query, credentials_hint=url.hint)
        if url.query:
            return raw
        clean = SplitResult(parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", "")
        return urlunsplit(clean)

    def _env_empty(self, node: yaml.Node, path: str) -> bool:
        """A scalar whose ``${...}`` expanded to an empty string (an optional
        value left unset, like ``${NEXT_KEY:-}``)."""
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR and "$" in node.value):
            return False
        v = self._scalar(node, path, secret=True)
        return bool(v.env_vars) and v.value == ""

    def _list(
        self,
        node: yaml.Node,
        t: _Type,
        path: str,
        defaults: Mapping[str, Any] | None = None,
    ) -> tuple[Any, ...]:
        item = t.item
        cls = _dataclass_of(t)
        if isinstance(node, yaml.SequenceNode):
            entries: list[yaml.Node] = node.value
        elif _is_null(node):
            entries = []
        elif isinstance(node, yaml.ScalarNode) and (cls is None or _shorthand(cls)):
            entries = [node]  # one value alone
        else:
            self.fail(node, f"{path}: must be {_list_of(item.base)}, got {self._node_kind(node)}")
        out: list[Any] = []
        failed = False
        for i, entry in enumerate(entries):
            read = functools.partial(self._entry, entry, item, f"{path}[{i}]", defaults, i)
            ok, got = self._collecting(read)
            failed = failed or not ok
            if ok and got is not _SKIP:
                out.append(got)
        if failed:
            raise _Noted
        if entries and not out:
            key = path.rpartition(".")[2]
            self.fail(
                node,
                f"{path}: every entry expanded to an empty string, which would leave it empty;"
                f" write {key}: [] to mean that",
            )
        if cls is None:
            return tuple(dict.fromkeys(out))  # in order, repeats dropped
        self._check_unique(cls, out, path)
        return tuple(entry[0] for entry in out)

    def _entry(
        self,
        node: yaml.Node,
        item: _Type,
        path: str,
        defaults: Mapping[str, Any] | None,
        index: int,
    ) -> Any:
        if self._env_empty(node, path):
            return _SKIP
        if isinstance(item.base, type) and dataclasses.is_dataclass(item.base):
            obj, nodes = self._object(node, item.base, path, node, defaults=defaults, index=index)
            return (obj, nodes, node, index)
        return self._read(node, item, path)

    def _check_unique(self, cls: type, entries: list[_Entry], path: str) -> None:
        for f in _fields(cls):
            unique = f.type.get(Unique)
            if unique is None:
                continue
            seen: dict[object, tuple[int, int]] = {}
            for obj, nodes, node, i in entries:
                value = getattr(obj, f.name)
                key = value if unique.key is None else unique.key(value)
                at = nodes.get(f.name, node)
                if key in seen:
                    j, line = seen[key]
                    self.fail(
                        at,
                        f"{path}[{i}].{f.name}: duplicate {unique.noun} {value!r}"
                        f" (also {path}[{j}] at line {line})",
                    )
                seen[key] = (i, _line(at))

    def _dict(self, node: yaml.Node, t: _Type, path: str) -> dict[str, Any]:
        key_t, value_t = (_type(a) for a in get_args(t.base))
        pairs = self._mapping_any(node, path)
        if value_t.base is Any:  # free-form data
            return self._plain(node, path) if pairs else {}
        out: dict[str, Any] = {}
        failed = False
        for k, v in pairs:
            p = _join(path, str(k.value))

            def one(k: yaml.Node = k, v: yaml.Node = v, p: str = p) -> tuple[str, Any]:
                key = self._read(k, key_t, p)
                return key, (_SKIP if self._env_empty(v, p) else self._read(v, value_t, p))

            _, got = self._collecting(one)
            if got is None:
                failed = True
            elif got[1] is not _SKIP:
                out[got[0]] = got[1]
        if failed:
            raise _Noted
        return out

    def _object(
        self,
        node: yaml.Node,
        cls: type,
        path: str,
        where: yaml.Node,
        *,
        defaults: Mapping[str, Any] | None = None,
        index: int | None = None,
    ) -> tuple[Any, dict[str, yaml.Node]]:
        """An instance of dataclass ``cls``, and the node of each field the file sets."""
        values, nodes = self._given(node, cls, path)
        fields = _fields(cls)
        for name, value in (defaults or {}).items():
            values.setdefault(name, value)
        for f in fields:
            numbered = f.type.get(Numbered)
            if numbered is not None and index is not None and f.name not in values:
                values[f.name] = numbered.template.format(n=index + 1)
        obj = cls(**values)
        derived = {
            f.name: d.fn(obj)
            for f in fields
            if f.name not in values and (d := f.type.get(DefaultFrom)) is not None
        }
        if derived:
            obj = dataclasses.replace(obj, **derived)
        checks: tuple[Check, ...] = getattr(cls, "CHECKS", ())
        for check in checks:
            if not check.ok(obj):
                at = next((nodes[n] for n in check.fields if n in nodes), node)
                self.fail(at, check.why.format_map(_Shown(obj, path, nodes)))
        hook = _HOOKS.get(cls)
        if hook is not None:
            hook(self, obj, path, nodes, where)
        return obj, nodes

    def _given(
        self, node: yaml.Node, cls: type, path: str, *, partial: bool = False
    ) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
        """The fields of ``cls`` that ``node`` sets, read and checked; with
        ``partial``, only the optional ones may be set (item defaults)."""
        fields = {f.name: f for f in _fields(cls)}
        short = _shorthand(cls)
        given: Mapping[str, tuple[yaml.Node, yaml.Node]]
        scalar = short is not None and isinstance(node, yaml.ScalarNode) and not _is_null(node)
        if scalar:
            assert short is not None
            given = {short: (node, node)}
        else:
            keys = [n for n, f in fields.items() if not (partial and f.required)]
            keys += [d.key for f in fields.values() if (d := f.type.get(ItemDefaults))]
            given = self._mapping(node, path, tuple(keys))
        failed = False
        # Item defaults first: the entries they apply to are read with them.
        item_defaults: dict[str, Mapping[str, Any]] = {}
        for f in fields.values():
            d = f.type.get(ItemDefaults)
            item_cls = _dataclass_of(f.type)
            if d is not None and item_cls is not None and d.key in given:
                read = functools.partial(
                    self._given, given[d.key][1], item_cls, _join(path, d.key), partial=True
                )
                ok, got = self._collecting(read)
                failed = failed or not ok
                item_defaults[f.name] = got[0] if got is not None else {}
        values: dict[str, Any] = {}
        nodes: dict[str, yaml.Node] = {}
        for key, (k, v) in given.items():
            field = fields.get(key)
            if field is None:
                continue  # an item defaults key, read above
            # A plain string in place of the mapping is reported as itself.
            where = path if scalar else _join(path, key)
            read = functools.partial(self._field, field, k, v, where, item_defaults.get(key))
            ok, value = self._collecting(read)
            if ok:
                values[key], nodes[key] = value, v
            failed = failed or not ok
        for f in fields.values():
            if f.required and f.name not in given and not partial:
                why = (
                    f"{path}: missing required key '{f.name}'"
                    if path
                    else f"{f.name}: missing required key"
                )
                self.note(self._error(node, why))
                failed = True
        if failed:
            raise _Noted
        return values, nodes

    def _field(
        self,
        f: _Field,
        key_node: yaml.Node,
        node: yaml.Node,
        path: str,
        defaults: Mapping[str, Any] | None,
    ) -> Any:
        t = f.type
        form = t.get(TextForm)
        if form is not None and isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            value: Any = self._list(self._text_entries(node, path, form), t, path, defaults)
        elif t.is_list and not t.optional:  # an optional one: null is None (_read)
            value = self._list(node, t, path, defaults)
        else:
            value = self._read(node, t, path, key_node)
        if f.required and value == ():
            got = "an empty list" if isinstance(node, yaml.SequenceNode) else self._node_kind(node)
            also = f", or a string of {_shape(form)} entries" if form is not None else ""
            self.fail(node, f"{path}: must be a non-empty list{also}, got {got}")
        return value

    def _text_entries(self, node: yaml.ScalarNode, path: str, form: TextForm) -> yaml.SequenceNode:
        """``"a=http://h1 b=http://h2"`` as the list of mappings it stands for,
        every value placed at ``node`` (for the line in errors)."""
        v = self._scalar(node, path)
        entries = [e for e in re.split(form.split, str(v.value)) if e]
        if not entries:
            self.fail(
                node,
                f"{path}: must be a non-empty list, or a string of {_shape(form)} entries,"
                f" got {v.shown()}",
            )
        items: list[yaml.Node] = []
        for i, entry in enumerate(entries):
            left, sep, right = entry.partition("=")
            if not sep:
                self.fail(
                    node,
                    f"{path}[{i}]: expected {_shape(form)} (entry {i + 1} of {v.shown()})",
                )
            pairs = [
                (_literal(node, name), _literal(node, text))
                for name, text in zip(form.fields, (left, right), strict=True)
            ]
            items.append(yaml.MappingNode(_MAP, pairs, node.start_mark, node.end_mark))
        return yaml.SequenceNode(_SEQ, items, node.start_mark, node.end_mark)

    def _check_refs(self, cfg: object) -> None:
        for ref, value, node, path in self._refs:
            known = tuple(str(item.name) for item in getattr(cfg, ref.collection))
            if value not in known:
                self.note(
                    self._error(
                        node, f"{path}: no {ref.noun} named {value!r}{_suggest(value, known)}"
                    )
                )

    def _mapping_any(self, node: yaml.Node, path: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        if _is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{path}: must be a mapping, got {self._node_kind(node)}")
        return self._pairs(node, path)

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


class _Noted(Exception):
    """A part of the file stopped at a problem that ``_Parser.note`` already kept."""


def _check_adapter(
    parser: _Parser,
    cfg: AdapterConfig,
    path: str,
    nodes: Mapping[str, yaml.Node],
    where: yaml.Node,
) -> None:
    """The kind is one of ``router.adapters.ADAPTERS`` and the options build it."""
    kinds = tuple(ADAPTERS)
    if cfg.kind not in kinds:
        parser.fail(
            nodes.get("kind", where),
            f"{path}.kind: unknown adapter {cfg.kind!r}{_suggest(cfg.kind, kinds)}",
        )
    try:
        build_adapter(cfg)
    except (ValueError, TypeError) as exc:
        reason = str(exc)
        for secret in sorted(parser._env_strings, key=len, reverse=True):
            reason = reason.replace(secret, "***")
        parser.fail(where, f"{path}: invalid {cfg.kind} adapter settings: {reason}")


# Sections whose reading needs more than their declaration says: called with
# the parser, the object read, its path, its fields' nodes, and its key.
_HOOKS: dict[type, Callable[[_Parser, Any, str, Mapping[str, yaml.Node], yaml.Node], None]] = {
    AdapterConfig: _check_adapter,
}


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _literal(node: yaml.Node, text: str) -> yaml.ScalarNode:
    """``text`` as a quoted scalar at ``node``'s place (not interpolated again)."""
    return yaml.ScalarNode(
        _STR, text.replace("${", "$${"), node.start_mark, node.end_mark, style="'"
    )


def _shape(form: TextForm) -> str:
    return "=".join(name.upper() for name in form.fields)


def _list_of(base: Any) -> str:
    noun = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(base)
    if noun:
        return f"a list of {noun}s or one {noun}"
    if isinstance(base, type) and dataclasses.is_dataclass(base) and _shorthand(base):
        # Entries that may be plain strings (api_keys: a key, or {key, sessions}).
        return "a list of strings or mappings, or one string"
    return "a list of mappings"


def _one_of(values: tuple[str, ...]) -> str:
    quoted = [repr(v) for v in values]
    if len(quoted) <= 2:
        return " or ".join(quoted)
    return "one of " + ", ".join(quoted)


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
