"""Pure ASGI middleware that refuses request bodies over a byte limit with 413.

It checks Content-Length up front and also counts the bytes actually streamed, since
a chunked upload has no Content-Length and a client may lie about it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import problem_response
from .http_middleware import HTTPMiddleware


class _BodyTooLarge(Exception):
    """Raised from receive() once the streamed body passes the limit."""


class BodySizeLimitMiddleware(HTTPMiddleware):
    """413 body-too-large for any HTTP request body longer than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the 413 problem."""
        response = problem_response(
            "body-too-large", f"the request body is limited to {self.max_bytes} bytes", instance=scope.get("path")
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None when absent or unreadable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
