"""The one rule for paths inside a root folder (the data root, the state directory).

The API applies it to the paths a client sends, and the workers to the paths a record
holds; each side turns `OutsideRoot` into its own error (a 422 problem, a failed job).
"""

from __future__ import annotations

from pathlib import Path, PurePath


class OutsideRoot(ValueError):
    """The path leaves its root folder, or cannot be resolved at all."""


def resolve_inside(root: Path, raw: str) -> Path:
    """`raw` (relative to `root`, or absolute) with every symlink resolved, if it stays inside `root`.

    Refuses NUL bytes and `..` components outright, whatever they would resolve to, and
    symlinks that land outside the root. Says nothing about whether the path exists.
    """
    if "\x00" in raw or ".." in PurePath(raw).parts:
        raise OutsideRoot(raw)
    resolved_root = root.resolve()
    try:
        # resolve() follows every symlink, so a link inside the root that points out is caught here.
        resolved = (resolved_root / raw).resolve()
    except (OSError, RuntimeError):  # symlink loops and the like
        raise OutsideRoot(raw) from None
    if not resolved.is_relative_to(resolved_root):
        raise OutsideRoot(raw)
    return resolved
