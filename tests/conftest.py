"""Shared test set-up.

The benchmarks in ``benchmarks/`` are scripts run from the repository, not part of the package; their modules
import each other by bare name (``import common``), as they do when run as ``python benchmarks/overhead.py``.
Putting the folder on ``sys.path`` here lets the tests import them the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"

if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
