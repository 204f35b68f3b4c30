"""The options every benchmark phase reads: `ddpm-seg bench`'s flags, typed, once the ones that depend on others
(n, batch) are resolved. The flags' defaults live with the flags."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BenchOptions:
    n: int  # training images of the synthetic phases (store, train, predict, quality)
    test_n: int  # e2e: test images
    extract_dtype: str  # e2e: train-interpreter's --extract_dtype
    extract_batch: Optional[int]  # e2e: train-interpreter's --extract_batch (None: its own)
    orig_n: int  # images the original's store is measured at (its N-image figures are computed)
    members: int  # ensemble members
    train_steps: int  # timed training steps per approach
    threads: int  # torch threads of every measured process
    phases: list  # the phases to run, in PHASES order
    store: str  # ram | disk: where our store keeps its maps
    batch: int  # our pixels per member per step (synthetic phases)
    device: str  # e2e: train-interpreter's --device
    recipe: str  # e2e: train-interpreter's --recipe
    projection_width: int  # train, quality: principal directions per resolution (0: all features)
    fp32: bool  # our first-layer matmuls in float32 even where the CPU has native bfloat16
    classes: int  # classes of the synthetic task
    predict_runs: int  # timed predictions (median reported); students: timed images per model
    quality_n: int  # training images of the quality check
    quality_test: int  # held-out images of the quality check
    quality_epochs: float  # passes over the training pixels per member in the quality check
    archs: list  # diffusers: the UNet sizes measured
    dtypes: list  # diffusers, backbones: the dtypes measured
    size: int  # diffusers: image side in pixels
    steps: list  # diffusers: diffusion steps, one forward of all of them per image
    images: int  # diffusers, backbones: timed images per model and dtype
    warmup: int  # diffusers, backbones, students: untimed images before the timed ones
    students: list  # students: the deeplab.NETWORKS networks timed beside the demo interpreter
    configs: list  # backbones: the experiment configs whose backbones are timed
    inversion_steps: int  # backbones: projector steps of a GAN Inversion config
    student_res: int  # students: their input size
    seed: int
    small: bool  # a tiny layout (e2e: a tiny UNet on 32x32 images)
    quiet: bool  # only the table (and the diffusers phase's summary)
    json: Optional[str]  # also write the results to this JSON file
    e2e_n: int  # e2e: training images (--n, or the e2e layout's)
    e2e_batch: Optional[int]  # e2e: train-interpreter's --batch_size (None: its own default)
