"""Evaluate and export a finished run: `python eval.py outputs/runs/train/<time>`."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from prunelab.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
