"""Webhook signatures of the two upstream dialects, both ways (verify at ingest, sign for targets).

* Blazz ``whatsapp-service``: ``X-HMAC-Signature`` = hex HMAC-SHA256 of
  ``X-Timestamp`` (unix seconds, as sent) + the raw body; the receiver rejects
  timestamps older than 300 s.
* WAHA: ``X-Webhook-Hmac`` = hex HMAC-SHA512 of the raw body, with
  ``X-Webhook-Hmac-Algorithm: sha512`` and ``X-Webhook-Timestamp`` (unix ms,
  not covered by the signature).
* ``raw`` (the router's own, for targets that are neither):
  ``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of "<X-Webhook-Timestamp>." + body>``.

Comparisons are constant-time. Keys never appear in exceptions or logs, and
neither does any header value: a ``SignatureError`` names the header and
the rule it broke, never what was sent.

``check_headers`` checks the headers' presence and shape alone, so ingest can
refuse an unsigned or malformed request before reading its body; the
``verify_*`` functions run it again and then check the signature itself.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping

__all__ = [
    "SignatureError",
    "StaleTimestamp",
    "blazz_signature",
    "check_headers",
    "raw_signature",
    "sign_headers",
    "verify_blazz",
    "verify_waha",
    "waha_signature",
]


class SignatureError(Exception):
    """Why a request's signature was refused (safe to show the sender and to log)."""


class StaleTimestamp(SignatureError):
    """The signature is fine, its timestamp is outside the allowed skew."""


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX128 = re.compile(r"[0-9a-fA-F]{128}")
# Unix seconds (Blazz) or milliseconds (WAHA), as digits: no sign, no
# fraction, no exponent; 20 digits is far beyond any real clock.
_DIGITS = re.compile(r"[0-9]{1,20}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value is not None else None


def check_headers(
    dialect: str, headers: Mapping[str, str], *, require_timestamp: bool = True
) -> None:
    """Raise ``SignatureError`` unless the signature headers of ``dialect`` are
    present and well-formed (no body needed: ingest calls this before reading it).

    Blazz: ``X-HMAC-Signature`` 64 hex digits and ``X-Timestamp`` digits.
    WAHA: ``X-Webhook-Hmac`` 128 hex digits, ``X-Webhook-Hmac-Algorithm``
    absent or sha512, ``X-Webhook-Timestamp`` digits (required unless
    ``require_timestamp`` is False; then checked only when present).
    """
    if dialect == "blazz":
        sig = _header(headers, "X-HMAC-Signature")
        ts = _header(headers, "X-Timestamp")
        if not sig:
            raise SignatureError("missing X-HMAC-Signature header")
        if not ts:
            raise SignatureError("missing X-Timestamp header")
        if not _HEX64.fullmatch(sig):
            raise SignatureError("bad X-HMAC-Signature: not 64 hex digits (HMAC-SHA256)")
        if not _DIGITS.fullmatch(ts):
            raise SignatureError("X-Timestamp is not unix seconds (digits)")
        return
    sig = _header(headers, "X-Webhook-Hmac")
    if not sig:
        raise SignatureError("missing X-Webhook-Hmac header")
    algo = (_header(headers, "X-Webhook-Hmac-Algorithm") or "sha512").lower()
    if algo != "sha512":
        raise SignatureError("unsupported X-Webhook-Hmac-Algorithm (only sha512)")
    if not _HEX128.fullmatch(sig):
        raise SignatureError("bad X-Webhook-Hmac: not 128 hex digits (HMAC-SHA512)")
    ts = _header(headers, "X-Webhook-Timestamp")
    if not ts:
        if require_timestamp:
            raise SignatureError("missing X-Webhook-Timestamp header")
    elif not _DIGITS.fullmatch(ts):
        raise SignatureError("X-Webhook-Timestamp is not unix milliseconds (digits)")


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
        raise StaleTimestamp(f"{what} is {age:.0f} s old (limit {skew:g} s): stale or replayed")
    if -age > skew:
        raise StaleTimestamp(f"{what} is {-age:.0f} s in the future (limit {skew:g} s)")


def verify_blazz(
    key: str, headers: Mapping[str, str], body: bytes, *, now: float, skew: float
) -> None:
    """Raise ``SignatureError`` unless the Blazz signature is valid and fresh."""
    check_headers("blazz", headers)
    sig = _header(headers, "X-HMAC-Signature") or ""
    ts = _header(headers, "X-Timestamp") or ""
    # The signature covers the timestamp text exactly as sent: verify first,
    # so a forged timestamp is a bad signature, not a stale one.
    if not _same(sig, blazz_signature(key, ts, body)):
        raise SignatureError("bad X-HMAC-Signature")
    _check_time(float(ts), now, skew, "X-Timestamp")


def verify_waha(
    key: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    skew: float,
    require_timestamp: bool = True,
) -> None:
    """Raise ``SignatureError`` unless the WAHA signature is valid and fresh.

    Without ``require_timestamp`` an event without ``X-Webhook-Timestamp`` is
    accepted (and never goes stale: a captured one can be replayed forever).
    """
    check_headers("waha", headers, require_timestamp=require_timestamp)
    sig = _header(headers, "X-Webhook-Hmac") or ""
    if not _same(sig, waha_signature(key, body)):
        raise SignatureError("bad X-Webhook-Hmac")
    # WAHA's timestamp header is not signed: this refuses stale deliveries
    # (a clock or queue problem on the instance) and replays of a captured
    # event with its original headers, not a replayer who rewrites the header.
    ts = _header(headers, "X-Webhook-Timestamp")
    if ts:
        _check_time(float(ts) / 1000.0, now, skew, "X-Webhook-Timestamp")


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
