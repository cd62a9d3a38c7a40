"""pytest setup for the PyTorch reference tests: import path and a single CPU thread.

The tests import `model`, `modelio` and `corpus` from <repo>/train, the eval tool's package
`polysketch_eval` from <repo>/clients/python (its gRPC layer needs generated stubs, which these
tests do not), and the shared builders from `helpers.py` next to this file. One thread keeps the
suite polite on a shared machine and makes float64 reductions run the same way every time.
"""
import sys
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent.parent.parent
TRAIN_DIR = REPO_DIR / "train"
CLIENTS_PYTHON_DIR = REPO_DIR / "clients" / "python"
for _path in (CLIENTS_PYTHON_DIR, TRAIN_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

torch.set_num_threads(1)
