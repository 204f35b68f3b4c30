"""Build a UNet and a diffusion from guided-diffusion's command-line flags (same names and meanings)."""
import argparse

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

NUM_CLASSES = 1000

# Channel multipliers per level used when channel_mult is "" (ADM's choices; 32 and 16 follow
# the improved-diffusion lineage for small images).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}


def diffusion_defaults():
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def model_and_diffusion_defaults():
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(**flags):
    """(UNetModel, SpacedDiffusion) from flags named as in model_and_diffusion_defaults(); missing ones default."""
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model/diffusion flags {unknown}; expected a subset of {sorted(defaults)}")
    opts = {**defaults, **flags}
    model = create_model(
        opts["image_size"],
        opts["num_channels"],
        opts["num_res_blocks"],
        channel_mult=opts["channel_mult"],
        learn_sigma=opts["learn_sigma"],
        class_cond=opts["class_cond"],
        use_checkpoint=opts["use_checkpoint"],
        attention_resolutions=opts["attention_resolutions"],
        num_heads=opts["num_heads"],
        num_head_channels=opts["num_head_channels"],
        num_heads_upsample=opts["num_heads_upsample"],
        use_scale_shift_norm=opts["use_scale_shift_norm"],
        dropout=opts["dropout"],
        resblock_updown=opts["resblock_updown"],
        use_fp16=opts["use_fp16"],
        use_new_attention_order=opts["use_new_attention_order"],
    )
    diffusion = create_gaussian_diffusion(
        steps=opts["diffusion_steps"],
        learn_sigma=opts["learn_sigma"],
        noise_schedule=opts["noise_schedule"],
        use_kl=opts["use_kl"],
        predict_xstart=opts["predict_xstart"],
        rescale_timesteps=opts["rescale_timesteps"],
        rescale_learned_sigmas=opts["rescale_learned_sigmas"],
        timestep_respacing=opts["timestep_respacing"],
    )
    return model, diffusion


def _parse_channel_mult(channel_mult, image_size):
    if channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {image_size} (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult explicitly, e.g. '1,2,2,4'"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        try:
            mults = [float(m) for m in channel_mult.split(",")]
        except ValueError:
            raise ValueError(
                f"channel_mult must be a comma list of numbers like '1,1,2,2,4,4', got {channel_mult!r}"
            ) from None
    else:
        mults = list(channel_mult)
    # Whole multipliers stay ints, so the tuple reads like the official one.
    return tuple(int(m) if float(m).is_integer() else m for m in mults)


def _attention_downsample_rates(attention_resolutions, image_size):
    """Resolutions like "32,16,8" -> the downsample rates (image_size // res) that UNetModel expects."""
    rates = []
    for part in attention_resolutions.split(","):
        try:
            res = int(part)
        except ValueError:
            raise ValueError(
                f"attention_resolutions must be a comma list of ints like '32,16,8', got {attention_resolutions!r}"
            ) from None
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image_size {image_size}")
        rates.append(image_size // res)
    return tuple(rates)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
):
    """A UNetModel for 3-channel images; attention_resolutions are resolutions, e.g. "32,16,8"."""
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_downsample_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=_parse_channel_mult(channel_mult, image_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """A SpacedDiffusion; timestep_respacing "" keeps all `steps` steps."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser, default_dict):
    """Add a --key option per entry, typed by its default (bools parse via str2bool, None as str)."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        parser.add_argument(f"--{key}", default=value, type=value_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case) for argparse."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
