"""Whether the state volume can hold what a registration will build, judged before it is recorded.

A build writes, per training example: its first-token feature and gradient key, the faiss
index's copy of the key and its id, and (unless ``prefix: "recompute"``) the frozen prefix's
activations, ``tokens × hidden`` numbers in ``prefix_dtype``; and once per data file, the
stored training set (fastif/stored_set.py): its texts, token ids and segment ids, offsets and
labels. The API imports neither torch
nor a tokenizer, so the count of tokens is bounded from above: at most ``max_length`` per
example, and at most one per 3 bytes of the data file plus the two special tokens
(WordPiece and BPE average about 4 characters of English per token). The estimate errs on
the side of refusing a build that would just fit rather than failing one half-written.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from api_schemas import ModelCreate

from .errors import ProblemError

BYTES_PER_TOKEN_AT_MOST = 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class BuildSize:
    examples: int
    tokens: int  # an upper bound
    bytes: int  # an upper bound


def _lines_in(path: Path) -> int:
    """Rows of a JSON Lines, CSV or TSV file, read in 1 MiB blocks (a header and a last line count: an upper bound)."""
    with path.open("rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b"")) + 1


def _model_shape(model_dir: Path) -> tuple[int, int] | None:
    """(hidden size, number of labels) from the model's config.json; None where it does not say (the worker's
    load then reports what is wrong with the model)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        hidden = int(config.get("hidden_size") or config.get("dim") or config.get("d_model") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels") or 2)
    return (hidden, max(labels, 2)) if hidden > 0 else None


def build_size(data_root: Path, body: ModelCreate) -> BuildSize | None:
    """An upper bound of the bytes the build of ``body`` (paths relative to ``data_root``) writes.

    None when it cannot be told: a Hugging Face dataset folder (its Arrow files do not tell
    their rows without the `datasets` library, which the API does not carry), or a model
    whose config.json gives no hidden size. The worker's build then fails with
    insufficient-storage if the volume fills, and leaves no half-built set behind.
    """
    data = data_root / body.train_data.path
    shape = _model_shape(data_root / body.model_path)
    if not data.is_file() or shape is None:
        return None
    hidden, labels = shape
    examples = _lines_in(data)
    data_bytes = data.stat().st_size
    tokens = min(examples * body.influence.max_length, data_bytes // BYTES_PER_TOKEN_AT_MOST + 2 * examples)
    key = (labels - 1) * hidden * 4
    per_example = hidden * 4 + 2 * key + 16  # feature, gradient key, the index's copy and its id, prefix offset
    # An IVF build holds its training sample in a scratch file while it trains: 64 keys a cell, 4·√N cells.
    sample = min(examples, 256 * math.isqrt(examples)) * key
    prefix = 0 if body.index.prefix == "recompute" else tokens * hidden * DTYPE_BYTES[body.index.prefix_dtype]
    # The texts take at most the file's bytes; ids and segment ids at most 4 bytes a token each; five arrays of
    # offsets and the labels 8 bytes an example each.
    stored_set = data_bytes + 8 * tokens + 48 * examples
    return BuildSize(examples=examples, tokens=tokens, bytes=examples * per_example + sample + prefix + stored_set)


def check_room(data_root: Path, state_root: Path, body: ModelCreate) -> BuildSize | None:
    """507 insufficient-storage when the state volume has less free space than the build needs."""
    size = build_size(data_root, body)
    if size is None:
        return None
    existing = state_root if state_root.exists() else next(p for p in state_root.parents if p.exists())
    free = shutil.disk_usage(existing).free
    if size.bytes > free:
        raise ProblemError(
            "insufficient-storage",
            f"the build needs up to {size.bytes / 2**20:,.0f} MiB on the state volume ({size.examples:,} examples, "
            f"at most {size.tokens:,} tokens) and {free / 2**20:,.0f} MiB are free; free some space, or register "
            f"with index.prefix_dtype float16 (half the activations' bytes) or index.prefix \"recompute\" (none)")
    return size
