import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The facts the checkpoint-compatibility tests compare against live beside the repo (../shared/reference).
REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")

# One intra-op thread: the tests use small tensors, and OpenMP threads that spin on a busy 2-core
# machine make small ops up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture
def reference_dir():
    if not os.path.isdir(REFERENCE_DIR):
        pytest.fail(f"reference facts not found at {REFERENCE_DIR} (expected ../shared/reference beside the repo)")
    return REFERENCE_DIR
