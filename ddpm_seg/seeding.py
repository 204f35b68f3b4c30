"""Seeds: the --seed flag's type, seeds derived from keys, and seeding every generator."""

import argparse
import random

import numpy as np
import torch

def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer >= 0 (numpy's and torch's seeding refuse negative ones), so that a bad
    value is reported with the flag's name."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends only on `keys` (e.g. run seed and member, sample or step index), so a piece
    of work is reproducible whatever order or process it runs in."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# errno -> what is missing when a write fails for want of space or permission.
