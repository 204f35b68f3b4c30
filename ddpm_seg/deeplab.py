"""Ordinary segmentation networks and the segmenter that runs them on images of any size: train-deeplab's
DeepLabV3 (the paper's DatasetDDPM/DatasetGAN network) and the students `ddpm-seg distill` trains. predict
segments with either, no DDPM needed at inference.

A student folder (distill's --out) holds student.pth ({'model_state_dict', 'architecture', 'resolution'}) and
experiment.json (the interpreter's experiment: class names, palette).
"""

import math
import os

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import (deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101,
                                             lraspp_mobilenet_v3_large)

from guided_diffusion.checkpoint import CheckpointError, load_state_dict_strict, safe_load

from .backbones import image_tensor
from .class_info import class_table
from .config import load_experiment, validate_experiment
from .data import resize_image
from .files import atomic_torch_save, atomic_write_json, read_json_object
from .interpreter import as_rgb, segment_logits

# name -> (torchvision builder, prefix of its backbone's keys in the torchvision classification state dict, that
# state dict's classifier prefix, which the segmentation network does not use).
NETWORKS = {
    "deeplabv3_resnet101": (deeplabv3_resnet101, "", "fc."),  # the paper's DatasetDDPM/DatasetGAN network
    "deeplabv3_resnet50": (deeplabv3_resnet50, "", "fc."),
    "deeplabv3_mobilenet_v3": (deeplabv3_mobilenet_v3_large, "features.", "classifier."),  # light, for CPUs
    "lraspp_mobilenet_v3": (lraspp_mobilenet_v3_large, "features.", "classifier."),  # lightest
}
# train-deeplab's --backbone names.
DEEPLABS = {"resnet101": "deeplabv3_resnet101", "resnet50": "deeplabv3_resnet50"}
# The experiment config written beside a train-deeplab checkpoint and in a student folder.
EXPERIMENT_NAME = "experiment.json"
STUDENT_NAME = "student.pth"


def build_network(name: str, num_classes: int, backbone_weights: str = ""):
    """A NETWORKS network without auxiliary head and without downloads; its backbone optionally starts from a
    local torchvision classification state dict (e.g. resnet101-63fe2227.pth, mobilenet_v3_large-8738ca79.pth).
    forward(x) returns {'out': logits at x's size}."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}")
    builder, prefix, classifier = NETWORKS[name]
    extra = {} if builder is lraspp_mobilenet_v3_large else {"aux_loss": False}  # LR-ASPP has no auxiliary head
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
    if backbone_weights:
        state = safe_load(backbone_weights, f"{name} backbone weights")
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(classifier)}
        load_state_dict_strict(model.backbone, state, backbone_weights, hints=None)
    return model


def build_deeplab(backbone: str, num_classes: int, backbone_weights: str = ""):
    """train-deeplab's DeepLabV3 with a DEEPLABS backbone."""
    return build_network(DEEPLABS[backbone], num_classes, backbone_weights)


def softmax_entropy(logits):
    """Entropy of the softmax per pixel [H, W] from logits [1, C, H, W]: a single network's uncertainty (the
    ensemble's member disagreement is 0 for one member)."""
    return torch.special.entr(F.softmax(logits.float(), dim=1)).sum(dim=1)[0]


def check_classes(source, num_classes, cfg, exp):
    if num_classes != cfg.number_class:
        raise ValueError(f"{source}: the network predicts {num_classes} classes but {exp} has number_class "
                         f"{cfg.number_class}")


class NetworkSegmenter:
    """A trained segmentation network with the experiment's classes; segments images as Interpreter does: the
    image resized to `resolution`, ImageNet-normalised, logits upsampled bilinearly to the image's size, the
    argmax as the label and the softmax entropy as the uncertainty. Subclasses run another runtime by
    overriding forward()."""

    def __init__(self, cfg, model, resolution, architecture):
        self.cfg, self.model, self.architecture = cfg, model, architecture
        self.class_names, self.palette = class_table(cfg)
        self.number_class, self.ignore_label = cfg.number_class, cfg.ignore_label
        self.resolution = (resolution, resolution)

    @property
    def uncertainty_max(self) -> float:
        """The largest softmax entropy, ln(classes) nats: the top of every picture's uncertainty colour scale."""
        return math.log(self.number_class)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @classmethod
    def load_deeplab(cls, checkpoint, exp=None, device="cpu"):
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
        check_classes(checkpoint, state["classifier.4.weight"].shape[0], cfg, exp)
        # ResNet-101 has 23 blocks in layer3, ResNet-50 six.
        name = DEEPLABS["resnet101" if "backbone.layer3.22.conv1.weight" in state else "resnet50"]
        model = build_network(name, cfg.number_class)
        load_state_dict_strict(model, state, checkpoint, hints=None)
        return cls(cfg, model.to(device).eval(), cfg.deeplab_res, name)

    @classmethod
    def load_student(cls, folder, device="cpu"):
        """From a distill student folder (student.pth and experiment.json)."""
        path = os.path.join(folder, STUDENT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} is not a student folder: it has no {STUDENT_NAME} (distill writes "
                                    "one when it has trained the student)")
        exp = os.path.join(folder, EXPERIMENT_NAME)
        cfg = validate_experiment(read_json_object(exp, "experiment config"), exp)
        ckpt = safe_load(path, "student checkpoint")
        if not isinstance(ckpt, dict) or not {"model_state_dict", "architecture", "resolution"} <= set(ckpt):
            raise CheckpointError(f"{path}: not a student checkpoint (expected {{'model_state_dict', 'architecture', "
                                  "'resolution'}, as distill writes)")
        model = build_network(ckpt["architecture"], cfg.number_class)
        load_state_dict_strict(model, ckpt["model_state_dict"], path, hints=None)
        return cls(cfg, model.to(device).eval(), int(ckpt["resolution"]), ckpt["architecture"])

    def input_tensor(self, images):
        """uint8 RGB images [H, W, 3] -> the network's input [N, 3, R, R] on its device."""
        return torch.cat([image_tensor(resize_image(image, self.resolution), self.device, "imagenet")
                          for image in images])

    def forward(self, x):
        """Logits [N, C, R, R] of input x [N, 3, R, R]."""
        return self.model(x)["out"]

    @torch.no_grad()
    def segment(self, images):
        """[(labels uint8 [H, W], uncertainty float32 [H, W], score)] per image (paths, PIL images or uint8
        arrays [H, W, 3]), at each image's size."""
        images = [as_rgb(image) for image in images]
        logits = self.forward(self.input_tensor(images))
        return [segment_logits(logits[i:i + 1], image.shape[:2], uncertainty=softmax_entropy)
                for i, image in enumerate(images)]

    def __call__(self, image):
        return self.segment([image])[0]


def is_student_folder(path) -> bool:
    return os.path.isfile(os.path.join(path, STUDENT_NAME))


def cpu_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_student(folder, model, architecture, resolution, cfg) -> None:
    """Write a student folder's network (student.pth) and experiment (experiment.json), each atomically."""
    atomic_write_json(os.path.join(folder, EXPERIMENT_NAME), cfg.to_dict())
    atomic_torch_save({"model_state_dict": cpu_state(model), "architecture": architecture, "resolution": int(resolution)},
                      os.path.join(folder, STUDENT_NAME))
