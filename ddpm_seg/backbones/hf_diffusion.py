"""Features of pretrained diffusers pipelines: Stable Diffusion 1.x/2.x, SDXL, DiT, PixArt, pixel-space DDPMs.

The image is encoded as the pipeline's training did (latent models: the VAE's latent mean, shifted and scaled
by the VAE's factors; pixel models: [-1, 1]), noised at each of `steps` with the pipeline's training noise
process, and run once through the denoiser (UNet or transformer) with forward hooks on the modules named in
`blocks`, e.g. "up_blocks.1", "up_blocks.2.attentions.0" or "transformer_blocks.14". A module that returns
tokens [B, L, D] (transformer blocks, "...attn1.to_q" / "...attn1.to_k" projections) gives its tokens
reshaped to a map on the latent grid. Text-conditioned models get the config's `prompt` (default "")
through their text encoder(s) once at build time; DiT gets its null class, the unconditional branch of
classifier-free guidance. `noise_draws` K averages every map over K noise draws. The forward stops as soon
as every named module has run.

The module is named hf_diffusion so that `import diffusers` inside it is the library; diffusers and
transformers are an optional extra, imported only when this backbone is built.
"""

import difflib
import importlib
import os
import re
import socket
import urllib.parse

import numpy as np
import torch

from ..files import read_json_object
from . import check_noise_draws, image_noise, register, shared_noise, view_noise

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
COMPONENTS = DENOISERS + ("vae", "scheduler") + sum(TEXT_ENCODERS, ())
CROSS_ATTENTION_TEXT = re.compile(r"attn2\.to_[kv]$")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_PROBE_TIMEOUT_S = 5
INSTALL_HINT = "pip install -e '.[diffusers]'"


class _StopForward(Exception):
    """Raised by a hook once every named module has run: the rest of the denoiser is not needed."""


def import_diffusers():
    try:
        return importlib.import_module("diffusers"), importlib.import_module("transformers")
    except ImportError as e:
        raise ValueError(f"model_type 'diffusers' needs the optional extra: {INSTALL_HINT} ({e})") from None


def hub_reachable(endpoint: str) -> bool:
    """A TCP connection to the hub within a few seconds; a machine without network answers at once or times out."""
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def resolve_model_folder(model_path: str) -> str:
    """A local pipeline folder for `model_path`: the folder itself, the Hugging Face cache's copy of a hub id,
    or a fresh download when the hub answers. Never waits on a network that is not there."""
    if os.path.isdir(model_path):
        if not os.path.isfile(os.path.join(model_path, "model_index.json")):
            raise FileNotFoundError(f"model_path {model_path!r} has no model_index.json: expected a diffusers "
                                    "pipeline folder (as written by save_pretrained) or a hub model id")
        return model_path
    if not HUB_ID.fullmatch(model_path):
        raise FileNotFoundError(f"model_path {model_path!r} is neither a folder nor a hub model id "
                                "like 'runwayml/stable-diffusion-v1-5'")
    diffusers, _ = import_diffusers()
    from huggingface_hub import constants

    try:
        return diffusers.DiffusionPipeline.download(model_path, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the cache
    if constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT):
        raise FileNotFoundError(f"model_path {model_path!r} is not a folder, not in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}), and the hub is not reachable (offline); download it "
                                "on a connected machine or point model_path at a pipeline folder")
    return diffusers.DiffusionPipeline.download(model_path)


def load_component(diffusers, folder, name, library, class_name, dtype, random_init, seed):
    if name == "scheduler":
        # The denoiser was trained on DDPM noising with these betas; samplers (Euler, DPM-Solver) only
        # re-parametrise the same process for inference, and some of their add_noise need a sampling schedule.
        return diffusers.DDPMScheduler.from_config(diffusers.DDPMScheduler.load_config(folder, subfolder=name))
    cls = getattr(importlib.import_module(library), class_name)
    if name.startswith("tokenizer"):
        return cls.from_pretrained(folder, subfolder=name)
    if library == "transformers":
        return cls.from_pretrained(folder, subfolder=name, dtype=dtype)
    if name in DENOISERS and random_init:
        torch.manual_seed(seed)
        return cls.from_config(cls.load_config(folder, subfolder=name)).to(dtype)
    return cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype)


