"""The training set, read and tokenised once, kept beside the artefacts as files every process maps.

Every process that loads a model needs the training set's token ids (to batch its examples)
and texts (to show them in answers). Read and tokenised in each process, they sat in each
one's own memory and grew with N: about 125 MiB per worker at 500K sentence pairs, and a
minute of tokenising in each. Stored once as flat arrays (the same ``TextColumn`` and
``Ragged`` layouts the engine holds in memory) and opened as read-only memory maps, they
are file pages that the kernel shares between the processes on a machine and may drop and
read again, not memory a process owns.

A set is keyed by what its arrays depend on: the data file's digest (and how it is read),
the model's files (its tokenizer and labels) and ``max_length``. It is written in a scratch
folder beside its place and renamed into it, so a process sees a whole set or none; two
processes writing one at once write the same arrays, and the first rename wins.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Examples, TextColumn
from .encoding import Ragged, Tokenized
from .staged_build import remove_stale

SET_VERSION = 1
SETS_FOLDER = "training-sets"  # under the artefact folder, beside the fingerprints' folders


@dataclass(frozen=True)
class StoredSet:
    """A stored set, opened: its examples' texts and token ids are memory maps of the files in ``folder``."""

    folder: Path
    examples: Examples
    tokens: Tokenized

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def set_folder(artefact_dir: Path, key: str) -> Path:
    return Path(artefact_dir) / SETS_FOLDER / key


def save_set(folder: Path, examples: Examples, tokens: Tokenized) -> None:
    """Write ``examples`` and their ``tokens`` as the set at ``folder`` (unless a whole one is there already)."""
    if len(examples) != len(tokens):
        raise ValueError(f"{len(examples)} examples but {len(tokens)} tokenised")
    if _complete(folder):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent, ".writing-*")  # left by a process that died while writing
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
    try:
        arrays = {"labels": examples.labels, **_column("texts", examples.texts), **_ragged("input-ids", tokens.input_ids)}
        if examples.pairs is not None:
            arrays.update(_column("pairs", examples.pairs))
        if tokens.token_type_ids is not None:
            arrays.update(_ragged("token-types", tokens.token_type_ids))
        for name, array in arrays.items():
            np.save(scratch / f"{name}.npy", array)
        (scratch / "meta.json").write_text(json.dumps({"version": SET_VERSION, "examples": len(examples)}))
        scratch.rename(folder)
    except OSError:
        if not _complete(folder):  # else another process's rename won: its set is the same
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def open_set(folder: Path) -> StoredSet | None:
    """The set at ``folder``, its texts and token ids mapped read-only; None when there is no whole one."""
    if not _complete(folder):
        return None

    def mapped(name: str) -> np.ndarray | None:
        path = folder / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def ragged(name: str) -> Ragged | None:
        flat = mapped(name)
        return None if flat is None else Ragged(flat=flat, offsets=mapped(f"{name}-offsets"))

    def column(name: str) -> TextColumn | None:
        data = mapped(name)
        return None if data is None else TextColumn(data, mapped(f"{name}-offsets"))

    labels = np.load(folder / "labels.npy")  # 8 bytes an example, and torch wants it writable
    examples = Examples(column("texts"), column("pairs"), labels)
    tokens = Tokenized(input_ids=ragged("input-ids"), token_type_ids=ragged("token-types"),
                       labels=torch.from_numpy(labels))
    return StoredSet(folder, examples, tokens)


def _complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == SET_VERSION


def _column(name: str, column: TextColumn) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(column.data, dtype=np.uint8) if isinstance(column.data, bytes) else column.data,
            f"{name}-offsets": column.offsets}


def _ragged(name: str, ragged: Ragged) -> dict[str, np.ndarray]:
    return {name: ragged.flat, f"{name}-offsets": ragged.offsets}
