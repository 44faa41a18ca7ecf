"""Train one model (or a sweep with -m): `python train.py pruning=dynamic sparsity=0.9`."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from prunelab.train import main  # noqa: E402

if __name__ == "__main__":
    main()
