"""The diffusers phase: feature sizes and extraction time per image of Stable Diffusion 1.5- and SDXL-sized
UNets through the diffusers backbone, in float32 and bfloat16, side by side in one run.

The models are built at random initialisation from the public architectures of their UNets and VAEs (the
unet/ and vae/ config.json of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0), so nothing is
downloaded; random weights cost the same FLOPs as trained ones. The text encoders are left out: they run
once per experiment, not per image, so the benchmark feeds the UNet a random prompt embedding of the
encoders' output shape instead. Each architecture is built once in float32 and timed in each dtype in turn
(converted in place): --warmup untimed images, then --images images one by one. Feature sizes and FLOPs come
from a forward on the meta device (shapes only).
"""

import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backbones.hf_diffusion import DiffusersFeatureExtractor, import_diffusers
from .harness import time_extraction

# unet/config.json of stable-diffusion-v1-5 (the keys that differ from UNet2DConditionModel's defaults or
# fix the architecture).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
# unet/config.json of stable-diffusion-xl-base-1.0.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
# vae/config.json of both (SDXL's VAE has the same architecture, another scaling factor).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
# scheduler/scheduler_config.json of both: the training noise process.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ARCHS = {
    # UNet, VAE, prompt embedding shapes (CLIP ViT-L: 77 x 768; SDXL: ViT-L + bigG 77 x 2048, pooled 1280),
    # default blocks: experiments/<ds>/sd15.json's; for SDXL the same pattern (attention block, block output)
    # on its two attention levels.
    "sd15": (SD15_UNET, SD_VAE, {"encoder_hidden_states": (77, 768)},
             ["up_blocks.1.attentions.1", "up_blocks.1", "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q",
              "up_blocks.2.attentions.1", "up_blocks.2"]),
    "sdxl": (SDXL_UNET, dict(SD_VAE, scaling_factor=0.13025, force_upcast=True),
             {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,)},
             ["up_blocks.0.attentions.1", "up_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
              "up_blocks.1.attentions.1", "up_blocks.1"]),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_parts(arch: str, dtype: torch.dtype, device="cpu") -> dict:
    """UNet, VAE and training scheduler of `arch` at random initialisation, made directly in `dtype`
    (device "meta": shapes only, no memory, for checking feature sizes)."""
    diffusers, _ = import_diffusers()
    unet_config, vae_config, _, _ = ARCHS[arch]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            parts = {"unet": diffusers.UNet2DConditionModel(**unet_config).eval(),
                     "vae": diffusers.AutoencoderKL(**vae_config).eval()}
    finally:
        torch.set_default_dtype(default)
    parts["scheduler"] = diffusers.DDPMScheduler(**SD_SCHEDULE)
    return parts


def make_extractor(arch: str, parts: dict, steps, blocks) -> DiffusersFeatureExtractor:
    """The backbone's extractor on these parts, conditioned on a random prompt embedding of the real shape."""
    extractor = DiffusersFeatureExtractor(parts, steps, blocks, model_path=f"random {arch}")
    shapes = ARCHS[arch][2]
    device, dtype = extractor.device, extractor.dtype
    condition = {"encoder_hidden_states": torch.randn(1, *shapes["encoder_hidden_states"], device=device, dtype=dtype)}
    if "text_embeds" in shapes:
        condition["added_cond_kwargs"] = {"text_embeds": torch.randn(1, *shapes["text_embeds"], device=device, dtype=dtype)}
    extractor.condition = condition
    return extractor


def feature_shapes(arch: str, steps, blocks, size: int) -> tuple:
    """(C, h, w) of every map for a size x size image and the FLOPs of its extraction (VAE encoder + UNet up to
    the last block read), from a forward on the meta device: exact shapes and counts, no compute."""
    extractor = make_extractor(arch, build_parts(arch, torch.float32, "meta"), steps, blocks)
    with FlopCounterMode(display=False) as counter:
        maps = extractor(np.zeros((size, size, 3), dtype=np.uint8))
    return [tuple(m.shape) for m in maps], counter.get_total_flops()


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def time_arch(arch, opts, say) -> list:
    """One model of `arch`, built in float32 and timed in each of --dtypes in turn (converted in place), on the
    same images: a row per dtype."""
    torch.manual_seed(opts.seed)
    start = time.perf_counter()
    parts = build_parts(arch, torch.float32)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in parts["unet"].parameters())
    images = np.random.default_rng(opts.seed).integers(0, 256, (opts.warmup + opts.images, opts.size, opts.size, 3),
                                                       dtype=np.uint8)
    rows = []
    for dtype_name in opts.dtypes:
        for name in ("unet", "vae"):
            parts[name].to(DTYPES[dtype_name])
        extractor = make_extractor(arch, parts, opts.steps, ARCHS[arch][3])
        times = time_extraction(extractor, images, opts.warmup)
        rows.append({"arch": arch, "dtype": dtype_name, "unet_params": params, "build_s": build_s,
                     "times_s": times, "median_s": statistics.median(times)})
        say("  " + format_row(rows[-1]))
    return rows


def format_row(r) -> str:
    return (f"{r['arch']:5s} {r['dtype']:9s} {r['unet_params'] / 1e6:7.0f}M UNet  "
            f"{r['median_s']:8.2f} s  (each: {', '.join(f'{t:.2f}' for t in r['times_s'])}; build {r['build_s']:.0f} s)")


def measure(opts, say):
    """Every arch of --archs in this process, on --threads threads: its maps at --size for --steps, then its
    timing in each of --dtypes (skipped where this machine has too little memory for it). Prints the seconds
    per image of every arch and dtype."""
    torch.set_num_threads(opts.threads)
    rows, features = [], {}
    for arch in opts.archs:
        blocks = ARCHS[arch][3]
        shapes, flops = feature_shapes(arch, opts.steps, blocks, opts.size)
        features[arch] = {"blocks": blocks, "map_shapes": shapes, "flops": flops}
        say(f"{arch} at {opts.size}x{opts.size}, steps {opts.steps}, blocks {blocks}:")
        say(f"  maps (C, h, w): {shapes}; {sum(s[0] for s in shapes)} features per pixel; "
            f"{sum(c * h * w for c, h, w in shapes) * 2 / 2**20:.1f} MiB per image in a bfloat16 store; "
            f"{flops / 1e9:.0f} GFLOP per image (VAE encoder + UNet to the last block read)")
        params = sum(p.numel() for p in build_parts(arch, torch.float32, "meta")["unet"].parameters())
        need = 1.5 * (params + 34e6) * 4 / 2**30  # float32 UNet + VAE, with headroom
        if available_gb() < need:
            print(f"  {arch} skipped: needs ~{need:.0f} GB and {available_gb():.0f} GB are available")
            continue
        rows += time_arch(arch, opts, say)
    print(f"\nseconds per {opts.size}x{opts.size} image (median of {opts.images}), {torch.get_num_threads()} threads:")
    for r in rows:
        print(format_row(r))
    return {"size": opts.size, "steps": opts.steps, "results": rows, "features": features}
