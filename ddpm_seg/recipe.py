"""How the ensemble members are trained from a FeatureStore: the paper's recipe, or the fast one.

paper: every labelled pixel in every epoch, batch 64 (the config's), Adam lr 1e-3, all features, and the
    original stopping rule (from epoch index 4 on, a member stops after 50 batches without a new best loss).
fast (default): what the features hold, at a fraction of the work.
    - the members train on a fixed projection of the features, the top PROJECTION_WIDTH principal directions
      of each resolution's maps, computed once at native resolution (exact under bilinear upsampling; see
      projection.py) and folded back into members of the original format when they are saved;
    - an epoch serves a fresh random share of the labelled pixels equal to the finest map's positions per
      image pixel (a 128x128 map under 256x256 images: a quarter): no feature varies faster than that;
    - batch 1024 with lr 1e-3 * sqrt(1024 / 64) = 4e-3, and a fixed length: FAST_EPOCHS epochs and PATIENCE + 1
      steps, the shortest run the original rule allows.
"""

import dataclasses
import math
import time

from .ensemble import PAPER_BATCH, PATIENCE, scaled_lr, train_ensemble
from .projection import projected_trainee

RECIPES = ("fast", "paper")
FAST_BATCH = 1024  # pixels per member per step
PROJECTION_WIDTH = 512  # principal directions kept per resolution table
# Epochs per member: with the PATIENCE + 1 steps after them, the original rule's shortest run. On the demo's
# validation split it scores within seed noise of that rule, which stops most members in their fifth epoch.
FAST_EPOCHS = 4


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    batch_size: int
    lr: float
    pixel_fraction: float  # share of the labelled pixels one epoch serves
    projection_width: int = None  # None: the members see every feature
    epochs: int = None  # None: the original stopping rule; else FAST_EPOCHS epochs and PATIENCE + 1 steps

    def steps(self, sampler):
        """Steps every member trains, or None where the stopping rule decides."""
        if self.epochs is None:
            return None
        return self.epochs * sampler.steps_per_epoch(self.batch_size, self.pixel_fraction) + PATIENCE + 1

    def for_maps(self, map_shapes, image_size):
        """This recipe for features of `map_shapes` under images of `image_size`: the fast one serves the finest
        map's share of the pixels per epoch; the paper's every pixel."""
        if self.name == "paper":
            return self
        return dataclasses.replace(self, pixel_fraction=finest_share(map_shapes, image_size))

    def settings(self):
        """What of the recipe a run folder records (a resume with other values is refused)."""
        return {"recipe": self.name, "batch_size": self.batch_size, "lr": self.lr,
                "pixel_fraction": self.pixel_fraction, "projection_width": self.projection_width,
                "epochs": self.epochs}


def finest_share(map_shapes, image_size):
    """Positions of the finest map per image pixel, at most 1."""
    return min(1.0, max(h * w for _, h, w in map_shapes) / (image_size[0] * image_size[1]))


def make_recipe(name, batch_size=None, lr=None, epochs=FAST_EPOCHS, projection_width=PROJECTION_WIDTH,
                config_batch=PAPER_BATCH):
    """The recipe `name`, checked. batch_size and lr None take the recipe's own (paper: config_batch, the
    experiment's; lr scaled_lr(batch)); under the fast recipe epochs 0 means the original stopping rule and
    projection_width 0 no projection. Its pixel share is set by for_maps once the feature maps are known."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {name!r}")
    if batch_size is None:
        batch_size = config_batch if name == "paper" else FAST_BATCH
    if batch_size < 2:
        raise ValueError(f"--batch_size must be at least 2 (batch norm needs 2 pixels), got {batch_size}")
    lr = scaled_lr(batch_size) if lr is None else lr
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be positive, got {lr}")
    if epochs < 0 or projection_width < 0:
        raise ValueError(f"--epochs and --projection_width must be >= 0 (0: the paper's stopping rule, no "
                         f"projection), got {epochs} and {projection_width}")
    if name == "paper":
        return Recipe(name, batch_size, lr, 1.0)
    return Recipe(name, batch_size, lr, 1.0, projection_width or None, epochs or None)


def train_members(ensemble, store, sampler, recipe, *, seed, members=None, device=None, matmul_dtype=None,
                  max_epochs=100, on_member_done=None, progress=True):
    """Train the listed members of `ensemble` (on all of store's features) by `recipe`, none longer than
    max_epochs; on_member_done(m) is called once member m holds its final weights (save it there). Returns
    (train_ensemble's stats, timings)."""
    timings = {}
    trainee, train_store, fold = ensemble, store, None
    if recipe.projection_width is not None:
        start = time.time()
        projection, train_store, trainee, fold = projected_trainee(ensemble, store, recipe.projection_width, seed)
        timings["project_s"] = time.time() - start
        if progress:
            print(f"features projected to {train_store.num_features} principal directions "
                  f"({' + '.join(map(str, projection.widths))} over {len(projection.widths)} resolutions) in "
                  f"{timings['project_s']:.1f} s; each epoch serves {100 * recipe.pixel_fraction:.3g}% of the "
                  "labelled pixels")

    def done(m):
        if fold is not None:  # the trainee's member into ensemble's, before it is saved
            fold(m)
        if on_member_done is not None:
            on_member_done(m)

    # A RAM store goes to the GPU whole for fast gathers; a disk store was chosen because it does not fit.
    if device is not None and device.type != "cpu" and train_store.root is None:
        train_store = train_store.to(device)
    stats = train_ensemble(trainee, train_store, sampler, seed=seed, batch_size=recipe.batch_size, lr=recipe.lr,
                           members=members, device=device, matmul_dtype=matmul_dtype, max_epochs=max_epochs,
                           pixel_fraction=recipe.pixel_fraction, steps=recipe.steps(sampler), on_member_done=done,
                           progress=progress)
    if trainee is not ensemble:
        ensemble.to(trainee.fc1.weight.device)
    return stats, timings
