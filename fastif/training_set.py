"""The training set's artefacts: loaded when stored, else built shard by shard (fastif/staged_build.py).

A build writes each example's first-token feature, gradient key and (cached layouts) prefix
activations into memory maps, shard by shard, so its memory does not grow with the training
set; any process may write shards of the same build (the workers do, workers/build.py), and a
stopped build resumes from the shards it wrote. Without an artefact folder the same shards go
to arrays in memory. Queries read the finished arrays read-only.
"""

from __future__ import annotations

from . import knn
from .allocator import release_freed_memory
from .artefacts import Artefacts, ArtefactStore, index_name, search_vectors
from .config import IndexConfig
from .encoded import allocate_set, encode_set, open_set
from .encoding import Tokenized
from .prepared_model import PreparedModel
from .progress import ProgressCallback
from .staged_build import StagedBuild, shard_ranges


class TrainingSetBuild:
    """How one layout (``index_config``) of one fingerprint's artefacts (``store``) is loaded or built."""

    def __init__(self, model: PreparedModel, tokens: Tokenized, pad_id: int, store: ArtefactStore,
                 index_config: IndexConfig, names: list[str]):
        self.model = model
        self.tokens = tokens
        self.pad_id = pad_id
        self.store = store
        self.index_config = index_config
        self.names = names
        # How the activations are stored; None: none are (no frozen prefix, or recomputed per query).
        self.prefix_dtype = None if model.prefix is None or index_config.prefix == "recompute" else index_config.prefix_dtype

    @property
    def count(self) -> int:
        return len(self.tokens)

    def stored(self) -> Artefacts | None:
        """This layout's artefacts as stored complete, opened read-only; None when they are not."""
        return self.store.load(self.index_config, self.prefix_dtype) if self.store.complete() else None

    def staged(self) -> StagedBuild:
        """This layout's build, staged in the artefact folder in shards any process may write."""
        if self.store.folder is None:
            raise RuntimeError("a staged build needs an artefact folder")
        return StagedBuild(self.store.folder, self.prefix_dtype or "no-prefix", self.count, self.index_config.shard_examples)

    def artefacts(self, on_progress: ProgressCallback | None = None, batch_size: int = 64) -> Artefacts:
        """The stored artefacts, or the shards not written yet written here and the build finished."""
        stored = self.stored()
        if stored is not None:
            return stored
        if self.store.folder is None:
            return self._in_memory(on_progress, batch_size)
        build = self.staged()
        done = build.examples_done()
        for shard in build.pending():
            self.encode_shard(shard, _overall(on_progress, done, self.count), batch_size)
            done += len(build.shards[shard])
        return self.finish(build)

    def encode_shard(self, shard: int, on_progress: ProgressCallback | None = None, batch_size: int = 64) -> None:
        """Write shard ``shard`` of the staged build and mark it done."""
        build = self.staged()
        folder = build.ensure_allocated(lambda fresh: allocate_set(self.model, self.tokens, fresh,
                                                                   self.prefix_dtype or "float32",
                                                                   keep_prefix=self.prefix_dtype is not None))
        encode_set(self.model, self.tokens, self.pad_id, batch_size, on_progress, into=open_set(folder, self.prefix_dtype),
                   rows=build.shards[shard])
        build.mark_done(shard)
        # Batches of every padded width leave free chunks of every size on the heap, which the raised trim
        # threshold (fastif/allocator.py) would keep: without this a worker's memory crept up shard after shard.
        release_freed_memory()

    def finish(self, build: StagedBuild | None = None) -> Artefacts:
        """Once every shard is written (by any process): the index over the staged vectors, all moved into place.

        Under the build's lock: of two processes finishing one fingerprint, the second loads what the first moved.
        """
        build = build or self.staged()
        with build.locked():
            stored = self.stored()
            if stored is not None:
                return stored
            missing = build.pending()
            if missing:
                raise RuntimeError(f"{len(missing)} of the build's {len(build.shards)} shards are not written yet")
            # The index is written beside the staged vectors and moved with them: a finisher that dies while
            # it builds leaves the staging folder whole, and its redelivery builds it again.
            staged = open_set(build.path, self.prefix_dtype)
            knn.write_index(search_vectors(staged.features, staged.gradient_keys, self.index_config.space),
                            self.index_config, build.path / index_name(self.index_config))
            return self.store.finish(build, self.index_config, self.count, self.names, self.prefix_dtype)

    def _in_memory(self, on_progress: ProgressCallback | None, batch_size: int) -> Artefacts:
        """No artefact folder: the same shards, into arrays in memory."""
        encoded = allocate_set(self.model, self.tokens, None, self.prefix_dtype or "float32",
                               keep_prefix=self.prefix_dtype is not None)
        for rows in shard_ranges(self.count, self.index_config.shard_examples):
            encode_set(self.model, self.tokens, self.pad_id, batch_size, _overall(on_progress, rows.start, self.count),
                       into=encoded, rows=rows)
        vectors = search_vectors(encoded.features, encoded.gradient_keys, self.index_config.space)
        return Artefacts(encoded.features, encoded.gradient_keys, encoded.prefix, knn.build_index(vectors, self.index_config))


def _overall(on_progress: ProgressCallback | None, base: int, total: int) -> ProgressCallback:
    """A shard's progress callback that reports the examples done over the whole set."""

    def report(stage: str, done: int, _shard_total: int) -> bool:
        return bool(on_progress and on_progress(stage, base + done, total))

    return report
