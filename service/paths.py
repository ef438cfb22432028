"""Resolve client-given paths inside the data root, refusing anything that escapes it."""

from __future__ import annotations

from pathlib import Path, PurePath

from .errors import ProblemError


def resolve_in_root(data_root: Path, raw: str, field: str) -> str:
    """The path `raw` relative to `data_root` (POSIX, symlinks resolved) if it exists inside it.

    Refuses `..` components outright, absolute paths and symlinks that land outside the
    root (422 path-outside-data-root), and paths that do not exist (422 path-not-found).
    The detail never echoes the server's absolute layout.
    """
    loc = ["body", *field.split(".")]
    outside = ProblemError(
        "path-outside-data-root",
        f"{field} {raw!r} is not inside the data root",
        errors=[{"loc": loc, "msg": "path outside the data root", "type": "path_outside_data_root"}],
    )
    if "\x00" in raw or ".." in PurePath(raw).parts:
        raise outside
    root = data_root.resolve()
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        # resolve() follows every symlink, so a link inside the root that points out is caught here.
        resolved = candidate.resolve()
    except (OSError, RuntimeError):  # symlink loops and the like
        raise outside from None
    if not resolved.is_relative_to(root):
        raise outside
    if not resolved.exists():
        raise ProblemError(
            "path-not-found",
            f"{field} {raw!r} does not exist in the data root",
            errors=[{"loc": loc, "msg": "path not found", "type": "path_not_found"}],
        )
    relative = resolved.relative_to(root).as_posix()
    return relative
