"""DeepLabV3 as train-deeplab trains it, and as a segmenter of images of any size for `ddpm-seg predict`
(no DDPM needed at inference)."""

import math
import os

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

from guided_diffusion.checkpoint import load_state_dict_strict, safe_load

from .backbones import image_tensor
from .class_info import class_table
from .config import load_experiment
from .data import resize_image
from .interpreter import as_rgb, segment_logits

DEEPLABS = {"resnet101": deeplabv3_resnet101, "resnet50": deeplabv3_resnet50}
# The experiment config train-deeplab copies into its run folder, beside deeplab_best.pth.
EXPERIMENT_NAME = "experiment.json"


def build_deeplab(backbone: str, num_classes: int, backbone_weights: str = ""):
    """torchvision DeepLabV3 without the auxiliary head and without downloads; the backbone optionally
    starts from a local torchvision ResNet state dict (its classifier `fc` is not used)."""
    model = DEEPLABS[backbone](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if backbone_weights:
        state = safe_load(backbone_weights, f"{backbone} backbone weights")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_state_dict_strict(model.backbone, state, backbone_weights, hints=None)
    return model


def softmax_entropy(logits):
    """Entropy of the softmax per pixel [H, W] from logits [1, C, H, W]: a single model's uncertainty (the
    ensemble's member disagreement is 0 for one member)."""
    return torch.special.entr(F.softmax(logits.float(), dim=1)).sum(dim=1)[0]


class DeepLabSegmenter:
    """A trained DeepLabV3 with the experiment's classes; segments images as Interpreter does: the image
    resized to deeplab_res, logits upsampled bilinearly to the image's size, the argmax as the label and
    the softmax entropy as the uncertainty."""

    def __init__(self, cfg, model):
        self.cfg, self.model = cfg, model.eval()
        self.class_names, self.palette = class_table(cfg)
        self.number_class, self.ignore_label = cfg.number_class, cfg.ignore_label
        self.resolution = (cfg.deeplab_res, cfg.deeplab_res)

    @property
    def uncertainty_max(self) -> float:
        """The largest softmax entropy, ln(classes) nats: the top of every picture's uncertainty colour scale."""
        return math.log(self.number_class)

    @classmethod
    def load(cls, checkpoint, exp=None, device="cpu"):
        """From a train-deeplab checkpoint ({'model_state_dict': ...}); the experiment config comes from
        `exp` or the experiment.json train-deeplab writes beside the checkpoint."""
        exp = exp or os.path.join(os.path.dirname(checkpoint), EXPERIMENT_NAME)
        if not os.path.isfile(exp):
            raise FileNotFoundError(f"{exp!r} does not exist: pass the experiment config the DeepLab was trained "
                                    "for with --exp")
        cfg = load_experiment(exp)
        if cfg.deeplab_res is None:
            raise ValueError(f"{exp}: needs 'deeplab_res' (the DeepLab input size)")
        ckpt = safe_load(checkpoint, "DeepLab checkpoint")
        state = ckpt.get("model_state_dict") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict) or "classifier.4.weight" not in state:
            raise ValueError(f"{checkpoint}: not a train-deeplab checkpoint (expected {{'model_state_dict': ...}} "
                             "of a torchvision DeepLabV3)")
        num_classes = state["classifier.4.weight"].shape[0]
        if num_classes != cfg.number_class:
            raise ValueError(f"{checkpoint}: the DeepLab predicts {num_classes} classes but {exp} has "
                             f"number_class {cfg.number_class}")
        # ResNet-101 has 23 blocks in layer3, ResNet-50 six.
        backbone = "resnet101" if "backbone.layer3.22.conv1.weight" in state else "resnet50"
        model = build_deeplab(backbone, num_classes)
        load_state_dict_strict(model, state, checkpoint, hints=None)
        return cls(cfg, model.to(device))

    @torch.no_grad()
    def segment(self, images):
        """[(labels uint8 [H, W], uncertainty float32 [H, W], score)] per image, at each image's size."""
        images = [as_rgb(image) for image in images]
        device = next(self.model.parameters()).device
        x = torch.cat([image_tensor(resize_image(image, self.resolution), device, "imagenet") for image in images])
        logits = self.model(x)["out"]
        return [segment_logits(logits[i:i + 1], image.shape[:2], uncertainty=softmax_entropy)
                for i, image in enumerate(images)]

    def __call__(self, image):
        return self.segment([image])[0]
