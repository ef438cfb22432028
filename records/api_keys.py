"""API keys and their roles, parsed from FASTIF_API_KEYS.

Each comma-separated entry is `name:key:role` (role `admin` or `client`) or a bare `key`, which
is an admin key named after a digest of itself, so that job records and metrics can name it
without holding it. Admin keys register and delete models and see every job; client keys see
only the jobs they created.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "client"]
ROLES: tuple[Role, ...] = ("admin", "client")
# Names appear in job records, metric labels and Redis key names: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: who it is (`name`), the secret it is checked against, and its role."""

    name: str
    secret: str
    role: Role

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey(name={self.name!r}, role={self.role!r})"


def bare_key_name(secret: str) -> str:
    """The name of a bare key: `key-` and 8 hex digits of its SHA-256 (stable, and says nothing usable)."""
    return "key-" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]


def parse_api_keys(entries: list[str]) -> tuple[ApiKey, ...]:
    """The keys of FASTIF_API_KEYS' entries; ValueError naming the entry (by position, never the secret)."""
    keys: list[ApiKey] = []
    for position, entry in enumerate(entries, start=1):
        parts = entry.split(":")
        if len(parts) == 1:
            keys.append(ApiKey(bare_key_name(entry), entry, "admin"))
            continue
        if len(parts) != 3:
            raise ValueError(f"FASTIF_API_KEYS entry {position} is neither a bare key nor name:key:role")
        name, secret, role = (part.strip() for part in parts)
        if not _NAME.match(name):
            raise ValueError(f"FASTIF_API_KEYS entry {position}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        if not secret:
            raise ValueError(f"FASTIF_API_KEYS entry {position} ({name}) has an empty key")
        if role not in ROLES:
            raise ValueError(f"FASTIF_API_KEYS entry {position} ({name}): role {role!r} is not admin or client")
        keys.append(ApiKey(name, secret, role))  # type: ignore[arg-type]
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise ValueError(f"FASTIF_API_KEYS names a key twice: {sorted({n for n in names if names.count(n) > 1})}")
    if len({key.secret for key in keys}) != len(keys):
        raise ValueError("FASTIF_API_KEYS holds the same key twice")
    return tuple(keys)
