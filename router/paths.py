"""The path the router routes by must be the path the upstream acts on.

The router reads the session id from the decoded path, while the raw
(percent-encoded) path goes upstream. Express, under every supported API,
decodes route parameters segment by segment, so the two agree except when a
segment carries an encoded ``/`` (``victim%2Fx``: the router would read
``victim``, the upstream ``victim/x``), an encoded ``\\`` or NUL, a malformed
escape, a dot segment, or an empty segment (``//api/...``: Express routes
none of these the way the decoded path reads). One such request used to make
the upstream answer "session not found" for a session that runs, and the
router restore it elsewhere: two browsers on one phone. They are refused.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# Segments that decode to something Express would not route as written.
_ENCODED_BAD = re.compile(r"%(2[fF]|5[cC]|00)")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def path_problem(raw_path: str) -> tuple[str, str] | None:
    """``(segment, reason)`` when the raw path (no query) cannot be routed as
    its decoded form reads, else None. Cheap when nothing is suspicious."""
    if "%" not in raw_path and "//" not in raw_path and "/." not in raw_path:
        return None
    if "//" in raw_path:
        return "", "the path has an empty segment ('//')"
    for segment in raw_path.split("/")[1:]:
        if "%" in segment:
            if _BAD_ESCAPE.search(segment):
                return segment, "malformed percent escape"
            if _ENCODED_BAD.search(segment):
                return segment, "an encoded '/', '\\' or NUL would be decoded into one segment"
        if unquote(segment) in (".", ".."):
            return segment, "dot segment"
    return None
