"""A build staged on disk in contiguous shards of the training set, that any process can add to.

The arrays of one storage layout are allocated once, as memory maps in
``<artefact dir>/<fingerprint>/.building-<layout>/``, and each shard of
``shard_examples`` examples writes its own rows of them, then drops a marker file
(``rows-<start>-<end>.done``) once its rows are flushed. The shard size is the index
configuration's ``shard_examples`` (1,024 by default: small enough that two workers share
a 10K build evenly, large enough that a task's overhead is lost in its seconds). So:

- shards can run in any order, in any process on any machine that sees the volume (the
  workers' build shards, workers/build.py), and the result is the same as one process
  running them in order: each shard's batches are drawn from its own rows only;
- a shard whose process died is simply run again: it overwrites its own rows and nothing else;
- a build that stopped (a crash, a cancel, a full disk) resumes from the shards already marked,
  whoever starts it again; a staging folder nobody touched for a day is removed.

``finish`` (under a file lock, so that two builds of one fingerprint move files one at a time)
builds the index over the staged vectors and moves everything into place.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

STALE_BUILD_S = 24 * 3600  # a staging folder untouched this long belongs to a build nobody resumed


def shard_ranges(count: int, size: int) -> list[range]:
    """Rows ``0 .. count`` in contiguous ranges of ``size`` (the last one shorter)."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


class StagedBuild:
    """The staging folder of one layout of one fingerprint's artefacts, and which of its shards are written."""

    def __init__(self, folder: Path, layout: str, count: int, shard_size: int):
        self.folder = folder
        # Another shard size draws other batches (other rounding): a staging folder of its own.
        self.path = folder / f".building-{layout}-{shard_size}"
        self.shards = shard_ranges(count, shard_size)

    def _marker(self, shard: int) -> Path:
        rows = self.shards[shard]
        return self.path / f"rows-{rows.start}-{rows.stop}.done"

    def done(self, shard: int) -> bool:
        """Whether shard ``shard``'s rows are written (by any process)."""
        return self._marker(shard).is_file()

    def pending(self) -> list[int]:
        """The shards not written yet, in order."""
        return [shard for shard in range(len(self.shards)) if not self.done(shard)]

    def examples_done(self) -> int:
        return sum(len(rows) for shard, rows in enumerate(self.shards) if self.done(shard))

    def ensure_allocated(self, allocate: Callable[[Path], None]) -> Path:
        """The staging folder, allocated by ``allocate(folder)`` if nobody did yet.

        Allocated beside it and renamed into place, so that a process sees either no folder or
        a whole one; when two allocate at once the first rename wins and the other's is removed.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        if self.path.is_dir():
            return self.path
        fresh = Path(tempfile.mkdtemp(prefix=".allocating-", dir=self.folder))
        try:
            allocate(fresh)
            fresh.rename(self.path)
        except OSError:
            if not self.path.is_dir():
                raise
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        return self.path

    def mark_done(self, shard: int) -> None:
        """Shard ``shard``'s rows are written and flushed."""
        self._marker(shard).touch()

    def markers(self) -> list[Path]:
        return sorted(self.path.glob("rows-*.done"))

    def locked(self) -> AbstractContextManager[None]:
        """Exclusive among every process that finishes a build of this fingerprint."""
        return folder_lock(self.folder)

    def _remove_stale(self) -> None:
        remove_stale(self.folder, ".building-*", ".allocating-*")


def remove_stale(folder: Path, *patterns: str) -> None:
    """Remove what matches ``patterns`` in ``folder`` and nobody touched for STALE_BUILD_S: a writer's that died."""
    for stale in [path for pattern in patterns for path in folder.glob(pattern)]:
        try:
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:  # another process removed it meanwhile
            pass


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive among every process that writes artefacts into ``folder`` (a fingerprint's): the build's finish,
    an index of another kind built later."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
