"""train-deeplab: DeepLabV3 trained on a synthetic labelled dataset (DatasetDDPM or DatasetGAN), tested on real images.

The data is a .npz as generate-dataset writes it (arr_0 images, arr_1 labels, arr_2 uncertainty scores)
or as DatasetGAN's (arr_0 images, arr_1 labels, arr_2 latents, arr_3 uncertainty scores). The first
--max_data samples are used, minus the --uncertainty_portion most uncertain ones (the paper's filter;
--drop_most_certain 30 filters exactly as the original code).

Training follows the original: torchvision DeepLabV3 (ResNet-101, no auxiliary head) at deeplab_res,
ImageNet normalisation, Adam lr 1e-3, batch 8, 20 epochs, cross-entropy (here ignoring ignore_label).
The original's torchvision 0.11 started the ResNet from ImageNet weights (its pretrained_backbone
default); nothing is downloaded here, so the backbone starts at random unless --backbone_weights
names a local torchvision ResNet file.
After every epoch the model is scored on validation_path; the best epoch's checkpoint is then scored on
testing_path with the interpreter's mIoU (ddpm_seg.evaluate.ConfusionMatrix), into metrics.json.

Folder: <exp_dir>/<steps_blocks>/deeplab_class_<C>_checkpoint_<max_data>_filter_out_<portion>/seed_<seed>/
    deeplab_last.pth   model, optimizer and history after the last finished epoch (a stopped run resumes here)
    deeplab_best.pth   {'model_state_dict': ...} of the best validation epoch, the original's checkpoint format
    metrics.json       test mIoU and per-class IoU of the best epoch, validation history
Each epoch's data order and dropout are functions of (seed, epoch), so a resumed run trains as an
uninterrupted one. Under torchrun each process trains on its share of every epoch with
DistributedDataParallel (--batch_size per process) and rank 0 evaluates and writes.
"""

import argparse
import sys

from ..config import load_experiment
from ..deeplab import DEEPLABS
from ..deeplab_training import DeepLabOptions, train_deeplab
from ..seeding import seed_arg
from .flags import add_fit_args, options_from_flags


def add_args(parser):
    parser.add_argument("--exp", required=True, help="experiment config, e.g. experiments/bedroom_28/datasetDDPM.json")
    parser.add_argument("--seed", type=seed_arg, default=DeepLabOptions.seed,
                        help="training seed; also picks the default data (the seed_<seed> ensemble's samples)")
    parser.add_argument("--data_path", default=DeepLabOptions.data_path,
                        help="synthetic .npz (default: samples_<H>x<W>x3.npz in <exp_dir>/<steps_blocks>/seed_<seed>)")
    parser.add_argument("--out_dir", default=DeepLabOptions.out_dir, help="override the run folder")
    parser.add_argument("--max_data", type=int, default=DeepLabOptions.max_data,
                        help="use the first N samples (0: all)")
    parser.add_argument("--uncertainty_portion", type=float, default=DeepLabOptions.uncertainty_portion,
                        help="share of the samples with the highest uncertainty score left out")
    parser.add_argument("--drop_most_certain", type=int, default=DeepLabOptions.drop_most_certain,
                        help="leave out the K most certain samples in place of K of the most uncertain ones "
                             "(as many samples remain); the original code does this with K=30")
    parser.add_argument("--backbone", choices=sorted(DEEPLABS), default=DeepLabOptions.backbone)
    parser.add_argument("--backbone_weights", default=DeepLabOptions.backbone_weights,
                        help="torchvision ResNet state dict (e.g. resnet101-63fe2227.pth) to start the backbone from; "
                             "the original's torchvision 0.11 started from these ImageNet weights. Default: random init")
    add_fit_args(parser, DeepLabOptions)
    parser.add_argument("--eval_batch_size", type=int, default=DeepLabOptions.eval_batch_size)


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg train-deeplab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    train_deeplab(load_experiment(args.exp), args.exp, options_from_flags(DeepLabOptions, args))


if __name__ == "__main__":
    main(sys.argv[1:])