def load_components(folder: str, dtype: torch.dtype, random_init: bool = False, seed: int = 0) -> dict:
    """The pipeline parts feature extraction needs, by their model_index.json names (safety checker,
    image processor and the like are not loaded). random_init: the denoiser at random initialisation from its
    config (a baseline), the encoders pretrained."""
    diffusers, _ = import_diffusers()
    index = read_json_object(os.path.join(folder, "model_index.json"), "diffusers pipeline index")
    parts = {}
    for name in COMPONENTS:
        library, class_name = (index.get(name) or [None, None])[:2]
        if class_name is None:
            continue
        try:
            parts[name] = load_component(diffusers, folder, name, library, class_name, dtype, random_init, seed)
        except (OSError, ValueError, ImportError, AttributeError, EnvironmentError) as e:
            # A missing weights file, a broken config.json, an unknown class: one line naming the part.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{os.path.join(folder, name)}: cannot load the pipeline's {name} ({class_name}): "
                             f"{reason}") from None
    denoisers = [n for n in DENOISERS if n in parts]
    if len(denoisers) != 1 or "scheduler" not in parts:
        raise ValueError(f"{folder}/model_index.json: expected one denoiser (unet or transformer) and a scheduler, "
                         f"found {sorted(parts)}")
    return parts


def token_grid(num_tokens: int, latent_hw) -> tuple:
    """(h, w) of the grid `num_tokens` image tokens lie on: the latent grid downsampled by an integer factor
    (ceil, as strided convolutions do), or None when the tokens are not image tokens (e.g. text keys)."""
    h0, w0 = latent_hw
    for s in range(1, max(h0, w0) + 1):
        h, w = -(-h0 // s), -(-w0 // s)
        if h * w == num_tokens:
            return h, w
        if h * w < num_tokens:
            return None
    return None


def as_map(name: str, output, latent_hw) -> torch.Tensor:
    """A module's output as a batch of maps [B, C, h, w]: tensors [B, C, h, w] as they are, the first tensor of
    a tuple or an output object (blocks return (hidden, residuals), transformers their .sample), image tokens
    [B, L, D] reshaped onto their grid."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    output = getattr(output, "sample", output)
    if not torch.is_tensor(output):
        raise ValueError(f"blocks: module {name!r} returns {type(output).__name__}, not a tensor")
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        # Cross-attention keys/values are text tokens, whatever their count happens to be.
        grid = None if CROSS_ATTENTION_TEXT.search(name) else token_grid(output.shape[1], latent_hw)
        if grid is None:
            raise ValueError(f"blocks: module {name!r} gives {output.shape[1]} tokens, which are not image tokens on "
                             f"the {latent_hw[0]}x{latent_hw[1]} latent grid (text keys/values such as attn2.to_k "
                             "have no map)")
        return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], *grid)
    raise ValueError(f"blocks: module {name!r} gives a {output.ndim}-D output {tuple(output.shape)}, not a spatial map")


def check_module_names(denoiser, names, model_path) -> None:
    modules = dict(denoiser.named_modules())
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=8, cutoff=0.6)
            near = close or [n for n, _ in denoiser.named_children()]
            raise ValueError(f"blocks: no module {name!r} in the {type(denoiser).__name__} of {model_path}; "
                             f"{'close names' if close else 'top-level modules'}: {', '.join(near)}")


@torch.no_grad()
def encode_prompt(parts: dict, prompt: str, device) -> dict:
    """The text conditioning the pipeline gives its denoiser for `prompt`, as denoiser keyword arguments
    (batch 1). SD 1.x/2.x: the encoder's last hidden state; SDXL: both encoders' penultimate hidden states
    concatenated, plus the second encoder's pooled projection; T5 (PixArt): last hidden state and its mask."""
    pairs = [(parts[t], parts[e]) for t, e in TEXT_ENCODERS if e in parts]
    if not pairs:
        return {}
    denoiser = parts["unet"] if "unet" in parts else parts["transformer"]
    sdxl = getattr(denoiser.config, "addition_embed_type", None) == "text_time"
    states, kwargs = [], {}
    for tokenizer, encoder in pairs:
        tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").to(device)
        if "transformer" in parts:  # PixArt: T5 reads and is read through the padding mask
            out = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)
            kwargs["encoder_attention_mask"] = tokens.attention_mask
            states.append(out[0])
        elif sdxl:
            out = encoder(tokens.input_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            kwargs["added_cond_kwargs"] = {"text_embeds": out[0]}  # the last encoder's pooled projection
        else:
            states.append(encoder(tokens.input_ids)[0])
    kwargs["encoder_hidden_states"] = torch.cat(states, dim=-1)
    if sdxl:
        # SDXL base conditions: pooled text + six size ids (the refiner's aesthetic-score ids are not built here).
        expected = kwargs["added_cond_kwargs"]["text_embeds"].shape[-1] + 6 * denoiser.config.addition_time_embed_dim
        if denoiser.config.projection_class_embeddings_input_dim != expected:
            raise ValueError(f"this UNet takes {denoiser.config.projection_class_embeddings_input_dim} added condition "
                             f"channels, not SDXL base's pooled text + 6 size ids ({expected}); only SDXL base-style "
                             "pipelines are supported")
    return kwargs


class DiffusersFeatureExtractor:
    def __init__(self, parts: dict, steps, blocks, prompt: str = "", noise_draws: int = 1, noise=None,
                 model_path: str = "<model>", views: int = 1, noise_seed: int = 0):
        self.denoiser = parts["unet"] if "unet" in parts else parts["transformer"]
        self.vae, self.scheduler = parts.get("vae"), parts["scheduler"]
        num_timesteps = self.scheduler.config.num_train_timesteps
        bad_steps = [t for t in steps if not 0 <= t < num_timesteps]
        if bad_steps:
            raise ValueError(f"steps {bad_steps} out of range: the pipeline has timesteps 0..{num_timesteps - 1}")
        if not steps or not blocks:
            raise ValueError("a diffusers experiment needs at least one step and one block")
        check_noise_draws(noise, noise_draws, views)
        check_module_names(self.denoiser, blocks, model_path)
        self.steps, self.blocks = list(steps), list(blocks)
        # noise None (no share_noise): each image's noise seeded by noise_seed and its pixels (image_noise).
        self.noise_draws, self.noise, self.noise_seed = noise_draws, noise, noise_seed
        self.condition = encode_prompt(parts, prompt, self.device)
        self._activations = {}

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        return next(self.denoiser.parameters()).dtype

    def at_steps(self, steps):
        """The same extractor (models, conditioning, noise shared) reading other steps: what the sweep needs."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__, steps=list(steps), _activations={})
        return other

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> the denoiser's clean input x_0 (latent mean for latent models)."""
        if self.vae is None:
            return x.to(self.dtype)
        vae_dtype = next(self.vae.parameters()).dtype
        latent = self.vae.encode(x.to(vae_dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def _kwargs(self, batch: int, image_hw) -> dict:
        """Denoiser keyword arguments for a batch: the prompt's conditioning repeated, SDXL's size conditions
        (the image's own size, no crop), PixArt's resolution conditions, DiT's null class."""
        kwargs = {}
        for key, value in self.condition.items():
            if key == "added_cond_kwargs":
                value = {k: v.expand(batch, *v.shape[1:]) for k, v in value.items()}
            else:
                value = value.expand(batch, *value.shape[1:])
            kwargs[key] = value
        config = self.denoiser.config
        if "added_cond_kwargs" in kwargs:  # SDXL: original size, crop top-left, target size
            h, w = image_hw
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(batch, -1)
            kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "time_ids": time_ids}
        if getattr(config, "norm_type", None) == "ada_norm_single":  # PixArt
            sized = getattr(self.denoiser, "use_additional_conditions", False)
            res = torch.tensor([list(image_hw)], device=self.device, dtype=self.dtype).expand(batch, -1)
            aspect = torch.tensor([[image_hw[0] / image_hw[1]]], device=self.device, dtype=self.dtype).expand(batch, -1)
            kwargs["added_cond_kwargs"] = {"resolution": res if sized else None, "aspect_ratio": aspect if sized else None}
        if getattr(config, "norm_type", None) == "ada_norm_zero" and getattr(config, "num_embeds_ada_norm", None):
            kwargs["class_labels"] = torch.full((batch,), config.num_embeds_ada_norm, device=self.device)  # null class
        return kwargs

    def _hook(self, name, latent_hw):
        def hook(module, inputs, output):
            self._activations[name] = as_map(name, output, latent_hw)
            if len(self._activations) == len(self._names):
                raise _StopForward

        return hook

    def _forward(self, x_t, t, kwargs, latent_hw) -> dict:
        """One denoiser forward with hooks on the named modules; stops after the last of them has run."""
        self._activations = {}
        self._names = set(self.blocks)
        modules = dict(self.denoiser.named_modules())
        handles = [modules[n].register_forward_hook(self._hook(n, latent_hw)) for n in self._names]
        try:
            self.denoiser(x_t, timestep=t, return_dict=False, **kwargs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = self._names - set(self._activations)
        if missing:
            raise ValueError(f"blocks: modules {sorted(missing)} did not run in the denoiser's forward")
        return self._activations

    @torch.no_grad()
    def __call__(self, images: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> maps [C, h, w]; uint8 [N, H, W, 3] -> maps [N, C, h, w] (float32), step-major:
        [t0: b0 b1 .. | t1: ...], each the mean over noise_draws draws."""
        single = images.ndim == 3
        batch = torch.from_numpy(np.array(images[None] if single else images)).to(self.device)
        x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        n, num_steps = len(x), len(self.steps)
        x0 = self.encode(x)
        latent_hw = tuple(x0.shape[-2:])
        # Step-major batch: row s * n + i is image i at step s.
        x0 = x0[None].expand(num_steps, *x0.shape).reshape(num_steps * n, *x0.shape[1:])
        t = torch.tensor(self.steps, device=self.device).repeat_interleave(n)
        kwargs = self._kwargs(len(x0), tuple(x.shape[-2:]))
        shared = view_noise(self.noise, self.noise_draws, view)
        sums = None
        for k in range(self.noise_draws):
            if shared is not None:
                noise = shared[k].expand_as(x0).to(x0.dtype)
            else:  # each image's own noise for each step, step-major as x0
                noise = image_noise(self.noise_seed, images, view, k, (num_steps, *x0.shape[1:]),
                                    self.device)
                noise = noise.transpose(0, 1).flatten(0, 1).to(x0.dtype)
            acts = self._forward(self.scheduler.add_noise(x0, noise, t), t, kwargs, latent_hw)
            maps = [acts[b].float().view(num_steps, n, *acts[b].shape[1:]) for b in self.blocks]
            sums = maps if sums is None else [s + m for s, m in zip(sums, maps)]
        maps = [m[s] / self.noise_draws for s in range(num_steps) for m in sums]
        return [m[0] for m in maps] if single else maps


def latent_shape(parts: dict, image_size) -> tuple:
    """(channels, h, w) of the denoiser's input for an image of `image_size` (H, W)."""
    h, w = image_size
    if "vae" not in parts:
        return 3, h, w
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return parts["vae"].config.latent_channels, -(-h // factor), -(-w // factor)


def check_config(cfg, path):
    """blocks name denoiser modules, read in the order given; the checks against the model come when it loads."""
    blocks = cfg["blocks"]
    if not all(isinstance(b, str) and b for b in blocks):
        raise ValueError(f"{path}: 'blocks' of a diffusers model must be module names like \"up_blocks.1\", got {blocks!r}")
    repeated = sorted({b for b in blocks if blocks.count(b) > 1})
    if repeated:
        raise ValueError(f"{path}: 'blocks' lists {repeated} more than once")
    if cfg.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"{path}: 'dtype' must be one of {list(DTYPES)}, got {cfg['dtype']!r}")


# prompt: the text the denoiser is conditioned on (default empty); dtype: the precision the pipeline runs in.
@register("diffusers", config_keys={"prompt": (str, False), "dtype": (str, False)}, check_config=check_config,
          noised=True, named_blocks=True, hub_model=True)
def build_diffusers(cfg, model_flags, device, seed, random_init, dtype):
    if cfg.input_activations:
        raise ValueError("input_activations is not supported for model_type 'diffusers': name the module "
                         "before it in blocks instead")
    # The config's own "dtype" pins this experiment's precision; without it, --extract_dtype decides.
    options = cfg.backbone_options
    dtype = DTYPES[options["dtype"]] if "dtype" in options else dtype
    folder = resolve_model_folder(cfg.model_path)
    parts = load_components(folder, dtype, random_init, seed)
    if "vae" in parts and dtype == torch.float16 and getattr(parts["vae"].config, "force_upcast", False):
        parts["vae"].to(torch.float32)  # SDXL's VAE overflows in float16, as its pipeline knows
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device).eval()
    draws, views = cfg.noise_draws, cfg.test_views
    noise = shared_noise(seed, draws * views, latent_shape(parts, cfg.dim[:2]), device) if cfg.share_noise else None
    return DiffusersFeatureExtractor(parts, cfg.steps, cfg.blocks, options.get("prompt", ""), draws, noise,
                                     cfg.model_path, views, noise_seed=seed)
