"""Write tests/fixtures/golden_upstream.pt: small reference outputs computed by the public upstream code.

Needs checkouts of openai/guided-diffusion and yandex-research/ddpm-segmentation:

    .venv/bin/python scripts/golden/make_golden.py \
        --guided_diffusion /path/to/guided-diffusion --ddpm_segmentation /path/to/ddpm-segmentation

Upstream ddpm-segmentation imports the UNet as `guided_diffusion.guided_diffusion` (guided-diffusion checked
out as a submodule). This script registers a `guided_diffusion` package whose path is the guided-diffusion
checkout before anything else is imported, so the package of this repository (also named `guided_diffusion`)
is never loaded; it checks that at the end. mpi4py and cv2 are imported by upstream modules but not used on
the code paths run here; they are replaced by stubs.

With seeded random weights, the fixture records (all tensors float32 on CPU unless noted):
  flags        the guided-diffusion flags of a tiny UNet shaped like the paper's LSUN models
  unet         its state_dict, an input x [2, 3, 16, 16], integer timesteps t [2] and UNet(x, t)
  extract      two uint8 images [2, 16, 16, 3], the experiment settings (steps, blocks, dim, upsample_mode,
               seed), the shared noise train_interpreter.py draws, the activations FeatureExtractorDDPM
               returns for each image (step-major lists of [C, h, w]) and collect_features' [dim, H, W]
  classifiers  for 29 classes (hidden 128/32) and 30 classes (hidden 256/128): a pixel_classifier
               member saved as train_interpreter.py saves `model_{i}.pth` ({'model_state_dict':
               DataParallel state_dict}), seeded input features, its logits in eval mode, its logits and
               updated batch-norm statistics after one forward in train mode; for 29 classes (dim = the extracted
               feature size) also its per-pixel logits on each image's collected features, as
               train_interpreter.py's evaluation computes them.
"""

import argparse
import copy
import importlib
import math
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "golden_upstream.pt")

SEED = 0
# The paper's LSUN flags (--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000
# --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256
# --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True
# --use_scale_shift_norm True), scaled down so that the fixture stays small: 16x16 images, 32 channels
# at both of two levels, one res block per level, attention at both levels, heads of 16 channels (two
# heads per attention layer, so the head split is exercised), float32 on CPU.
FLAGS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1", attention_resolutions="16,8",
    num_head_channels=16, class_cond=False, learn_sigma=True, diffusion_steps=1000, noise_schedule="linear",
    dropout=0.1, resblock_updown=True, use_scale_shift_norm=True, use_fp16=False,
)
# As experiments/*/ddpm.json, scaled down: dim[:2] is the image size, dim[2] = steps x blocks x 32 channels.
# Output block 0 is at 8x8 (upsampled bilinearly to 16x16 by collect_features), block 1 ends with the
# up-sampling res block (16x16).
EXPERIMENT = dict(model_type="ddpm", dim=[16, 16, 128], steps=[50, 250], blocks=[0, 1], upsample_mode="bilinear",
                  share_noise=True, input_activations=False, seed=7)
UNET_TIMESTEPS = [10, 500]
CLASSIFIERS = {"c29": dict(number_class=29, dim=EXPERIMENT["dim"][-1], pixels=64),
               "c30": dict(number_class=30, dim=8, pixels=64)}


