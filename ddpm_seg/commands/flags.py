"""What more than one command needs of its flags (a command imports no other command, so it lives here): flag
groups, and turning parsed flags into an engine's options."""

import dataclasses

from guided_diffusion.checkpoint import read_model_flags
from guided_diffusion.script_util import args_to_dict, model_and_diffusion_defaults

from ..backbones import EXTRACT_DTYPES, MAX_EXTRACT_BATCH, backbone
from ..training import AUTOCAST, STORE_DTYPES, TrainOptions


def add_extraction_args(parser):
    """--extract_dtype and --extract_batch of the backbone's forward (train-interpreter, sweep, generate-dataset)."""
    parser.add_argument("--extract_dtype", choices=["auto"] + sorted(EXTRACT_DTYPES),
                        default=TrainOptions.extract_dtype,
                        help="precision of the backbone's forward; auto: bf16 on CPUs with native bf16 (AMX, "
                             "AVX512-BF16), fp16 on CUDA when --use_fp16, else fp32")
    parser.add_argument("--extract_batch", type=int, default=TrainOptions.extract_batch,
                        help="images per backbone forward (default: 1 on CPU; on CUDA as many as a quarter of the "
                             f"free memory holds, at most {MAX_EXTRACT_BATCH['cuda']})")


def add_precision_args(parser):
    """--autocast and --store_dtype of the ensemble's training (train-interpreter, sweep)."""
    parser.add_argument("--autocast", choices=["auto"] + sorted(AUTOCAST), default=TrainOptions.autocast,
                        help="bf16: the first layer of the ensemble (nearly all its FLOPs) multiplies in bfloat16 "
                             "with float32 accumulation, ~4x faster on CPUs with AMX; none: float32 throughout; "
                             "auto: bf16 on CUDA and on CPUs with native bf16, else none")
    parser.add_argument("--store_dtype", choices=["auto"] + sorted(STORE_DTYPES), default=TrainOptions.store_dtype,
                        help="dtype of the training feature store; auto: bfloat16 under --autocast bf16 (the "
                             "features are rounded to bfloat16 before the matmul anyway), else float16")


def add_fit_args(parser, options):
    """The training flags of a segmentation network (deeplab_training.fit), with the defaults of `options`, an
    engine's options class (train-deeplab, distill)."""
    parser.add_argument("--learning_rate", type=float, default=options.learning_rate, help="Adam's learning rate")
    parser.add_argument("--batch_size", type=int, default=options.batch_size, help="images per step, per process")
    parser.add_argument("--num_epoch", type=int, default=options.num_epoch)
    parser.add_argument("--num_workers", type=int, default=options.num_workers, help="DataLoader worker processes")
    parser.add_argument("--device", default=options.device, help="auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)")


def options_from_flags(options_class, args, **given):
    """An engine's frozen options dataclass from the parsed flags of the same names; `given` sets the fields
    whose flag is named or shaped otherwise."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(options_class) if hasattr(args, f.name)}
    return options_class(**{**flags, **given})


def explicit_flags(argv):
    """Model flags named on the command line (as --flag value or --flag=value)."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return given & set(model_and_diffusion_defaults())


def resolve_model_flags(cfg, args, argv):
    """The UNet flags of a command that takes them: flags saved beside a checkpoint of ours win over defaults;
    flags typed on the command line (argv) win over both."""
    cli = args_to_dict(args, model_and_diffusion_defaults().keys())
    saved = read_model_flags(cfg.model_path) if backbone(cfg.model_type).model_flags else None
    if saved is None:
        return cli
    return {**cli, **saved, **{k: cli[k] for k in explicit_flags(argv)}}
