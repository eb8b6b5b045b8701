"""Build the documentation site as ``make docs`` does (strict), for the docs tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_site(out: Path) -> Path:
    """``mkdocs build --strict`` into ``out``; skips when the docs tools are not installed.

    Raises:
        AssertionError: the build failed (its output in the message).
    """
    missing = [m for m in ("mkdocs", "material", "pymdownx") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"documentation tools not installed ({', '.join(missing)}): "
                    "pip install -e '.[docs]' (make test installs them)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out