def load_upstream(gd_root, ds_root):
    """Import upstream modules: returns (script_util, dist_util, feature_extractors, pixel_classifier,
    datasets) as ddpm-segmentation imports them."""
    if not os.path.isfile(os.path.join(gd_root, "guided_diffusion", "unet.py")):
        raise SystemExit(f"--guided_diffusion {gd_root!r}: no guided_diffusion/unet.py inside")
    if not os.path.isfile(os.path.join(ds_root, "src", "feature_extractors.py")):
        raise SystemExit(f"--ddpm_segmentation {ds_root!r}: no src/feature_extractors.py inside")
    for name in list(sys.modules):
        if name == "guided_diffusion" or name.startswith("guided_diffusion.") or name == "src" or name.startswith("src."):
            raise SystemExit(f"module {name} is already imported; run this script in a fresh interpreter")

    # ddpm-segmentation's submodule layout: `guided_diffusion` is the guided-diffusion checkout, whose
    # `guided_diffusion/` folder is the package. Registered directly in sys.modules, so no other
    # `guided_diffusion` on sys.path or installed in editable mode can be picked up instead.
    outer = types.ModuleType("guided_diffusion")
    outer.__path__ = [os.path.abspath(gd_root)]
    sys.modules["guided_diffusion"] = outer

    # Stubs for imports the code paths used here never call into (MPI: a single rank 0).
    class _Comm:
        rank, size = 0, 1

        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def bcast(self, value, root=0):
            return value

    mpi4py = types.ModuleType("mpi4py")
    mpi4py.MPI = types.SimpleNamespace(COMM_WORLD=_Comm())
    sys.modules["mpi4py"] = mpi4py
    sys.modules["mpi4py.MPI"] = mpi4py.MPI
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))

    sys.path.insert(0, os.path.abspath(ds_root))
    modules = [importlib.import_module(name) for name in (
        "guided_diffusion.guided_diffusion.script_util", "guided_diffusion.guided_diffusion.dist_util",
        "src.feature_extractors", "src.pixel_classifier", "src.datasets")]
    return modules


def check_sources(gd_root, ds_root):
    """Every imported `guided_diffusion` / `src` module comes from the upstream checkouts."""
    roots = {"guided_diffusion": os.path.realpath(gd_root), "src": os.path.realpath(ds_root)}
    for name, module in sorted(sys.modules.items()):
        top = name.split(".")[0]
        if top in roots and getattr(module, "__file__", None):
            if not os.path.realpath(module.__file__).startswith(roots[top] + os.sep):
                raise SystemExit(f"{name} was imported from {module.__file__}, not from {roots[top]}")


