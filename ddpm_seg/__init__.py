"""ddpm-seg: label-efficient semantic segmentation with diffusion-model features."""

__version__ = "0.1.0"
