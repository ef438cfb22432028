"""The API must start fast and without the engine: no torch, transformers, faiss or fastif."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time
start = time.perf_counter()
import service.app
seconds = time.perf_counter() - start
heavy = ("torch", "transformers", "faiss", "fastif", "workers", "numpy")
print(json.dumps({"seconds": seconds, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_service_app_imports_fast_and_light() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=60)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert "torch" not in report["loaded"] and "fastif" not in report["loaded"]
    assert report["seconds"] < 1.0, report
