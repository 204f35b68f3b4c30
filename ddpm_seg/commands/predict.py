"""predict: segment new images with a trained interpreter (--run_dir, a train-interpreter seed_<N> folder), a
student distilled from one (--run_dir, a distill folder; --onnx, the student exported to ONNX) or a
train-deeplab checkpoint (--deeplab). Students and DeepLabs need no diffusion model; their uncertainty is the
softmax entropy of their one network.

Inputs are image files, folders (searched recursively; hidden files, macOS ._* files and a folder's top-level
labels/ are skipped) and globs. Each image, of any size and mode, is segmented at its own size: features at
the experiment's resolution, logits upsampled bilinearly to the image's size before the vote. Under --out,
one folder per kind of output, each mirroring the images' paths below their input folder (or glob base), so no
input name can make one output overwrite another:
    masks/<stem>.png           palette-indexed PNG of class ids in the experiment's palette (--format png|both)
    masks/<stem>.npy           uint8 class ids (--format npy|both)
    overlays/<stem>.png        image | mask | overlay (| uncertainty), enlarged, with a legend of the class names
                               (--no_overlay: none)
    uncertainty/<stem>.png/.npy  the per-pixel uncertainty: the members' disagreement; DeepLab: softmax
                               entropy (--uncertainty); the picture's colours run from 0 to the largest
                               possible value, the same for every image
    predictions.csv            image, width, height, uncertainty score (mean of the top 10% pixels), the
                               pixel share of each class
    suggest.txt, suggest.png   with --suggest K: the K images with the highest uncertainty score, most
                               uncertain first (what to label next), and a contact sheet of them
    .predict_journal.jsonl     what is done: the model and options, then one line per image written
                               (.predict_journal.<r>.jsonl: what process r > 0 of a torchrun job did)
A lock file in --out refuses a second predict run into the same folder at once.
An unreadable input is named and skipped; the exit status is then 1, after all others are done.

A stopped run resumes: run the same command again and the images the journal lists, unchanged since (same size,
modification time and sha256) and whose outputs are still there, are not segmented again (their rows come from
the journal); so does a run over a folder that has grown. An image replaced under the same name is segmented
again. Another model (retrained members, another checkpoint: compared by content) or other output options start
afresh.

Under torchrun the inputs are shared out over the processes (gloo on CPU, NCCL on GPU, one GPU per process):
    torchrun --standalone --nproc_per_node N -m ddpm_seg.cli predict --run_dir R --input ... --out O
Each input is segmented once, by one process (input i by process i mod N). The outputs are those one process
writes: on one device type, the same number of threads per process (OMP_NUM_THREADS) gives the same float sums.
A stopped run resumes with any number of processes, and the journals of all count.
"""

import argparse

from ..prediction import PredictOptions, predict


def add_args(parser):
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run_dir", help="a train-interpreter run folder, e.g. pixel_classifiers/<ds>/ddpm/<steps_blocks>/seed_0, "
                                         "or a distill student folder")
    model.add_argument("--deeplab", help="a train-deeplab checkpoint (deeplab_best.pth)")
    model.add_argument("--onnx", help="a student exported by `ddpm-seg export` (needs the onnx extra)")
    parser.add_argument("--exp", default=PredictOptions.exp,
                        help="with --deeplab: its experiment config (default: the experiment.json train-deeplab wrote "
                             "beside the checkpoint)")
    parser.add_argument("--model_path", default=PredictOptions.model_path,
                        help="with --run_dir: the backbone checkpoint, replacing the path recorded in the run folder")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders (recursive) or globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=PredictOptions.device, help="auto | cpu | cuda[:i]")
    parser.add_argument("--batch_size", type=int, default=PredictOptions.batch_size, help="images segmented per call")
    parser.add_argument("--format", choices=["png", "npy", "both"], default=PredictOptions.mask_format,
                        help="how masks are written")
    parser.add_argument("--overlay", dest="overlay", action="store_true", default=PredictOptions.overlay,
                        help="write overlays/<stem>.png (the default)")
    parser.add_argument("--no_overlay", dest="overlay", action="store_false", help="write no overlays")
    parser.add_argument("--uncertainty", action="store_true", help="write uncertainty/<stem>.png and .npy")
    parser.add_argument("--suggest", type=int, default=PredictOptions.suggest, metavar="K",
                        help="write suggest.txt and suggest.png: the K most uncertain images, to label next")


def predict_options(args) -> PredictOptions:
    return PredictOptions(inputs=tuple(args.input), out_dir=args.out, run_dir=args.run_dir, deeplab=args.deeplab,
                          onnx=args.onnx, exp=args.exp, model_path=args.model_path, device=args.device,
                          batch_size=args.batch_size,
                          mask_format=args.format, overlay=args.overlay, uncertainty=args.uncertainty,
                          suggest=args.suggest)


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    result = predict(predict_options(parser.parse_args(argv)))
    return 1 if result["failed"] else 0
