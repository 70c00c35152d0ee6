"""Webhook signatures of the two upstream dialects, both ways (verify at ingest, sign for targets).

* Blazz ``whatsapp-service``: ``X-HMAC-Signature`` = hex HMAC-SHA256 of
  ``X-Timestamp`` (unix seconds, as sent) + the raw body; the receiver rejects
  timestamps older than 300 s.
* WAHA: ``X-Webhook-Hmac`` = hex HMAC-SHA512 of the raw body, with
  ``X-Webhook-Hmac-Algorithm: sha512`` and ``X-Webhook-Timestamp`` (unix ms,
  not covered by the signature).
* ``raw`` (the router's own, for targets that are neither):
  ``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of "<X-Webhook-Timestamp>." + body>``.

Comparisons are constant-time. Keys never appear in exceptions or logs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping

__all__ = [
    "SignatureError",
    "blazz_signature",
    "raw_signature",
    "sign_headers",
    "verify_blazz",
    "verify_waha",
    "waha_signature",
]


class SignatureError(Exception):
    """Why a request's signature was refused (safe to show the sender)."""


def blazz_signature(key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(key.encode(), timestamp.encode() + body, hashlib.sha256).hexdigest()


def waha_signature(key: str, body: bytes) -> str:
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


def raw_signature(key: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.strip().lower().encode(), expected.encode())


def _check_time(value: float, now: float, skew: float, what: str) -> None:
    if not math.isfinite(value):
        raise SignatureError(f"{what} is not a number")
    age = now - value
    if age > skew:
        raise SignatureError(f"{what} is {age:.0f} s old (limit {skew:g} s): stale or replayed")
    if -age > skew:
        raise SignatureError(f"{what} is {-age:.0f} s in the future (limit {skew:g} s)")


def verify_blazz(
    key: str, headers: Mapping[str, str], body: bytes, *, now: float, skew: float
) -> None:
    """Raise ``SignatureError`` unless the Blazz signature is valid and fresh."""
    sig = headers.get("X-HMAC-Signature")
    ts = headers.get("X-Timestamp")
    if not sig:
        raise SignatureError("missing X-HMAC-Signature header")
    if not ts:
        raise SignatureError("missing X-Timestamp header")
    # The signature covers the timestamp text exactly as sent: verify first,
    # so a forged timestamp is a bad signature, not a stale one.
    if not _same(sig, blazz_signature(key, ts, body)):
        raise SignatureError("bad X-HMAC-Signature")
    try:
        when = float(ts)
    except ValueError:
        raise SignatureError("X-Timestamp is not unix seconds") from None
    _check_time(when, now, skew, "X-Timestamp")


def verify_waha(
    key: str, headers: Mapping[str, str], body: bytes, *, now: float, skew: float
) -> None:
    """Raise ``SignatureError`` unless the WAHA signature is valid (and fresh, when timed)."""
    sig = headers.get("X-Webhook-Hmac")
    if not sig:
        raise SignatureError("missing X-Webhook-Hmac header")
    algo = headers.get("X-Webhook-Hmac-Algorithm", "sha512").strip().lower()
    if algo != "sha512":
        raise SignatureError(f"unsupported X-Webhook-Hmac-Algorithm {algo[:20]!r}")
    if not _same(sig, waha_signature(key, body)):
        raise SignatureError("bad X-Webhook-Hmac")
    # WAHA's timestamp header is not signed: this refuses stale deliveries
    # (a clock or queue problem on the instance), not a determined replayer.
    ts = headers.get("X-Webhook-Timestamp")
    if ts:
        try:
            when = float(ts) / 1000.0
        except ValueError:
            raise SignatureError("X-Webhook-Timestamp is not unix milliseconds") from None
        _check_time(when, now, skew, "X-Webhook-Timestamp")


def sign_headers(fmt: str, key: str | None, body: bytes, *, now: float) -> dict[str, str]:
    """Timestamp (always) and signature (when ``key``) headers for a delivery in ``fmt``."""
    if fmt == "blazz":
        ts = str(int(now))
        out = {"X-Timestamp": ts}
        if key:
            out["X-HMAC-Signature"] = blazz_signature(key, ts, body)
        return out
    if fmt == "waha":
        out = {"X-Webhook-Timestamp": str(int(now * 1000))}
        if key:
            out["X-Webhook-Hmac"] = waha_signature(key, body)
            out["X-Webhook-Hmac-Algorithm"] = "sha512"
        return out
    ts = str(int(now))
    out = {"X-Webhook-Timestamp": ts}
    if key:
        out["X-Webhook-Signature"] = raw_signature(key, ts, body)
    return out
