"""The narrow interface between the proxy and one upstream instance.

One ``Transport`` per instance sends one request and hands back an
``UpstreamResponse`` once the status line and headers have arrived; the body
is read with ``read()`` (whole) or ``iter_chunks()`` (as it arrives). Every
failure is an ``UpstreamError`` that says whether the upstream may have
received the request, so that a caller can decide whether replaying it is
safe (design: "never duplicate a send").

Error classes and what they promise:

===========================  ==============  ========================================
class                        request_sent    meaning
===========================  ==============  ========================================
``ConnectFailed``            always False    no connection was established (refused,
                                             DNS, connect timeout, no pooled
                                             connection free in time): the upstream
                                             cannot have received a byte
``StaleConnection``          always False    a *reused* pooled connection turned out
                                             to be closed by the peer before a byte
                                             of this request left us (see below)
``UpstreamDisconnected``     True / False    EOF or reset; ``request_sent`` says
                                             whether a byte of the request may have
                                             reached the upstream
``UpstreamTimeout``          True / False    no (further) answer in time
``BadResponse``              always True     the upstream answered something that
                                             is not HTTP/1.x
===========================  ==============  ========================================

``replay_safe`` is ``not request_sent``: it is True only when the upstream
provably did not get the request, which is what a non-idempotent request
(POST, PATCH) needs before it may be sent again. Idempotent methods may be
replayed after any of them (the transports do so once, transparently, on a
reused connection; see ``router.transport.fast``).

The stale-connection rule (``router.transport.fast``): a request is only
ever written on a pooled connection after checking, right before the write,
that the peer has not closed it: the connection's protocol has seen no EOF,
no error and no stray bytes, and a zero-timeout ``poll()`` of its socket
reports nothing readable and no hang-up (a FIN, a RST or unexpected data
already queued in our kernel). A connection failing that check is closed and
skipped without error. ``StaleConnection`` is raised when the *first write*
of the request fails synchronously on a reused connection (the kernel refuses
it with EPIPE / ECONNRESET because the peer's RST already arrived): no byte of
the request left this host. An EOF or reset that arrives *after* a write
succeeded is never called stale, even on a connection that has just been
reused: a server that read the request and then died looks exactly the same
from here, so that is ``UpstreamDisconnected(request_sent=True)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import TypeAlias

__all__ = [
    "IDEMPOTENT_METHODS",
    "Body",
    "ConnectFailed",
    "HeaderItems",
    "StaleConnection",
    "Transport",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "header_items",
]

# RFC 9110 section 9.2.2.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

HeaderItems: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]
Body: TypeAlias = bytes | AsyncIterable[bytes] | None


def header_items(headers: HeaderItems) -> Iterable[tuple[str, str]]:
    """``(name, value)`` pairs of a mapping (every value of a multidict) or a list."""
    # Not isinstance(headers, Mapping): an ABC check costs more than the rest.
    items = getattr(headers, "items", None)
    if items is not None:
        return items()  # type: ignore[no-any-return]
    return headers  # type: ignore[return-value]


class UpstreamError(Exception):
    """A request to an upstream failed; see the module docstring for the classes.

    ``request_sent``: a byte of the request may have reached the upstream.
    ``reused``: it happened on a pooled connection that had served a request before.
    """

    request_sent: bool = True

    def __init__(self, message: str, *, request_sent: bool = True, reused: bool = False) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.reused = reused

    @property
    def replay_safe(self) -> bool:
        """True when even a non-idempotent request may be sent again."""
        return not self.request_sent

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, request_sent={self.request_sent}, "
            f"reused={self.reused})"
        )


class ConnectFailed(UpstreamError):
    """No connection: refused, DNS, connect timeout (``timeout``), pool wait timeout."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message, request_sent=False)
        self.timeout = timeout


class StaleConnection(UpstreamError):
    """A reused pooled connection was found closed before a byte of the request left."""

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=False, reused=True)


class UpstreamDisconnected(UpstreamError):
    """EOF or reset from the upstream; ``request_sent`` says whether it may have the request.

    ``response_started``: a byte of the response had arrived.
    """

    def __init__(
        self,
        message: str,
        *,
        request_sent: bool,
        reused: bool = False,
        response_started: bool = False,
    ) -> None:
        super().__init__(message, request_sent=request_sent, reused=reused)
        self.response_started = response_started


class UpstreamTimeout(UpstreamError):
    """No (further) answer within the read timeout."""


class InstanceDown(UpstreamError):
    """The instance was declared down (hung: no answer to health checks) while
    this request waited on it: released at once instead of after the read
    timeout. ``request_sent`` as for any error; nothing came back."""


class BadResponse(UpstreamError):
    """The upstream sent something that is not a valid HTTP/1.x response."""


def error_kind(exc: UpstreamError) -> str:
    """A short name for what went wrong (metric labels, listing reasons)."""
    if isinstance(exc, ConnectFailed):
        return "connect_timeout" if exc.timeout else "connect"
    if isinstance(exc, StaleConnection):
        return "stale"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, InstanceDown):
        return "hung"
    return "reset"


class UpstreamResponse(ABC):
    """An upstream answer whose status line and headers have arrived.

    ``headers`` are the upstream's, in order, duplicates kept, hop-by-hop
    ones included (filtering is the proxy's job). ``content_length`` is the
    declared length (None when chunked or read-until-close; for a HEAD
    answer or a 204/304 it is what the upstream declared, the body is empty).
    Call ``release()`` when done (in a ``finally``): a connection whose body
    was read to the end goes back to the pool, any other is closed.
    """

    __slots__ = ()

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None

    @abstractmethod
    async def read(self) -> bytes:
        """The whole body. Raises ``UpstreamError``."""

    @abstractmethod
    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (one chunk per read from the socket)."""

    @abstractmethod
    def release(self) -> None:
        """Done with this response: reuse the connection if the body was complete."""

    @abstractmethod
    def close(self) -> None:
        """Abort: close the connection whatever state the body is in."""


class Transport(ABC):
    """Sends requests to one upstream base URL over pooled connections."""

    @abstractmethod
    async def request(
        self,
        method: str,
        path_qs: str,
        headers: HeaderItems,
        body: Body = None,
        *,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response headers are in.

        ``read_timeout`` replaces the transport's own for this request (a
        call the upstream itself gives longer, such as a session create).

        ``path_qs`` is the percent-encoded path and query, appended to the
        transport's base URL. ``headers`` go as given (the transport adds
        ``Host`` and the body framing: ``Content-Length`` for ``bytes``,
        ``Transfer-Encoding: chunked`` for an async iterable, ``Content-Length:
        0`` for no body on a method that has one). Raises ``UpstreamError``.
        """

    def stalled(self, silent_for: float) -> int:
        """Requests in flight that have had no byte of answer for ``silent_for``
        seconds (evidence that the instance hangs). 0 when the transport
        cannot tell."""
        return 0

    def abort_in_flight(self, reason: str) -> int:
        """Fail every request in flight that has had no byte of answer with
        ``InstanceDown`` (the instance was declared down); how many. Answers
        already arriving are left alone."""
        return 0

    @abstractmethod
    async def close(self) -> None:
        """Close every pooled connection."""
