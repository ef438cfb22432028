"""The base of this app's pure ASGI middleware: HTTP requests only, everything else passes through."""

from __future__ import annotations

from abc import ABC, abstractmethod

from starlette.types import ASGIApp, Receive, Scope, Send


class HTTPMiddleware(ABC):
    """Pure ASGI middleware that acts on HTTP requests; lifespan and websocket scopes go straight to the app.

    Pure ASGI rather than Starlette's BaseHTTPMiddleware, so that a subclass can wrap `receive`
    and `send` themselves (count the streamed body bytes, see the response status).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request through `self.app`."""
