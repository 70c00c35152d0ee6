"""Instance labels, label selectors and the rules that give a session its selector.

Instances carry labels (``engine: webjs``, ``region: eu``, ``canary: "true"``).
A *selector* is a set of ``key=value`` requirements, all of which an
instance's labels must meet (equality only, like a Kubernetes
``matchLabels``); the empty selector matches every instance.

A session's selector comes from, in this order:

1. the create's placement header (``placement.header``, e.g.
   ``X-Placement: region=eu``), when configured and sent: recorded with the
   session in the store (``PLACEMENT_NOTE``), since nothing else can tell it
   again later;
2. the first placement rule whose ``sessions`` pattern matches the name and
   which *takes* it: a rule with ``weight`` W takes W % of the names it
   matches, chosen by a hash of the name salted with the rule's own text
   (deterministic: a retried create, a failover next week and every replica
   agree, and reordering rules does not reshuffle a rule's sessions); the
   others fall through to the next rule;
3. else the empty selector (any instance).

Rule-chosen selectors are not stored: failover and drain derive them again
from the rules in force, so an operator's rule change applies to where
sessions go next. This module is pure (no I/O): ``router.placement`` applies it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from router.config import PlacementConfig

# Kubernetes-style: a key is a name with an optional DNS-prefix ("example.com/tier"),
# a value is short and plain. Both travel into metric labels and headers.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
LABEL_VALUE_PATTERN = rf"(?:{_NAME})?"
LABEL_KEY_PATTERN = rf"(?:[a-z0-9](?:[a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_NAME}"
_KEY_RE = re.compile(LABEL_KEY_PATTERN)
_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)

# The store note field a header-chosen selector is kept in (router.store notes).
PLACEMENT_NOTE = "placement"
# How a session got its selector.
Source = Literal["header", "rule", "none"]


class SelectorError(ValueError):
    """A selector (or a label) that does not parse; the message says why."""


def _short(text: object) -> str:
    """``text`` for an error message: a client's header is echoed only so far."""
    shown = repr(text)
    return shown if len(shown) <= 70 else shown[:67] + "..."


def check_label(key: str, value: str) -> None:
    """Raise ``SelectorError`` unless ``key: value`` is a valid label."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise SelectorError(
            f"label key {_short(key)} is not valid: up to 63 of [A-Za-z0-9_.-], starting and "
            "ending with a letter or digit, optionally after a DNS prefix and '/'"
        )
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise SelectorError(
            f"label value {_short(value)} of {key!r} is not valid: up to 63 of [A-Za-z0-9_.-], "
            "starting and ending with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class Selector:
    """Label requirements, sorted by key; ``str()`` is the canonical text
    (``engine=webjs,region=eu``; ``*`` for the empty selector)."""

    terms: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> Selector:
        for key, value in labels.items():
            check_label(key, value)
        return cls(tuple(sorted(labels.items())))

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``key=value[,key=value...]`` (spaces around items allowed). ``*``
        is the empty selector. Raises ``SelectorError``."""
        text = text.strip()
        if text == "*":
            return cls()
        if not text:
            raise SelectorError("empty selector (write key=value, or * for any instance)")
        terms: dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise SelectorError(f"{_short(item.strip())} is not key=value")
            if key in terms and terms[key] != value:
                raise SelectorError(f"label {key!r} is required twice, with different values")
            check_label(key, value)
            terms[key] = value
        return cls(tuple(sorted(terms.items())))

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.terms)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.terms) if self.terms else "*"


ANY = Selector()


def bucket(salt: str, session: str) -> float:
    """Where ``session`` falls in [0, 100) for the rule salted ``salt``:
    a stable hash (never Python's per-process ``hash``)."""
    digest = hashlib.blake2b(f"{salt}\0{session}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100.0 / 2**64


@dataclass(frozen=True, slots=True)
class Choice:
    """A session's selector and where it came from."""

    selector: Selector = ANY
    strict: bool = False
    source: Source = "none"
    # Index of the rule that chose it (source "rule").
    rule: int | None = None

    def note(self) -> dict[str, Any]:
        """What the store keeps of a header-chosen selector (``PLACEMENT_NOTE``)."""
        return {"select": str(self.selector), "strict": self.strict}

    @classmethod
    def from_note(cls, note: Mapping[str, Any] | None) -> Choice | None:
        """The header-chosen selector kept in a session's store note, if any
        (a note that does not parse counts as none: never a crash)."""
        if not note:
            return None
        raw = note.get(PLACEMENT_NOTE)
        if not isinstance(raw, Mapping) or not isinstance(raw.get("select"), str):
            return None
        try:
            selector = Selector.parse(raw["select"])
        except SelectorError:
            return None
        return cls(selector, bool(raw.get("strict", True)), "header")


NO_CHOICE = Choice()


@dataclass(frozen=True, slots=True)
class _Compiled:
    match: Callable[[str], re.Match[str] | None]
    selector: Selector
    weight: float
    strict: bool
    salt: str


@dataclass(frozen=True, slots=True)
class Policy:
    """``PlacementConfig`` compiled once per config (patterns, selectors, salts)."""

    header: str | None = None
    header_strict: bool = True
    rules: tuple[_Compiled, ...] = field(default=())

    @classmethod
    def of(cls, cfg: PlacementConfig) -> Policy:
        compiled = []
        for rule in cfg.rules:
            selector = Selector.of(rule.select)
            compiled.append(
                _Compiled(
                    re.compile(translate(rule.sessions)).fullmatch,
                    selector,
                    rule.weight,
                    rule.strict,
                    f"{rule.sessions}|{selector}",
                )
            )
        return cls(cfg.header, cfg.header_strict, tuple(compiled))

    def by_rules(self, session: str) -> Choice:
        """The selector the rules give ``session`` (the first rule that takes it)."""
        for i, rule in enumerate(self.rules):
            if not rule.match(session):
                continue
            if rule.weight >= 100.0 or bucket(rule.salt, session) < rule.weight:
                return Choice(rule.selector, rule.strict, "rule", i)
        return NO_CHOICE

    def for_create(self, session: str | None, header_value: str | None) -> Choice:
        """The selector of a new session: its header's when configured and
        sent (``SelectorError`` if it does not parse), else the rules'."""
        if self.header is not None and header_value is not None:
            return Choice(Selector.parse(header_value), self.header_strict, "header")
        if session is None:
            return NO_CHOICE  # rules go by name; a create without one is placed anywhere
        return self.by_rules(session)

    def selectors(self) -> list[Selector]:
        """The rules' selectors, in rule order, without repeats."""
        seen: dict[Selector, None] = {}
        for rule in self.rules:
            seen.setdefault(rule.selector, None)
        return list(seen)


def exported_selectors(policy: Policy, labels: Iterable[Mapping[str, str]]) -> list[Selector]:
    """The selectors capacity is reported for: the whole fleet (``*``), every
    rule's, and every instance's full label set. Bounded by the config
    (rules + instances + 1), never by sessions or clients."""
    seen: dict[Selector, None] = {ANY: None}
    for selector in policy.selectors():
        seen.setdefault(selector, None)
    for lab in labels:
        if lab:
            seen.setdefault(Selector(tuple(sorted(lab.items()))), None)
    return list(seen)
