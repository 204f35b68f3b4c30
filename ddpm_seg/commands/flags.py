"""Flag groups that more than one command takes (a command imports no other command, so they live here)."""

from ..training import AUTOCAST, STORE_DTYPES, TrainOptions


def add_precision_args(parser):
    """--autocast and --store_dtype of the ensemble's training (train-interpreter, sweep)."""
    parser.add_argument("--autocast", choices=["auto"] + sorted(AUTOCAST), default=TrainOptions.autocast,
                        help="bf16: the first layer of the ensemble (nearly all its FLOPs) multiplies in bfloat16 "
                             "with float32 accumulation, ~4x faster on CPUs with AMX; none: float32 throughout; "
                             "auto: bf16 on CUDA and on CPUs with native bf16, else none")
    parser.add_argument("--store_dtype", choices=["auto"] + sorted(STORE_DTYPES), default=TrainOptions.store_dtype,
                        help="dtype of the training feature store; auto: bfloat16 under --autocast bf16 (the "
                             "features are rounded to bfloat16 before the matmul anyway), else float16")
