"""Backbone registry: each backbone is one module that registers a builder under its model_type.

A builder takes (cfg, model_flags, device, seed, random_init) and returns a feature extractor: a callable
mapping one uint8 image [H, W, 3] (numpy) to a list of activation maps [C, h, w] at their native resolution,
in the order the experiment's `dim[-1]` features are concatenated. The feature store, the ensemble and the
evaluation never look further than that list, so adding a backbone touches only its own file.
"""

BACKBONES = {}


def register(model_type: str):
    def wrap(builder):
        BACKBONES[model_type] = builder
        return builder

    return wrap


def create_feature_extractor(cfg: dict, model_flags: dict, device, seed: int = 0, random_init: bool = False):
    # Import the built-in backbones so they register themselves.
    from . import ddpm, mae, pixels, swav  # noqa: F401

    model_type = cfg["model_type"]
    if model_type not in BACKBONES:
        raise ValueError(f"unknown model_type {model_type!r}; available backbones: {sorted(BACKBONES)}")
    return BACKBONES[model_type](cfg, model_flags, device, seed, random_init)
