"""LPIPS distance with the VGG16 trunk (Zhang et al. 2018, version 0.1), the perceptual loss of StyleGAN2's
projector.

Images in [-1, 1] are shifted and scaled per channel (LPIPS's ScalingLayer), run through VGG16's convolutional
part, and read after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3. Each map is normalised to unit length per
pixel; the squared differences are weighted per channel by the learned linear layers, averaged over the pixels
and summed over the five layers. Weights come from two plain state_dict files read with weights_only:
torchvision's vgg16 (features.* used, classifier.* ignored) and LPIPS's weights/v0.1/vgg.pth (lin0..lin4).
"""

import torch
from torch import nn

from guided_diffusion.checkpoint import load_state_dict_strict, read_state_dict

# VGG16 ('D'): output channels of each 3x3 conv, "M" for a 2x2 max pool; torchvision's features indices.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features, up to relu5_3 (the last pool is never used)."""
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers[:TAPS[-1] + 1])


class LinearLayer(nn.Module):
    """LPIPS's NetLinLayer: dropout (index 0, no weights) then a 1x1 conv to one channel; keys model.1.weight."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for i, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{i}", LinearLayer(channels))
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)

    def normalised_features(self, image: torch.Tensor) -> list:
        """image [N, 3, H, W] in [-1, 1] -> the five tapped maps, each unit-normalised per pixel."""
        x = (image - self.shift) / self.scale
        taken = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taken.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taken

    def distance(self, features0: list, features1: list) -> torch.Tensor:
        """Per-image LPIPS distance [N] between two normalised_features results."""
        total = 0
        for i, (f0, f1) in enumerate(zip(features0, features1)):
            weighted = getattr(self, f"lin{i}").model[1]((f0 - f1).square())
            total = total + weighted.mean(dim=[1, 2, 3])
        return total

    def forward(self, image0, image1):
        return self.distance(self.normalised_features(image0), self.normalised_features(image1))


def load_lpips(vgg16_path: str, linear_path: str) -> LPIPS:
    """LPIPS-VGG16 from torchvision's vgg16 state_dict and LPIPS v0.1's vgg.pth, both loaded strictly; in eval
    mode (dropout off), without gradients."""
    model = LPIPS()
    vgg = read_state_dict(vgg16_path, "torchvision VGG16 state_dict")
    vgg = {k.removeprefix("features."): v for k, v in vgg.items() if not k.startswith("classifier.")}
    load_state_dict_strict(model.features, vgg, vgg16_path, hints=None)
    linear = read_state_dict(linear_path, "LPIPS v0.1 linear layers (vgg.pth)")
    lins = nn.ModuleDict({f"lin{i}": getattr(model, f"lin{i}") for i in range(len(TAP_CHANNELS))})
    load_state_dict_strict(lins, linear, linear_path, hints=None)
    return model.eval().requires_grad_(False)
