"""Upstream API adapters and the registry the config loader builds them from."""

from __future__ import annotations

from collections.abc import Mapping

from router.adapters.base import (
    Adapter,
    BadSessionId,
    Extraction,
    HealthReport,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    valid_session_id,
)
from router.adapters.blazz import BlazzAdapter
from router.adapters.evolution import EvolutionAdapter
from router.adapters.generic import GenericAdapter
from router.adapters.waha import WahaAdapter
from router.adapters.wwebjs import WwebjsAdapter
from router.config import AdapterConfig

ADAPTERS: dict[str, type[Adapter]] = {
    "waha": WahaAdapter,
    "blazz": BlazzAdapter,
    "wwebjs": WwebjsAdapter,
    "evolution": EvolutionAdapter,
    "generic": GenericAdapter,
}


def build_adapter(cfg: AdapterConfig) -> Adapter:
    """The adapter ``cfg`` describes.

    Raises ``ValueError`` with a reason naming the offending key (``adapter.kind``
    or ``adapter.options.<path>``) for an unknown kind or bad options.
    """
    kind = cfg.kind
    cls = ADAPTERS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"adapter.kind: unknown adapter {kind!r} (known: {known})")
    if not isinstance(cfg.options, Mapping):
        raise ValueError(f"adapter.options: must be a mapping, got {type(cfg.options).__name__}")
    return cls(cfg.options)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfig",
    "BadSessionId",
    "BlazzAdapter",
    "EvolutionAdapter",
    "Extraction",
    "GenericAdapter",
    "HealthReport",
    "SessionInfo",
    "SessionStatus",
    "UpstreamRequest",
    "WahaAdapter",
    "WwebjsAdapter",
    "build_adapter",
    "valid_session_id",
]
