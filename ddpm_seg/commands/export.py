"""export: a distilled student (--run_dir, the folder `ddpm-seg distill` wrote) or a train-deeplab checkpoint
(--deeplab) as one ONNX file that segments on its own with onnxruntime, no PyTorch needed.

The file takes "image": float32 [N, 3, R, R] (any batch size N; the image resized to the network's resolution
R and ImageNet-normalised) and gives "logits": [N, C, R, R]. Its metadata holds the experiment config (class
names, palette), the architecture and R; ddpm_seg.onnx_export.OnnxSegmenter.load(file) segments images of any
size with it, as predict does with the PyTorch network.

The file is then checked with onnxruntime against PyTorch on --check_images (default: the experiment's
testing_path images, else 4 random-noise images): one line gives the images, the pixels whose labels differ
and the largest |logit difference|. The exit status is 1 (the file is written all the same) when any label
differs. Needs the onnx extra: pip install -c constraints.txt -e '.[onnx]'
"""

import argparse

from ..deeplab import NetworkSegmenter
from ..onnx_export import OnnxSegmenter, check_export, check_images, export_onnx


def add_args(parser):
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run_dir", help="a student folder written by ddpm-seg distill (student.pth, experiment.json)")
    model.add_argument("--deeplab", help="a train-deeplab checkpoint (deeplab_best.pth)")
    parser.add_argument("--exp", help="with --deeplab: its experiment config (default: the experiment.json "
                                      "train-deeplab wrote beside the checkpoint)")
    parser.add_argument("--onnx", required=True, help="the ONNX file to write, e.g. student.onnx")
    parser.add_argument("--check_images", nargs="+", default=(), metavar="DIR_OR_FILE",
                        help="image files and folders (recursive) to check the file on (default: the experiment's "
                             "testing_path images, else 4 random-noise images)")


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    if args.exp and not args.deeplab:
        parser.error("--exp goes with --deeplab (a student folder holds its own experiment.json)")
    if args.deeplab:
        segmenter = NetworkSegmenter.load_deeplab(args.deeplab, args.exp)
    else:
        segmenter = NetworkSegmenter.load_student(args.run_dir)
    # Read before the export, so an unreadable image is reported before anything is written.
    images, note = check_images(segmenter, args.check_images)
    export_onnx(segmenter, args.onnx)
    result = check_export(segmenter, OnnxSegmenter.load(args.onnx), images)
    if note:
        print(note)
    checked = f"{result['images']} image" + ("s" if result["images"] != 1 else "")
    print(f"{args.onnx}: {segmenter.architecture}, {segmenter.resolution[0]}x{segmenter.resolution[1]} input; "
          f"onnxruntime vs PyTorch on {checked}: {result['pixels_differing']} differing pixels, "
          f"max |logit diff| {result['max_abs_logit_diff']:.3g}")
    return 1 if result["pixels_differing"] else 0
