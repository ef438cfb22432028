"""What a registration computes once and keeps on disk, per fingerprint.

A folder ``<artefact dir>/<fingerprint>/`` holds the training set's first-token
features, gradient keys, cached prefix activations, one faiss index per (space, kind),
the curvature's spectra and EK-FAC's factors. A build writes them in shards into a
staging folder (fastif/staged_build.py) and ``finish`` moves them here. ``meta.json``
is written last: its presence marks a complete set, and a set written by another
``ARTEFACT_VERSION`` is computed again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from . import knn
from .config import IndexConfig
from .curvature import EIGENVALUE_PARTS, KroneckerFactors, Spectrum
from .curvature.kfac import load_tensors, save_tensors
from .prefix import PrefixStore, write_meta
from .staged_build import StagedBuild, folder_lock

ARTEFACT_VERSION = 2


@dataclass(frozen=True)
class Artefacts:
    """The training set's encoded form and its kNN index."""

    features: np.ndarray  # [N, H]
    gradient_keys: np.ndarray  # [N, (C-1)·A]
    prefix: PrefixStore | None
    index: faiss.Index


def index_name(config: IndexConfig) -> str:
    """The file of the faiss index of ``config``'s (space, kind); an IVF's lists lie beside it (``knn.ivf_data_file``)."""
    return f"index-{config.space}-{config.kind}.faiss"


def search_vectors(features: np.ndarray, gradient_keys: np.ndarray, space: str) -> np.ndarray:
    """What an index in ``space`` holds, and what its queries are: gradient keys, or first-token features."""
    return gradient_keys if space == "gradient" else features


