"""The `ddpm-seg` command: one subcommand per job, each a thin layer over a module's function."""

import argparse
import sys


def _train_interpreter(argv):
    from .train_interpreter import main

    return main(argv)


def _train_ddpm(argv):
    from .train_ddpm import add_train_ddpm_args, train_ddpm

    parser = argparse.ArgumentParser(prog="ddpm-seg train-ddpm", description="Train a DDPM on a folder of images.")
    add_train_ddpm_args(parser)
    train_ddpm(parser.parse_args(argv))


def _bench(argv):
    from .bench import main

    return main(argv)


def _demo(argv):
    from .demo import main

    return main(argv)


COMMANDS = {
    "demo": (_demo, "generate the demo data, train a small DDPM and segment with its features (CPU, no downloads)"),
    "train-interpreter": (_train_interpreter, "extract features, train the pixel-classifier ensemble, evaluate mIoU"),
    "train-ddpm": (_train_ddpm, "train a guided-diffusion DDPM on a folder of unlabelled images"),
    "bench": (_bench, "memory and speed benchmark of the feature store, ensemble training and prediction"),
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
    args, rest = parser.parse_known_args(argv[:1])
    return COMMANDS[args.command][0](argv[1:] + rest) or 0


if __name__ == "__main__":
    sys.exit(main())
