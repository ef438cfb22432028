"""The API must start without the engine: no torch, transformers, faiss or fastif (DESIGN.md §2).

Whether it starts fast is measured, not asserted: a wall-clock limit in a test fails on a busy
machine and proves nothing on an idle one. What makes it fast is what it does not import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import service.app
heavy = ("torch", "transformers", "faiss", "fastif", "workers", "numpy", "scipy", "matplotlib", "safetensors")
print(json.dumps({"loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_service_app_imports_without_the_engine() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=60)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert "torch" not in report["loaded"] and "fastif" not in report["loaded"]
