"""`ddpm-seg train-interpreter` run from a test on an experiment dict, as a user runs it."""

import json
from pathlib import Path

from ddpm_seg.cli import main as cli_main
from ddpm_seg.config import run_dir, validate_experiment


def train_interpreter(cfg: dict, exp_path, *flags) -> tuple:
    """Write `cfg` to exp_path and run train-interpreter on it on the CPU without pictures, with `flags`:
    (the run folder, its metrics)."""
    Path(exp_path).write_text(json.dumps(cfg))
    cli_main(["train-interpreter", "--exp", str(exp_path), "--device", "cpu", "--no_pictures", *flags])
    folder = Path(run_dir(validate_experiment(cfg), 0, "--random_init" in flags))
    return folder, json.loads((folder / "metrics.json").read_text())
