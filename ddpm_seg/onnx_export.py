"""Segmentation networks as ONNX files that segment on their own, with onnxruntime instead of PyTorch.

export_onnx writes the network (input "image": float32 [N, 3, R, R], ImageNet-normalised, any batch size N;
output "logits": [N, C, R, R]) and, in the file's metadata, the experiment config (class names, palette), the
architecture and the input size R; OnnxSegmenter segments images with such a file alone, as NetworkSegmenter
does with the PyTorch network, and check_export measures how far the two differ.

onnx, onnxscript and onnxruntime are an optional extra, imported only when a file is exported or loaded.
"""

import importlib
import json
import os

import numpy as np
import torch

from .config import validate_experiment
from .data import IMAGE_EXTENSIONS, list_images, read_image
from .deeplab import NetworkSegmenter, softmax_entropy
from .files import atomic_open, check_writable
from .interpreter import as_rgb, segment_logits

INSTALL_HINT = "ONNX export needs the onnx extra: pip install -c constraints.txt -e '.[onnx]'"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# Keys of the file's metadata_props.
EXPERIMENT_KEY, ARCHITECTURE_KEY, RESOLUTION_KEY = "ddpm_seg.experiment", "ddpm_seg.architecture", "ddpm_seg.resolution"
# Images an export is checked on when the experiment's testing_path has none.
NOISE_IMAGES = 4


def _import(*names):
    try:
        return [importlib.import_module(name) for name in names]
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None


class _Logits(torch.nn.Module):
    """The network with its {'out': logits} output unwrapped: the graph's one output is the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)["out"]


def export_onnx(segmenter, path) -> None:
    """Write `segmenter`'s network (a NetworkSegmenter's torch model) to the ONNX file `path`, atomically, with
    its experiment config, architecture and resolution in the file's metadata."""
    _import("onnx", "onnxscript")
    check_writable(os.path.dirname(os.path.abspath(path)))  # before the export, which takes a while
    # In eval mode, as the network is: torch.onnx.export warns about a wrapper in training mode, and its
    # TorchScript path hands the wrapper's flag down to every submodule when done, which would leave the
    # segmenter's BatchNorm layers in training mode.
    wrapper = _Logits(segmenter.model).eval()
    # A batch of 2, not 1: torch.export fixes a dimension of size 1 to the constant 1.
    example = torch.zeros(2, 3, *segmenter.resolution, device=segmenter.device)
    # dynamo=True (torch.export): the exporter PyTorch maintains and uses by default; the TorchScript one
    # (dynamo=False) is deprecated and announces its removal, for a few seconds less per export.
    program = torch.onnx.export(wrapper, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME],
                                dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    model = program.model_proto
    metadata = {EXPERIMENT_KEY: json.dumps(segmenter.cfg.to_dict()), ARCHITECTURE_KEY: segmenter.architecture,
                RESOLUTION_KEY: str(segmenter.resolution[0])}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_open(path) as f:
        f.write(model.SerializeToString())


