"""Content fingerprints: the same weights, parameter selection and data give the same id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(file_digest(child).encode())
        return digest.hexdigest()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_files_digest(model_dir: Path) -> str:
    """Weights, config and tokenizer files of a model directory."""
    digest = hashlib.sha256()
    for child in sorted(model_dir.iterdir()):
        if child.is_file() and (child.suffix in (".safetensors", ".json", ".txt", ".model") or child.name == "merges.txt"):
            digest.update(child.name.encode())
            digest.update(file_digest(child).encode())
    return digest.hexdigest()


def combine(**parts: object) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
