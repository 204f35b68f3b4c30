"""distill: a fast student network from unlabelled images, labelled by a trained interpreter.

The interpreter in --run_dir (a train-interpreter seed_<N> folder) segments every image of --images (files,
folders searched recursively, globs; in its test views when its config has them) into the labels folder
(default <out>/labels, as predict writes it: masks/<stem>.png, predictions.csv with each image's uncertainty
score). The paper's filter then leaves out the --uncertainty_portion most uncertain images (0: keep all), and a
student network learns the rest at --resolution (default: the config's deeplab_res, else its resolution
enlarged up to 8x, to at most 256): Adam, cross-entropy, --num_epoch epochs. With validation images (--validation_path,
or the config's validation_path) the best epoch is kept, else the last. The student is then tested on the
config's test images as the interpreter was, beside the interpreter's own mIoU.

Students: lraspp_mobilenet_v3 (3.2 M parameters, the lightest), deeplabv3_mobilenet_v3 (11 M),
deeplabv3_resnet50 (40 M) and deeplabv3_resnet101 (59 M, the paper's DatasetDDPM network). They start at
random unless --backbone_weights names a local torchvision classification state dict (e.g.
mobilenet_v3_large-8738ca79.pth, resnet101-63fe2227.pth); nothing is downloaded.

Student folder (--out):
    student.pth        {'model_state_dict', 'architecture', 'resolution'}: `ddpm-seg predict --run_dir <out>`
                       segments with it, `ddpm-seg export --run_dir <out> --onnx F` exports it
    experiment.json    the interpreter's experiment (class names, palette)
    metrics.json       test mIoU and per-class IoU, the interpreter's mIoU, images labelled and kept, timings
    settings.json      what the student depends on (the interpreter and the images by content, the options)
    student_last.pth   training state after the last finished epoch; student_best.pth the best epoch's weights
    labels/            the interpreter's labels (unless --labels_dir)

A stopped run resumes: labelling image by image (predict's journal), training after its last finished epoch,
and gives the same student as an uninterrupted run. --labels_dir lets several students (other networks,
--max_images, filters) share one labelling. Under `torchrun --standalone --nproc_per_node N -m ddpm_seg.cli
distill ...` the labelling is split over the processes (each image once) and the student trains with
DistributedDataParallel (--batch_size per process; gloo on CPU, NCCL on GPU).
"""

import argparse

from ..deeplab import NETWORKS
from ..distillation import DistillOptions, distill
from ..seeding import seed_arg
from .flags import add_fit_args, options_from_flags


def add_args(parser):
    parser.add_argument("--run_dir", required=True,
                        help="the trained interpreter, e.g. pixel_classifiers/<ds>/ddpm/<steps_blocks>/seed_0")
    parser.add_argument("--images", nargs="+", required=True, help="unlabelled image files, folders (recursive) or globs")
    parser.add_argument("--out", dest="out_dir", required=True, help="the student folder")
    parser.add_argument("--labels_dir", default=DistillOptions.labels_dir,
                        help="where the interpreter's labels go (default <out>/labels); students may share one")
    parser.add_argument("--model_path", default=DistillOptions.model_path,
                        help="the backbone checkpoint, replacing the path recorded in the run folder")
    parser.add_argument("--student", choices=list(NETWORKS), default=DistillOptions.student)
    parser.add_argument("--resolution", type=int, default=DistillOptions.resolution,
                        help="the student's input size (0: the config's deeplab_res, else its resolution enlarged up to "
                             "8x, to at most 256)")
    parser.add_argument("--backbone_weights", default=DistillOptions.backbone_weights,
                        help="torchvision classification state dict to start the student's backbone from")
    parser.add_argument("--max_images", type=int, default=DistillOptions.max_images,
                        help="label and learn from the first N images (0: all)")
    parser.add_argument("--uncertainty_portion", type=float, default=DistillOptions.uncertainty_portion,
                        help="share of the labelled images with the highest uncertainty score left out (0: none)")
    parser.add_argument("--validation_path", default=DistillOptions.validation_path,
                        help="labelled images to pick the best epoch (default: the config's validation_path)")
    parser.add_argument("--seed", type=seed_arg, default=DistillOptions.seed)
    add_fit_args(parser, DistillOptions)
    parser.add_argument("--label_batch_size", type=int, default=DistillOptions.label_batch_size,
                        help="images per interpreter call while labelling")


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    distill(options_from_flags(DistillOptions, args, images=tuple(args.images)))
