"""Session map stores: ``build_store(cfg)`` picks the backend from ``StoreConfig.url``."""

from __future__ import annotations

from router.config import StoreConfig
from router.store.base import SessionStore, StoreUnavailable
from router.store.memory import MemoryStore

__all__ = ["MemoryStore", "SessionStore", "StoreUnavailable", "build_store"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def build_store(cfg: StoreConfig) -> SessionStore:
    """``"memory"`` -> ``MemoryStore``; a redis URL -> ``RedisStore`` (no I/O yet).

    Raises ``ValueError`` for anything else.
    """
    if cfg.is_memory:
        return MemoryStore()
    if cfg.url.startswith(_REDIS_SCHEMES):
        # Imported here so a memory-only router never imports redis.
        from router.store.redis import RedisStore

        return RedisStore(cfg.url, key_prefix=cfg.key_prefix)
    raise ValueError(
        f"store url must be 'memory' or a redis://, rediss:// or unix:// URL, "
        f"got {cfg.url.split('://', 1)[0]!r}"
    )
