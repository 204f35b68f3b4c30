"""SwAV features: a ResNet-50 (swav) or SwAV's twice-wider ResNet-50 (swav_w2), read at every other block.

The features are the inputs of blocks 0, 2, ... of each stage (layer1: 0, 2; layer2: 0, 2; layer3: 0, 2, 4;
layer4: 0, 2), as the original hooks `layer[::2]` with input_activations true: 6720 channels per pixel for
the ResNet-50, 13440 for the w2. Released files are SwAV's training checkpoints {'state_dict': ...} saved
from DataParallel ('module.' prefixes) with the projection head and prototypes, which are dropped.
"""

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict

from . import batch_result, image_tensor, register

# model_type -> SwAVResNet50 arguments of the released backbones.
ARCHITECTURES = {"swav": dict(widen=1), "swav_w2": dict(widen=2)}
STAGE_DEPTHS = (3, 4, 6, 3)  # bottleneck blocks per stage of a ResNet-50
HEAD_PREFIXES = ("projection_head.", "prototypes.")


def make_stage(in_channels: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage of bottlenecks (width `planes`, output 4 * planes); the first block changes
    resolution and width, so its shortcut is a strided 1x1 conv + BN."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    blocks = [Bottleneck(in_channels, planes, stride, downsample)]
    blocks += [Bottleneck(out_channels, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class SwAVResNet50(nn.Module):
    """ResNet-50 body as SwAV builds it, without pooling or head; `widen` multiplies every width.

    widen=1 is torchvision's resnet50 (same modules, names and numbers) minus avgpool and fc. widen=2 doubles
    the stem too (128 channels), unlike torchvision's wide_resnet50_2, which widens only the bottlenecks.
    `width` is the ResNet-50 stem's; tests shrink it to get small models with the same blocks and hooks.
    """

    def __init__(self, widen: int = 1, width: int = 64):
        super().__init__()
        width *= widen
        # SwAV pads by 1, then convolves with padding 2: the same numbers as torchvision's padding 3.
        self.padding = nn.ZeroPad2d(1)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        for i, num_blocks in enumerate(STAGE_DEPTHS):
            planes = width * 2**i
            setattr(self, f"layer{i + 1}", make_stage(in_channels, planes, num_blocks, stride=1 if i == 0 else 2))
            in_channels = planes * Bottleneck.expansion
        # SwAV's (and torchvision's) initialisation, used by --random_init; BN starts at weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, input_activations: bool = True) -> list:
        """Activations of blocks 0, 2, 4, ... of every stage, in order: their inputs, or their outputs."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        taken = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for j, block in enumerate(stage):
                read = j % 2 == 0
                if read and input_activations:
                    taken.append(x)
                x = block(x)
                if read and not input_activations:
                    taken.append(x)
        return taken


def read_swav_state_dict(path: str) -> dict:
    """The backbone entries of a SwAV checkpoint {'state_dict': ...}: 'module.' stripped, head and
    prototypes dropped."""
    state_dict = read_state_dict(path, "SwAV training checkpoint", key="state_dict")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}


def load_swav(model: SwAVResNet50, path: str) -> None:
    state_dict = read_swav_state_dict(path)
    try:
        load_state_dict_strict(model, state_dict, path, hints=None)
    except CheckpointError as e:
        # The likely mistake is a ResNet-50 file for swav_w2 or the reverse: the stem width tells which it is.
        stem = state_dict.get("conv1.weight")
        if stem is None or stem.shape[0] == model.conv1.out_channels:
            raise
        raise CheckpointError(f"{e}\n  probable cause: the checkpoint's stem has {stem.shape[0]} channels, this "
                              f"model's {model.conv1.out_channels}: use model_type swav for ResNet-50 files (64) and "
                              "swav_w2 for ResNet-50 w2 files (128)") from None


class SwAVFeatureExtractor:
    def __init__(self, model: SwAVResNet50, input_activations: bool = True):
        self.model = model
        self.input_activations = input_activations

    @property
    def device(self):
        return self.model.conv1.weight.device

    @torch.no_grad()
    def __call__(self, image: np.ndarray, view: int = 0) -> list:
        """uint8 [H, W, 3] -> maps [C, h, w] (float32) at strides 4, 4, 4, 8, 8, 16, 16, 16, 32;
        [N, H, W, 3] -> the same maps with a leading batch dimension."""
        x = image_tensor(image, self.device, "imagenet").to(self.model.conv1.weight.dtype)
        return batch_result(image, self.model(x, self.input_activations))


@register("swav")
@register("swav_w2")
def build_swav(cfg, model_flags, device, seed, random_init, dtype):
    if random_init:
        torch.manual_seed(seed)
    model = SwAVResNet50(**ARCHITECTURES[cfg.model_type])
    if not random_init:
        load_swav(model, cfg.model_path)
    # Batch norm in eval mode is an affine map: bf16/fp16 weights throughout are fine.
    model.to(device, dtype).eval()
    return SwAVFeatureExtractor(model, cfg.input_activations)
