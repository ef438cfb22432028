"""Decoding helpers so the stores work with both str and bytes redis clients."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def text(value: Any) -> str | None:
    """A Redis reply as str (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def text_dict(raw: dict[Any, Any]) -> dict[str, str]:
    """An HGETALL reply with str keys and values."""
    return {text(k): text(v) for k, v in raw.items()}  # type: ignore[misc]


def timestamp(value: str | None) -> datetime | None:
    """Epoch seconds as stored in a record -> aware UTC datetime."""
    if not value:
        return None
    return datetime.fromtimestamp(float(value), tz=UTC)


def optional_int(value: str | None) -> int | None:
    """A stored integer field that may be absent or empty."""
    if value is None or value == "":
        return None
    return int(value)
