"""ddpm-seg: label-efficient semantic segmentation with diffusion-model features."""

__version__ = "0.1.0"


def __getattr__(name):
    # ddpm_seg.Interpreter, imported on first use so that `import ddpm_seg` (and `ddpm-seg --help`) stays light.
    if name == "Interpreter":
        from .interpreter import Interpreter

        return Interpreter
    raise AttributeError(f"module 'ddpm_seg' has no attribute {name!r}")
