"""The synthetic task the store, train, predict and quality phases run on: deterministic random activations
at the paper's feature layout (or a tiny one), labelled by a fixed teacher, so that no checkpoint is needed."""

import torch
import torch.nn.functional as F

from ..seeding import derive_seed

# The paper's DDPM features per diffusion step, (channels, resolution) of the decoder blocks it reads
# (5, 6, 7, 8, 12 of the 256x256 guided-diffusion UNet), at 3 steps: 8448 features per pixel.
PAPER_BLOCKS = [(1024, 32), (512, 32), (512, 32), (512, 64), (256, 128)]
PAPER_STEPS = 3
PAPER_IMAGE = 256
# --small: 1/16 of the channels on a 64x64 image (maps 1/4 the size), for tests.
SMALL_CHANNELS, SMALL_SCALE = 16, 4

SYNTHETIC_PHASES = ("store", "train", "predict", "quality")
HELD_OUT = 1_000_000  # images from this index on are never trained on


def make_layout(small=False):
    """(map_shapes [(C, h, w)] in extractor order, step-major; image size (H, W))."""
    blocks, image = PAPER_BLOCKS, PAPER_IMAGE
    if small:
        blocks = [(c // SMALL_CHANNELS, s // SMALL_SCALE) for c, s in PAPER_BLOCKS]
        image = PAPER_IMAGE // SMALL_SCALE
    return [(c, s, s) for _ in range(PAPER_STEPS) for c, s in blocks], (image, image)


def layout_summary(small=False):
    """The layout's maps, features per pixel, and bytes per image as the original holds them (float32 at full
    resolution) and as our 16-bit store does (native resolution)."""
    map_shapes, image_size = make_layout(small)
    dim = sum(c for c, _, _ in map_shapes)
    return {"map_shapes": map_shapes, "image_size": list(image_size), "features": dim,
            "full_res_bytes_per_image": dim * image_size[0] * image_size[1] * 4,
            "store_bytes_per_image": sum(c * h * w for c, h, w in map_shapes) * 2}


class SyntheticTask:
    """A stand-in for a feature extractor and its labelled images, deterministic in (seed, image index).

    An image's maps mix a few smooth latent fields (its 'content', shared by every map, as real
    features of one image agree across blocks and steps) into each map's channels, plus independent
    noise. Its labels are the argmax of a fixed random linear 'teacher' over the full-resolution
    features. The teacher reads the features through the mixing (W_k = mixing_k @ V), so it mostly
    sees the latent content: labels form regions, and a pixel classifier can learn them. (A teacher
    with independent random weights would be driven by the noise, which no few-hundred-step student
    can pick out of thousands of channels.)
    """

    rank = 8  # latent fields per image
    noise = 0.5  # std of the per-channel noise; the mixed latent part has std about 1
    latent_stride = 16  # image pixels per latent cell: region size

    def __init__(self, map_shapes, image_size, num_classes, seed=0):
        self.map_shapes, self.image_size = list(map_shapes), tuple(image_size)
        self.num_classes, self.seed = num_classes, seed
        self.dim = sum(c for c, _, _ in self.map_shapes)
        gen = torch.Generator().manual_seed(seed)
        self.mixing = [torch.randn(c, self.rank, generator=gen) / self.rank ** 0.5 for c, _, _ in self.map_shapes]
        readout = torch.randn(self.rank, num_classes, generator=gen)
        self.teacher = [(mixing @ readout).t() / self.dim ** 0.5 for mixing in self.mixing]

    def maps(self, index):
        """Image `index`'s maps, as an extractor hands them over: float32 [C, h, w] in feature order."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, index))
        latent_size = [max(1, s // self.latent_stride) for s in self.image_size]
        latent = torch.randn(1, self.rank, *latent_size, generator=gen)
        out = []
        for mixing, (c, h, w) in zip(self.mixing, self.map_shapes):
            field = F.interpolate(latent, (h, w), mode="bilinear", align_corners=False).view(self.rank, h * w)
            fmap = (mixing @ field).view(c, h, w)
            out.append(fmap.add_(torch.randn(c, h, w, generator=gen), alpha=self.noise))
        return out

    def labels(self, maps):
        """Teacher labels [H, W] (long) of an image's maps.

        The teacher's linear map commutes with bilinear upsampling, so it is applied at each map's
        resolution: the same labels as on the full-resolution features, without building them."""
        logits = 0
        for weight, fmap in zip(self.teacher, maps):
            c, h, w = fmap.shape
            z = (weight @ fmap.reshape(c, h * w)).view(1, self.num_classes, h, w)
            logits = logits + F.interpolate(z, self.image_size, mode="bilinear", align_corners=False)
        return logits[0].argmax(0)


def synthetic_task(opts):
    """The task of the bench's flags: --small's layout or the paper's, --classes classes, --seed."""
    map_shapes, image_size = make_layout(opts.small)
    return SyntheticTask(map_shapes, image_size, opts.classes, seed=opts.seed)
