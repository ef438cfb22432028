"""A single static page at /ui: paste an input, pick a model, see its explanation and graph.

The page is plain HTML and JavaScript that talks to the public API only (with an
X-API-Key the user pastes when keys are configured), so it needs no auth itself.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

PAGE = Path(__file__).with_name("index.html")

router = APIRouter(tags=["ui"])


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


# The page's own script and style are inline; everything it fetches is this origin's API.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def ui() -> HTMLResponse:
    """The page."""
    return HTMLResponse(_page(), headers=_HEADERS)


@router.get("/ui/", include_in_schema=False)
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)
