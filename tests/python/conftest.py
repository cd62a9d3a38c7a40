"""pytest setup for the PyTorch reference tests: import path and a single CPU thread.

The tests import `model`, `modelio` and `corpus` from <repo>/train, and the shared builders from
`helpers.py` next to this file. One thread keeps the suite polite on a shared machine and makes
float64 reductions run the same way every time.
"""
import sys
from pathlib import Path

import torch

TRAIN_DIR = Path(__file__).resolve().parent.parent.parent / "train"
if str(TRAIN_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_DIR))

torch.set_num_threads(1)