def commit_of(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def randomize_unet(model, generator):
    """Replace every parameter by seeded random values. The upstream init zeroes each res block's last
    convolution, each attention projection and the output convolution, which would make those layers
    invisible to a comparison; here weights are N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.dim() > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


@torch.no_grad()
def randomize_classifier(classifier, generator):
    """pixel_classifier.init_weights() (Linear weights N(0, 0.02), biases 0), then seeded non-trivial biases
    and batch-norm parameters and statistics, so that every tensor of the member affects its logits."""
    classifier.init_weights()
    for module in classifier.modules():
        if isinstance(module, nn.Linear):
            module.weight.mul_(1 / (0.02 * math.sqrt(module.in_features)))  # N(0, 1/fan_in): logits of order 1
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        elif isinstance(module, nn.BatchNorm1d):
            n = module.num_features
            module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
            module.bias.copy_(0.2 * torch.randn(n, generator=generator))
            module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))


def clone_state(state_dict):
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guided_diffusion", required=True, help="checkout of openai/guided-diffusion")
    parser.add_argument("--ddpm_segmentation", required=True, help="checkout of yandex-research/ddpm-segmentation")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"fixture to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    script_util, dist_util, feature_extractors, pixel_classifier_mod, datasets = load_upstream(
        args.guided_diffusion, args.ddpm_segmentation)
    from PIL import Image

    # ---- a. the UNet ----
    flags = {**script_util.model_and_diffusion_defaults(), **FLAGS}
    torch.manual_seed(SEED)
    model, _ = script_util.create_model_and_diffusion(**flags)
    randomize_unet(model, torch.Generator().manual_seed(SEED))
    model.eval()
    state_dict = clone_state(model.state_dict())
    gen = torch.Generator().manual_seed(SEED + 1)
    size = FLAGS["image_size"]
    x = torch.randn(2, 3, size, size, generator=gen)
    t = torch.tensor(UNET_TIMESTEPS)
    with torch.no_grad():
        out = model(x, t)

    # ---- b. features, as train_interpreter.py's prepare_data/evaluation compute them ----
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = os.path.join(tmp, "model.pt")
        torch.save(state_dict, ckpt_path)  # a plain state_dict, as the released DDPM checkpoints
        opts = {**flags, **EXPERIMENT, "model_path": ckpt_path, "image_size": EXPERIMENT["dim"][0],
                "category": "bedroom_28", "number_class": CLASSIFIERS["c29"]["number_class"]}
        extractor = feature_extractors.create_feature_extractor(**opts)
    rnd_gen = torch.Generator(device=dist_util.dev()).manual_seed(opts["seed"])
    noise = torch.randn(1, 3, opts["image_size"], opts["image_size"], generator=rnd_gen, device=dist_util.dev())
    images = torch.randint(0, 256, (2, size, size, 3), generator=gen, dtype=torch.uint8)
    transform = datasets.make_transform(opts["model_type"], opts["image_size"])
    activations, features = [], []
    for image in images:
        img = transform(Image.fromarray(image.numpy()))[None].to(dist_util.dev())
        acts = extractor(img, noise=noise)
        activations.append([a[0].clone() for a in acts])
        features.append(feature_extractors.collect_features(opts, acts).cpu())
    features = torch.stack(features)

    # ---- c. pixel classifiers ----
    classifiers = {}
    for key, spec in CLASSIFIERS.items():
        gen_c = torch.Generator().manual_seed(SEED + 100 + spec["number_class"])
        torch.manual_seed(SEED + 100 + spec["number_class"])
        classifier = pixel_classifier_mod.pixel_classifier(numpy_class=spec["number_class"], dim=spec["dim"])
        randomize_classifier(classifier, gen_c)
        # train_interpreter.py saves nn.DataParallel(classifier).state_dict() as {'model_state_dict': ...}.
        checkpoint = {"model_state_dict": clone_state(nn.DataParallel(classifier).state_dict())}
        feats = torch.randn(spec["pixels"], spec["dim"], generator=gen_c)
        entry = {"number_class": spec["number_class"], "dim": spec["dim"], "checkpoint": checkpoint,
                 "features": feats}
        # Logits as load_ensemble() + predict_labels() compute them: the member in eval mode.
        loaded = pixel_classifier_mod.pixel_classifier(spec["number_class"], spec["dim"])
        wrapped = nn.DataParallel(loaded)
        wrapped.load_state_dict(checkpoint["model_state_dict"])
        loaded = wrapped.module.eval()
        with torch.no_grad():
            entry["logits_eval"] = loaded(feats)
        # One training-mode forward: batch statistics, and the running statistics it updates.
        training = copy.deepcopy(loaded).train()
        with torch.no_grad():
            entry["logits_train"] = training(feats)
        entry["stats_after_train"] = {k: v.clone() for k, v in training.state_dict().items()
                                      if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        if spec["dim"] == EXPERIMENT["dim"][-1]:
            # train_interpreter.py evaluation(): per-pixel rows of the collected features.
            with torch.no_grad():
                entry["pixel_logits"] = torch.stack(
                    [loaded(f.view(EXPERIMENT["dim"][-1], -1).permute(1, 0)) for f in features])
        classifiers[key] = entry

    check_sources(args.guided_diffusion, args.ddpm_segmentation)
    fixture = {
        "source": {"guided_diffusion_commit": commit_of(args.guided_diffusion),
                   "ddpm_segmentation_commit": commit_of(args.ddpm_segmentation),
                   "torch_version": str(torch.__version__)},
        "flags": dict(FLAGS),
        "unet": {"state_dict": state_dict, "x": x, "t": t, "out": out.detach().clone()},
        "extract": {"experiment": {k: (list(v) if isinstance(v, list) else v) for k, v in EXPERIMENT.items()},
                    "images": images, "noise": noise.cpu(), "activations": activations, "features": features},
        "classifiers": classifiers,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
