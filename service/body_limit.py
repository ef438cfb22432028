"""Pure ASGI middleware that refuses request bodies over a byte limit with 413.

It checks Content-Length up front and also counts the bytes actually streamed, since a chunked
upload has no Content-Length and a client may lie about it.

Refusing is not enough: most clients (urllib, requests, httpx) write the whole body before they
read a byte of the answer, so a server that answers and closes while they are still sending hands
them "Connection reset by peer" instead of the problem. So the rest of the body is read and thrown
away first, up to `DRAIN_BOUND_BYTES`; past that bound, or when the client asked `Expect:
100-continue` and has not sent the body yet, the 413 goes out at once with `Connection: close`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import problem_response
from .http_middleware import HTTPMiddleware

# How much of an oversized body is read and discarded so that its client can read the 413.
DRAIN_BOUND_BYTES = 64 * 1024 * 1024


class _BodyTooLarge(Exception):
    """Raised from receive() once the streamed body passes the limit."""


class BodySizeLimitMiddleware(HTTPMiddleware):
    """413 body-too-large for any HTTP request body longer than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bound_bytes: int = DRAIN_BOUND_BYTES) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.drain_bound_bytes = drain_bound_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # Asked to wait for "100 Continue": the body is not on its way, so nothing needs draining.
            # (uvicorn sends the 100 only when the app first calls receive().)
            if _header(scope, b"expect") == b"100-continue" or declared > self.drain_bound_bytes:
                await self._refuse(scope, receive, send, close=True)
            else:
                await self._refuse(scope, receive, send, close=not await self._drain(receive, 0))
            return

        received = 0
        exceeded = False
        body_done = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Frameworks turn a failing receive() into their own error (FastAPI: a 400);
            # drop it so the client gets our 413 instead.
            if exceeded:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            # A receive() past the body's last chunk would wait for the client to leave: drain only what is still coming.
            drained = body_done or await self._drain(receive, received)
            await self._refuse(scope, receive, send, close=not drained)

    async def _drain(self, receive: Receive, received: int) -> bool:
        """Read and discard the rest of the body; False when it passed the drain bound or the client left."""
        while received <= self.drain_bound_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return False
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return received <= self.drain_bound_bytes
        return False

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, close: bool) -> None:
        """Send the 413 problem; `close` when the connection cannot carry another request."""
        response = problem_response(
            "body-too-large", f"the request body is limited to {self.max_bytes} bytes", instance=scope.get("path")
        )
        if close:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    """One request header's value, lower-cased, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.lower()
    return None


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None when absent or unreadable."""
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
