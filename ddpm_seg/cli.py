"""The `ddpm-seg` command: one subcommand per job, each a thin layer over a module's function."""

import argparse
import errno
import importlib
import sys


# command -> (module in ddpm_seg whose main(argv) runs it, one-line help). Modules are imported only
# when their command runs, so `ddpm-seg --help` stays instant.
COMMANDS = {
    "demo": ("demo", "generate the demo data, train a small DDPM and segment with its features (CPU, no downloads)"),
    "train-interpreter": ("train_interpreter", "extract features, train the pixel-classifier ensemble, evaluate mIoU"),
    "predict": ("predict", "segment new images (files, folders, globs) with a trained interpreter or DeepLab"),
    "convert-labels": ("convert_labels", "PNG masks (labels/ folder) -> <stem>.npy beside each image, the official layout"),
    "train-ddpm": ("train_ddpm", "train a guided-diffusion DDPM on a folder of unlabelled images"),
    "generate-dataset": ("generate_dataset", "DatasetDDPM: sample the DDPM, label the samples with the ensemble (.npz)"),
    "train-deeplab": ("train_deeplab", "train DeepLabV3 on a DatasetDDPM/DatasetGAN .npz, evaluate mIoU on real images"),
    "distill": ("distill", "a fast student network trained on unlabelled images that a trained interpreter labels"),
    "sweep": ("sweep", "mIoU of a light interpreter per (step, block) on cached activations: heat-map + CSV"),
    "bench": ("bench", "memory and speed benchmark: feature store, ensemble training, prediction, end to end, "
                       "diffusers backbones (--phases)"),
    "download": ("download", "fetch datasets and checkpoints with resume and checksum verification"),
    "report": ("report", "collect finished runs' metrics.json into a mean ± std table (markdown + CSV)"),
    "export": ("export", "a distilled student (or train-deeplab checkpoint) as ONNX, checked against PyTorch with "
                         "onnxruntime"),
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
    module = importlib.import_module(f"ddpm_seg.commands.{COMMANDS[args.command][0]}")
    return module.main(argv[1:]) or 0


def _close_progress_bars():
    """Bars an exception left open would otherwise be redrawn after the error line, when garbage-collected."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def entry():
    """The console script: a bad input (file, key, value, checkpoint) or an output that cannot be written is one
    line on stderr and exit code 2, not a traceback; Ctrl-C says what was saved and exits with 130."""
    from guided_diffusion.checkpoint import CheckpointError
    from ddpm_seg.files import WRITE_ERRNOS, WriteError, write_error
    from ddpm_seg.progress import Interrupted

    command = sys.argv[1] if len(sys.argv) > 1 else ""
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not valid UTF-8 is printed with its odd bytes escaped instead of stopping the run.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return main()
    except KeyboardInterrupt as e:
        _close_progress_bars()
        saved = str(e) if isinstance(e, Interrupted) else "files written so far are complete (none is left half-written)"
        print(f"ddpm-seg {command}: interrupted: {saved}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM) and not isinstance(e, WriteError):
            e = f"{e.filename or 'a file'}: permission denied; check its permissions"  # a read or a write
        elif e.errno in WRITE_ERRNOS:
            e = write_error(e)
        elif not isinstance(e, (WriteError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            raise
        _close_progress_bars()
        print(f"ddpm-seg {command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError) as e:
        _close_progress_bars()
        print(f"ddpm-seg {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