class OnnxSegmenter(NetworkSegmenter):
    """A NetworkSegmenter whose network is an ONNX file written by export_onnx, run by onnxruntime: it holds no
    torch model (model is None); class names, palette and input size come from the file's metadata."""

    def __init__(self, cfg, runtime, resolution, architecture):
        super().__init__(cfg, None, resolution, architecture)
        self.runtime = runtime  # onnxruntime's loaded graph

    @property
    def device(self):
        # Where input_tensor() builds the input: onnxruntime takes it as a NumPy array in host memory.
        return torch.device("cpu")

    @classmethod
    def load(cls, path, cpu_threads=None):
        """From an ONNX file written by export_onnx. onnxruntime runs it on CUDA when both it and torch can, else on
        the CPU; cpu_threads = N runs it on the CPU on N threads (to compare it with PyTorch on the same cores)."""
        ort, = _import("onnxruntime")
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, InvalidGraph, InvalidProtobuf
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is not a file (expected an .onnx file written by ddpm-seg export)")
        not_ours = f"{path}: not an ONNX file exported by ddpm-seg export"
        cuda = (cpu_threads is None and "CUDAExecutionProvider" in ort.get_available_providers()
                and torch.cuda.is_available())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if cpu_threads is not None:
            options.intra_op_num_threads = cpu_threads
        # onnxruntime's threads otherwise spin for a while after each run, taking the cores from the PyTorch
        # work between runs (upsampling, the vote): 2-4x slower overall on a busy 2-core machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            runtime = ort.InferenceSession(path, options, providers=providers)
        except (InvalidProtobuf, InvalidArgument, InvalidGraph):
            raise ValueError(not_ours) from None
        metadata = runtime.get_modelmeta().custom_metadata_map
        if not {EXPERIMENT_KEY, ARCHITECTURE_KEY, RESOLUTION_KEY} <= set(metadata):
            raise ValueError(not_ours)
        try:
            experiment = json.loads(metadata[EXPERIMENT_KEY])
            resolution = int(metadata[RESOLUTION_KEY])
        except ValueError:
            raise ValueError(not_ours) from None
        if not isinstance(experiment, dict):
            raise ValueError(not_ours)
        cfg = validate_experiment(experiment, f"{path} (metadata {EXPERIMENT_KEY})")
        return cls(cfg, runtime, resolution, metadata[ARCHITECTURE_KEY])

    def forward(self, x):
        """Logits [N, C, R, R] of input x [N, 3, R, R] (a CPU tensor), as a CPU tensor."""
        logits = self.runtime.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(logits)


def check_images(segmenter, inputs=()) -> tuple:
    """(images, note) to check an export of `segmenter` on: the images (uint8 RGB) of `inputs` (image files and
    folders), else those of the experiment's testing_path, else NOISE_IMAGES random-noise images at the network's
    resolution, with a note saying so (None otherwise)."""
    if inputs:
        paths = []
        for path in inputs:
            if os.path.isdir(path):
                found = list_images(path)
                if not found:
                    raise ValueError(f"{path}: no images in this folder (expected {', '.join(IMAGE_EXTENSIONS)})")
                paths += found
            elif os.path.isfile(path):
                paths.append(path)
            else:
                raise FileNotFoundError(f"check image {path!r} does not exist")
        return [read_image(path) for path in paths], None
    testing_path = segmenter.cfg.testing_path
    paths = list_images(testing_path) if os.path.isdir(testing_path) else []
    if paths:
        return [read_image(path) for path in paths], None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*segmenter.resolution, 3), dtype=np.uint8) for _ in range(NOISE_IMAGES)]
    return images, (f"note: no images in testing_path {testing_path!r}; checking on {NOISE_IMAGES} random-noise "
                    "images instead")


def _labels(logits, size):
    """The labels NetworkSegmenter.segment gives for these logits at an image's size."""
    return segment_logits(logits, size, uncertainty=softmax_entropy)[0]


@torch.no_grad()
def check_export(segmenter, onnx_segmenter, images) -> dict:
    """How far `onnx_segmenter` is from `segmenter` on `images` (uint8 RGB arrays [H, W, 3]): {"images",
    "pixels_differing" (labels at each image's size), "max_abs_logit_diff"}."""
    differing, max_diff = 0, 0.0
    # One image at a time, so memory stays that of one image however many are checked.
    for image in images:
        image = as_rgb(image)
        x = segmenter.input_tensor([image])
        expected = segmenter.forward(x).float().cpu()
        got = onnx_segmenter.forward(x.cpu())
        max_diff = max(max_diff, (expected - got).abs().max().item())
        differing += int((_labels(expected, image.shape[:2]) != _labels(got, image.shape[:2])).sum())
    return {"images": len(images), "pixels_differing": differing, "max_abs_logit_diff": max_diff}
