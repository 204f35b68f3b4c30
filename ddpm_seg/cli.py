"""The `ddpm-seg` command: one subcommand per job, each a thin layer over a module's function."""

import argparse
import importlib
import sys


# command -> (module in ddpm_seg whose main(argv) runs it, one-line help). Modules are imported only
# when their command runs, so `ddpm-seg --help` stays instant.
COMMANDS = {
    "demo": ("demo", "generate the demo data, train a small DDPM and segment with its features (CPU, no downloads)"),
    "train-interpreter": ("train_interpreter", "extract features, train the pixel-classifier ensemble, evaluate mIoU"),
    "train-ddpm": ("train_ddpm", "train a guided-diffusion DDPM on a folder of unlabelled images"),
    "generate-dataset": ("generate_dataset", "DatasetDDPM: sample the DDPM, label the samples with the ensemble (.npz)"),
    "train-deeplab": ("train_deeplab", "train DeepLabV3 on a DatasetDDPM/DatasetGAN .npz, evaluate mIoU on real images"),
    "sweep": ("sweep", "mIoU of a light interpreter per (step, block) on cached activations: heat-map + CSV"),
    "bench": ("bench", "memory and speed benchmark of the feature store, ensemble training and prediction"),
    "bench-diffusers": ("bench_diffusers", "feature sizes and extraction time of SD-1.5- and SDXL-sized random UNets"),
    "download": ("download", "fetch datasets and checkpoints with resume and checksum verification"),
    "report": ("report", "collect finished runs' metrics.json into a mean ± std table (markdown + CSV)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="ddpm-seg",
        description="Label-efficient semantic segmentation with diffusion-model features.",
        epilog="Run `ddpm-seg <command> --help` for a command's options.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command",
                        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(f"ddpm_seg.{COMMANDS[args.command][0]}")
    return module.main(argv[1:]) or 0


def entry():
    """The console script: a bad input (file, key, value, checkpoint) is one line on stderr, not a traceback."""
    from guided_diffusion.checkpoint import CheckpointError

    try:
        return main()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        print(f"ddpm-seg {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
