"""MAE features: the ViT-L/8 encoder of a masked autoencoder, read at its last 12 transformer blocks.

The released files are MAE pre-training checkpoints {'model': state_dict} that hold the encoder and the
decoder; only the encoder is built and loaded. The original runs MAE's masked encoder with mask ratio 0
(patches shuffled, then put back in order); attention does not care about token order once the position
embeddings are added, so a plain forward in patch order gives the same features.
"""

from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from guided_diffusion.checkpoint import load_state_dict_strict, read_state_dict

from . import batch_result, image_tensor, register

# The paper's encoder (models_mae.mae_vit_large_patch8 at 256x256). img_size follows the config's dim.
ARCHITECTURE = dict(patch_size=8, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
NUM_FEATURE_BLOCKS = 12


def is_decoder_key(key: str) -> bool:
    """Entries of the pre-training decoder, which feature extraction never runs."""
    return key.startswith("decoder_") or key == "mask_token"


def create_mae_encoder(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio) -> VisionTransformer:
    """MAE's encoder as a timm ViT: class token, position embeddings, final norm, no head.

    Its state_dict keys are the encoder keys of an MAE pre-training checkpoint."""
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def read_mae_encoder_state_dict(path: str) -> dict:
    """The encoder entries of an MAE pre-training checkpoint {'model': state_dict} (decoder entries dropped)."""
    state_dict = read_state_dict(path, "MAE pre-training checkpoint", key="model")
    return {k: v for k, v in state_dict.items() if not is_decoder_key(k)}


class MAEFeatureExtractor:
    def __init__(self, encoder: VisionTransformer, num_blocks: int, input_activations: bool = False):
        depth = len(encoder.blocks)
        # A block's input is the previous block's output.
        first = depth - num_blocks - int(input_activations)
        if num_blocks < 1 or first < 0:
            raise ValueError(f"cannot read {'inputs' if input_activations else 'outputs'} of the last "
                             f"{num_blocks} blocks of a {depth}-block encoder")
        self.encoder = encoder
        self.block_indices = list(range(first, first + num_blocks))

    @property
    def device(self):
        return self.encoder.cls_token.device

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> one [embed_dim, H / patch, W / patch] map per block (class token dropped);
        [N, H, W, 3] -> the same maps with a leading batch dimension."""
        x = image_tensor(image, self.device, "imagenet").to(self.encoder.cls_token.dtype)
        maps = self.encoder.forward_intermediates(x, indices=self.block_indices,
                                                  output_fmt="NCHW", intermediates_only=True, stop_early=True)
        return batch_result(image, maps)


@register("mae")
def build_mae(cfg, model_flags, device, seed, random_init, dtype):
    image_size = tuple(cfg.dim[:2])
    patch = ARCHITECTURE["patch_size"]
    if image_size[0] % patch or image_size[1] % patch:
        raise ValueError(f"MAE cuts images into {patch}x{patch} patches: dim {cfg.dim[:2]} must be "
                         f"multiples of {patch}")
    if random_init:
        torch.manual_seed(seed)
    encoder = create_mae_encoder(image_size, **ARCHITECTURE)
    if not random_init:
        # The position embeddings fix the image size: a checkpoint pre-trained at another size fails here
        # with a pos_embed shape mismatch.
        load_state_dict_strict(encoder, read_mae_encoder_state_dict(cfg.model_path), cfg.model_path, hints=None)
    # Every weight in `dtype`: timm's LayerNorm and softmax accumulate in float32 for bf16/fp16 inputs.
    encoder.to(device, dtype).eval()
    return MAEFeatureExtractor(encoder, NUM_FEATURE_BLOCKS, cfg.input_activations)
