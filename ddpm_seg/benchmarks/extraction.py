"""Feature extraction on the e2e phase's UNet: its layout (bedroom_28's experiment with the paper's 256x256
guided-diffusion UNet, or --small's tiny one), the features per pixel it gives, and the original's extraction
cost per image and step (one full float32 forward at random weights, as the original runs one per step)."""

import argparse

import torch

from guided_diffusion.script_util import (add_dict_to_argparser, args_to_dict, create_model_and_diffusion,
                                          model_and_diffusion_defaults)

from .harness import timed_runs

# The paper's MODEL_FLAGS for the LSUN 256x256 checkpoints (scripts/ddpm/train_interpreter.sh).
PAPER_MODEL_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
                     "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                     "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                     "--use_scale_shift_norm True").split()
# bedroom_28's experiment: its steps, blocks, classes, image size and split sizes.
E2E = dict(flags=PAPER_MODEL_FLAGS, image=256, steps=[50, 150, 250], blocks=[5, 6, 7, 8, 12], classes=29,
           n=40, test_n=20)
# --small: a tiny UNet on 32x32 scenes, for tests.
E2E_SMALL = dict(flags=("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
                        "--num_head_channels 16 --learn_sigma True --diffusion_steps 100").split(),
                 image=32, steps=[10, 30], blocks=[2, 5], classes=29, n=40, test_n=20)


def e2e_layout(opts):
    return E2E_SMALL if opts.small else E2E


def unet_flags(opts):
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return args_to_dict(parser.parse_args(e2e_layout(opts)["flags"]), model_and_diffusion_defaults().keys())


def random_unet(opts):
    """The e2e UNet at random weights, float32, as --random_init builds it (seeded)."""
    torch.manual_seed(opts.seed)
    model, diffusion = create_model_and_diffusion(**{**unet_flags(opts), "use_fp16": False})
    return model.eval(), diffusion


def e2e_features(opts):
    """Features per pixel of the e2e layout: every read block's output channels, at every step."""
    layout = e2e_layout(opts)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**{**unet_flags(opts), "use_fp16": False})
    return len(layout["steps"]) * sum(model.output_blocks[b][0].out_channels for b in layout["blocks"])


def job_e2e_original_forward(opts):
    """The original's extraction cost per image and step: one full forward of the float32 UNet on one image
    at one step (it runs a forward per step), timed after one untimed forward; median of --predict-runs."""
    layout = e2e_layout(opts)
    model, diffusion = random_unet(opts)
    image = torch.rand(1, 3, layout["image"], layout["image"]) * 2 - 1
    t = torch.tensor([layout["steps"][0]])
    x_t = diffusion.q_sample(image, t, noise=torch.randn_like(image))
    with torch.no_grad():
        model(x_t, t)
        return timed_runs(opts.predict_runs, lambda: model(x_t, t)[0, 0])