class ArtefactStore:
    """The artefact folder of one fingerprint; ``folder`` None keeps nothing (every load misses)."""

    def __init__(self, folder: Path | None, fingerprint: str):
        self.folder = folder
        self.fingerprint = fingerprint

    def _index_file(self, config: IndexConfig) -> Path:
        return self.folder / index_name(config)

    def complete(self) -> bool:
        """A complete set for this fingerprint, written by this version (older sets are computed again)."""
        if self.folder is None or not (self.folder / "meta.json").is_file():
            return False
        meta = json.loads((self.folder / "meta.json").read_text())
        return meta.get("version") == ARTEFACT_VERSION and meta.get("fingerprint") == self.fingerprint

    def finish(self, build: StagedBuild, config: IndexConfig, num_train: int, params: list[str],
               prefix_dtype: str | None) -> Artefacts:
        """A staged build whose every shard and whose index (``index_name(config)``, written in the staging folder
        by ``knn.write_index``) are written, moved into place, and ``meta.json`` last; returned as opened for queries.

        Readers of an earlier set keep their memory maps, since the new files replace the old ones by
        rename, never by writing over them. The caller holds ``build.locked()``.
        """
        for marker in build.markers():
            marker.unlink()
        for built in build.path.iterdir():
            os.replace(built, self.folder / built.name)
        build.path.rmdir()
        # meta.json last: its presence marks a complete set of artefacts.
        write_meta(self.folder, {"version": ARTEFACT_VERSION, "fingerprint": self.fingerprint, "num_train": num_train,
                                 "params": params})
        return Artefacts(*self._arrays(prefix_dtype), knn.load_index(self._index_file(config)))

    def _arrays(self, prefix_dtype: str | None) -> tuple[np.ndarray, np.ndarray, PrefixStore | None] | None:
        prefix = None
        if prefix_dtype is not None:
            prefix = PrefixStore.load(self.folder, prefix_dtype)
            if prefix is None:
                return None
        return (np.load(self.folder / "features.npy", mmap_mode="r"),
                np.load(self.folder / "gradient_keys.npy", mmap_mode="r"), prefix)

    def load(self, config: IndexConfig, prefix_dtype: str | None) -> Artefacts | None:
        """The stored set, memory-mapped read-only; None when the prefix activations are not stored in ``prefix_dtype``.

        ``prefix_dtype`` None: no activations wanted (they are recomputed). An index of another
        (space, kind) than stored is built from the stored vectors and kept.
        """
        arrays = self._arrays(prefix_dtype)
        if arrays is None:
            return None
        features, gradient_keys, prefix = arrays
        path = self._index_file(config)
        if not path.is_file():  # the same model and data registered with another index
            with folder_lock(self.folder):
                if not path.is_file():
                    knn.write_index(search_vectors(features, gradient_keys, config.space), config, path)
        return Artefacts(features, gradient_keys, prefix, knn.load_index(path))

    def bytes_on_disk(self) -> int:
        """What the stored set takes (every prefix dtype and index kept for this fingerprint)."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    # -- curvature, fitted on first use ---------------------------------------------------
    def load_spectrum(self, curvature: str) -> Spectrum | None:
        path = self._spectrum_file(curvature)
        if path is None or not path.is_file():
            return None
        stored = json.loads(path.read_text())
        return Spectrum.from_dict(stored) if stored.get("version") == ARTEFACT_VERSION else None

    def save_spectrum(self, spectrum: Spectrum) -> None:
        path = self._spectrum_file(spectrum.curvature)
        if path is not None:  # written whole, then renamed: another process may be looking for it
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps({**spectrum.to_dict(), "version": ARTEFACT_VERSION}, indent=1, sort_keys=True))
            partial.replace(path)

    def _spectrum_file(self, curvature: str) -> Path | None:
        return self.folder / f"spectrum-{curvature}.json" if self.folder is not None else None

    @property
    def factors_file(self) -> Path | None:
        return self.folder / "ekfac.safetensors" if self.folder is not None else None

    def load_factors(self, names: list[str]) -> KroneckerFactors | None:
        """EK-FAC's stored factors, if they are of these influence parameters."""
        path = self.factors_file
        loaded = KroneckerFactors.load(path) if path is not None else None
        return loaded if loaded is not None and loaded.names == names else None

    # EK-FAC's fit in steps (fastif/curvature/kfac_fit.py ``FactorFit``), which the workers of a build share:
    # the bases, then each part of the eigenvalues' sums; removed once the factors they make are saved.
    @property
    def _bases_file(self) -> Path:
        return self.folder / "ekfac-bases.safetensors"

    def _eigenvalue_part_file(self, part: int) -> Path:
        return self.folder / f"ekfac-eigenvalues-{part}-of-{EIGENVALUE_PARTS}.safetensors"

    def load_factor_bases(self, names: list[str]) -> KroneckerFactors | None:
        loaded = KroneckerFactors.load(self._bases_file) if self.folder is not None else None
        return loaded if loaded is not None and loaded.names == names else None

    def save_factor_bases(self, bases: KroneckerFactors) -> None:
        if self.folder is not None:
            bases.save(self._bases_file)

    def load_eigenvalue_part(self, part: int, names: list[str]) -> dict[int, torch.Tensor] | None:
        loaded = load_tensors(self._eigenvalue_part_file(part)) if self.folder is not None else None
        if loaded is None or loaded[1]["names"] != names:
            return None
        return {names.index(name): sums for name, sums in loaded[0].items()}

    def save_eigenvalue_part(self, part: int, names: list[str], sums: dict[int, torch.Tensor]) -> None:
        if self.folder is not None:
            save_tensors(self._eigenvalue_part_file(part), {names[pos]: s for pos, s in sums.items()}, {"names": names})

    def remove_factor_steps(self) -> None:
        """The fit's steps, once the factors are saved (a process combining them at the same time finds those)."""
        if self.folder is not None:
            for path in (self._bases_file, *map(self._eigenvalue_part_file, range(EIGENVALUE_PARTS))):
                path.unlink(missing_ok=True)

    def has_curvature(self, curvature: str, names: list[str]) -> bool:
        """Whether the spectrum of ``curvature`` and EK-FAC's factors of these parameters are both stored."""
        return self.load_spectrum(curvature) is not None and self.load_factors(names) is not None

    def save_factors(self, factors: KroneckerFactors) -> None:
        if self.factors_file is not None:
            factors.save(self.factors_file)
