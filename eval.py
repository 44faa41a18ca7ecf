"""Evaluate and export a finished run, a Hydra app on conf/eval.yaml:
`python eval.py ckpt_path=outputs/runs/train/<time>/checkpoints/last.ckpt` (or, as before,
`python eval.py outputs/runs/train/<time> [--checkpoint best]`; `-m ckpt_path=a,b` sweeps)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from prunelab.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
