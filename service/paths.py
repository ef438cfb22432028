"""Resolve client-given paths inside the data root, refusing anything that escapes it."""

from __future__ import annotations

from pathlib import Path

from records.paths import OutsideRoot, resolve_inside

from .errors import ProblemError


def resolve_in_root(data_root: Path, raw: str, field: str, *, must_exist: bool = True) -> str:
    """The path `raw` relative to `data_root` (POSIX, symlinks resolved) if it exists inside it.

    Refuses `..` components outright, absolute paths and symlinks that land outside the
    root (422 path-outside-data-root), and paths that do not exist (422 path-not-found)
    unless `must_exist` is off (a file still to be written). The detail never echoes the
    server's absolute layout.
    """
    loc = ["body", *field.split(".")]
    try:
        resolved = resolve_inside(data_root, raw)
    except OutsideRoot:
        raise ProblemError(
            "path-outside-data-root",
            f"{field} {raw!r} is not inside the data root",
            errors=[{"loc": loc, "msg": "path outside the data root", "type": "path_outside_data_root"}],
        ) from None
    if must_exist and not resolved.exists():
        raise ProblemError(
            "path-not-found",
            f"{field} {raw!r} does not exist in the data root",
            errors=[{"loc": loc, "msg": "path not found", "type": "path_not_found"}],
        )
    return resolved.relative_to(data_root.resolve()).as_posix()
