"""The paper's pixel classifier ensemble: M small MLPs trained and evaluated as one batched module.

Each member is the original `pixel_classifier`:
    Linear(dim, h1) -> ReLU -> BatchNorm1d(h1) -> Linear(h1, h2) -> ReLU -> BatchNorm1d(h2) -> Linear(h2, C)
with (h1, h2) = (128, 32), or (256, 128) when there are 30 classes or more. Instead of training the
members one after the other, weights are stacked as [M, out, in] and every step runs all members at
once with bmm, each on its own pixel batch. Members save to and load from the original per-member
checkpoint format (`model_{i}.pth` holding a DataParallel state dict).
"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.checkpoint import mismatch_report, safe_load

from .device import keep_freed_memory

from .files import atomic_torch_save

from .progress import progress_bar

from .seeding import derive_seed

PAPER_BATCH, PAPER_LR = 64, 1e-3  # pixels per member per step, Adam learning rate
PATIENCE = 50  # the original stopping rule: batches without a new best loss before a member stops
# Our layer name -> index of the same layer in the original nn.Sequential (`module.layers.<i>`).
OFFICIAL_LAYERS = {"fc1": 0, "bn1": 2, "fc2": 3, "bn2": 5, "fc3": 6}


def hidden_sizes(num_classes):
    return (256, 128) if num_classes >= 30 else (128, 32)


def scaled_lr(batch_size):
    """Adam's lr for `batch_size` pixels per member per step: the paper's 1e-3 at its batch of 64, scaled
    by sqrt(batch_size / 64). At batch 1024 over the same pixels (16x fewer steps), 4e-3 matched the
    paper recipe's mIoU in our quality check, while 1e-3 fell ~12 points short."""
    return PAPER_LR * (batch_size / PAPER_BATCH) ** 0.5


def member_seed(seed, m):
    """Seed of member m: depends only on (seed, m), so a member is the same however many are trained."""
    return derive_seed(seed, m)


class _FirstLayer(torch.autograd.Function):
    """z [A, B, out] = bias + x @ weight^T for features that arrive as parts: x is the concatenation, in
    feature order, of the column blocks `blocks[j]` = [(first feature, first column in part j, width)]
    of parts[j] [A, B, C_j] (a FeatureStore's per-resolution tables).

    The product runs in the parts' dtype (bfloat16 under mixed precision: float32 accumulation in
    the matmul) and everything else in the weight's dtype. Gradients go to weight and bias only
    (features are data). Written by hand rather than with autocast because the cast weight and the
    gradient are laid out per part straight away, and no [A, B, dim] concatenation is ever built:
    at batch 512 per member that copy costs as much as the first layer's forward matmul.
    """

    @staticmethod
    def forward(ctx, weight, bias, blocks, *parts):
        z = None
        for part, part_weight in zip(parts, _part_weights(weight, blocks, parts)):
            product = torch.bmm(part, part_weight.transpose(1, 2)).to(weight.dtype)
            z = product if z is None else z.add_(product)
        ctx.blocks = blocks
        ctx.save_for_backward(*parts)
        return z.add_(bias.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_z):
        parts = ctx.saved_tensors
        grad_weight = grad_z.new_empty(grad_z.shape[0], grad_z.shape[2],
                                       sum(c for blocks in ctx.blocks for _, _, c in blocks))
        # grad_z^T @ part, with grad_z^T made contiguous (it is small): with both operands row-major the
        # bf16 matmul runs ~1.6x faster on CPU than part^T @ grad_z.
        grad_t = grad_z.transpose(1, 2).to(parts[0].dtype).contiguous()
        for part, blocks in zip(parts, ctx.blocks):
            product = torch.bmm(grad_t, part)
            for feature, column, c in blocks:
                grad_weight[:, :, feature:feature + c] = product[:, :, column:column + c]
        return (grad_weight, grad_z.sum(1), None) + (None,) * len(parts)


def _part_weights(weight, blocks, parts):
    """weight [A, out, dim] rearranged into one [A, out, C_j] matrix per part, in the parts' dtype."""
    out = []
    for part, part_blocks in zip(parts, blocks):
        part_weight = weight.new_empty(weight.shape[0], weight.shape[1], part.shape[2], dtype=part.dtype)
        for feature, column, c in part_blocks:
            part_weight[:, :, column:column + c] = weight[:, :, feature:feature + c]
        out.append(part_weight)
    return out


class BatchedLinear(nn.Module):
    """M independent Linear layers: x [A, B, in] -> [A, B, out] for the members listed (all if None).
    weight is [M, out, in], each member laid out as nn.Linear's."""

    def __init__(self, num_members, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_members, out_features))

    def forward(self, x, members=None):
        weight, bias = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def forward_parts(self, parts, blocks, members=None):
        """The same layer over features given as parts [A, B, C_j] with column blocks (see _FirstLayer)."""
        weight, bias = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return _FirstLayer.apply(weight, bias, blocks, *parts)

    def member_state(self, m):
        return {"weight": self.weight[m], "bias": self.bias[m]}


class BatchedBatchNorm(nn.Module):
    """M independent BatchNorm1d layers over x [A, B, F]: member statistics over its own batch of B.

    Same semantics as nn.BatchNorm1d (biased batch variance to normalise, unbiased variance into the
    running average, momentum 0.1, eps 1e-5). Computed in the parameters' dtype (float32 even
    under autocast: batch statistics in bfloat16 would be too coarse).
    """

    def __init__(self, num_members, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_members, num_features))
        self.bias = nn.Parameter(torch.zeros(num_members, num_features))
        self.register_buffer("running_mean", torch.zeros(num_members, num_features))
        self.register_buffer("running_var", torch.ones(num_members, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_members, dtype=torch.long))

    def forward(self, x, members=None):
        sel = slice(None) if members is None else members
        x = x.to(self.weight.dtype)
        if self.training:
            n = x.shape[1]
            if n < 2:
                raise ValueError(f"batch norm needs more than 1 sample per member when training, got {n}")
            # Two passes by hand: Tensor.var over the middle dim is ~5x slower on CPU.
            mean = x.mean(1)
            var = (x - mean.unsqueeze(1)).square().mean(1)
            with torch.no_grad():
                mom = self.momentum
                self.running_mean[sel] = (1 - mom) * self.running_mean[sel] + mom * mean
                self.running_var[sel] = (1 - mom) * self.running_var[sel] + mom * var * (n / (n - 1))
                self.num_batches_tracked[sel] += 1
        else:
            mean, var = self.running_mean[sel], self.running_var[sel]
        scale = self.weight[sel] * torch.rsqrt(var + self.eps)
        return (x - mean.unsqueeze(1)) * scale.unsqueeze(1) + self.bias[sel].unsqueeze(1)

    def member_state(self, m):
        return {
            "weight": self.weight[m],
            "bias": self.bias[m],
            "running_mean": self.running_mean[m],
            "running_var": self.running_var[m],
            "num_batches_tracked": self.num_batches_tracked[m],
        }


def _fold(bn, fc, members):
    """(bias [A, 1, out], weight [A, in, out]) of fc(bn(x)) for a batch norm in eval mode."""
    sel = slice(None) if members is None else members
    scale = bn.weight[sel] * torch.rsqrt(bn.running_var[sel] + bn.eps)
    shift = bn.bias[sel] - bn.running_mean[sel] * scale
    weight = fc.weight[sel].transpose(1, 2)
    bias = fc.bias[sel].unsqueeze(1) + torch.bmm(shift.unsqueeze(1), weight)
    return bias, scale.unsqueeze(2) * weight


class MLPEnsemble(nn.Module):
    """`num_members` pixel classifiers as one module; forward(x [M, B, dim]) -> logits [M, B, num_classes]."""

    def __init__(self, dim, num_classes, num_members=10, seed=0):
        super().__init__()
        self.dim, self.num_classes, self.num_members = dim, num_classes, num_members
        h1, h2 = hidden_sizes(num_classes)
        self.fc1 = BatchedLinear(num_members, dim, h1)
        self.bn1 = BatchedBatchNorm(num_members, h1)
        self.fc2 = BatchedLinear(num_members, h1, h2)
        self.bn2 = BatchedBatchNorm(num_members, h2)
        self.fc3 = BatchedLinear(num_members, h2, num_classes)
        # The original init: Linear weights N(0, 0.02), biases 0; batch norm keeps weight 1, bias 0.
        with torch.no_grad():
            for m in range(num_members):
                gen = torch.Generator().manual_seed(member_seed(seed, m))
                for fc in (self.fc1, self.fc2, self.fc3):
                    # Drawn as [in, out]: the numbers our members had before weights took nn.Linear's
                    # [out, in] layout, so a seed still gives the same members.
                    fc.weight[m].copy_(torch.randn(fc.weight.shape[:0:-1], generator=gen).t() * 0.02)

    def forward(self, x, members=None, blocks=None):
        """Logits [A, B, C] for the A members listed in `members` (LongTensor; None = all M), from features
        x [A, B, dim], or from a list of parts [A, B, C_j] laid out as `blocks` says (see _FirstLayer).
        The first Linear multiplies in x's dtype (e.g. bfloat16), the rest runs in float32."""
        if blocks is None:
            x, blocks = [x], [[(0, 0, self.dim)]]
        return self.tail(self.fc1.forward_parts(x, blocks, members), members)

    def tail(self, z1, members=None):
        """Everything after the first Linear, from its output z1 [A, B, h1]."""
        if self.training:
            h = self.bn1(F.relu(z1), members)
            h = self.bn2(F.relu(self.fc2(h, members)), members)
            return self.fc3(h, members)
        # In eval mode a batch norm is an affine map: folded into the next Linear it costs nothing, and
        # on a full image the elementwise passes, not the matmuls, were most of the prediction time.
        bias, weight = _fold(self.bn1, self.fc2, members)
        h = F.relu(torch.baddbmm(bias, F.relu(z1).to(weight.dtype), weight))
        bias, weight = _fold(self.bn2, self.fc3, members)
        return torch.baddbmm(bias, h, weight)

    # ---- the original per-member checkpoint format ----

    def member_state_dict(self, m):
        """Member m as the state dict of the original DataParallel(pixel_classifier) (CPU copies)."""
        sd = {}
        for name, index in OFFICIAL_LAYERS.items():
            for key, value in getattr(self, name).member_state(m).items():
                sd[f"module.layers.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
        return sd

    def load_member_state_dict(self, m, sd, source="state dict"):
        """Load member m from an original-format state dict (keys with or without `module.`)."""
        ours = {k.removeprefix("module."): v for k, v in self.member_state_dict(m).items()}
        theirs = {k.removeprefix("module."): v for k, v in sd.items()}
        report = mismatch_report(ours, theirs)
        if report:
            raise ValueError(f"{source}: not a pixel classifier for dim={self.dim}, "
                             f"num_classes={self.num_classes}:\n{report}")
        with torch.no_grad():
            for name, index in OFFICIAL_LAYERS.items():
                for key, target in getattr(self, name).member_state(m).items():
                    target.copy_(theirs[f"layers.{index}.{key}"])  # member_state gives views: writes go through

    def save_member(self, path, m):
        """Write member m to `path` as the original `{'model_state_dict': ...}` checkpoint (atomically)."""
        atomic_torch_save({"model_state_dict": self.member_state_dict(m)}, path)

    def load_member(self, path, m):
        ckpt = safe_load(path, "pixel classifier checkpoint")
        if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
            raise ValueError(f"{path}: expected a dict with key 'model_state_dict'")
        self.load_member_state_dict(m, ckpt["model_state_dict"], source=path)


def _freeze_member(optimizer, m):
    """Pin member m's weights from now on.

    A stopped member gets exactly zero gradient (it is left out of the forward), but Adam would keep
    moving it along its first moment; with that moment zeroed, every later update is 0 / denom = 0.
    """
    for state in optimizer.state.values():
        state["exp_avg"][m].zero_()


def train_ensemble(
    ensemble,
    store,
    sampler,
    *,
    seed,
    batch_size=PAPER_BATCH,
    max_epochs=100,
    lr=None,
    members=None,
    device=None,
    matmul_dtype=None,
    pixel_fraction=1.0,
    steps=None,
    on_member_done=None,
    progress=True,
):
    """Train the listed members (default all) together, each with the original schedule and stopping rule.

    Member m draws its own shuffled stream of labelled pixels (seed member_seed(seed, m)), batch_size
    per step; an epoch is one pass over its stream. From epoch index 4 on (the original `epoch > 3`),
    each batch loss is compared with the member's best: a new best resets a counter, anything else
    increments it, and the member stops once the counter exceeds 50, or after max_epochs.
    on_member_done(m) is called as each member stops (save it there); members not listed are left
    untouched. matmul_dtype (e.g. torch.bfloat16) is the dtype of the first layer's matmuls, which
    hold nearly all the FLOPs; None keeps the weights' dtype. lr None means scaled_lr(batch_size). An epoch
    serves a fresh random pixel_fraction of the labelled pixels (1: all of them, the original epoch). With
    `steps` every member trains exactly that many steps instead (no stopping rule).
    Returns {m: {"steps", "epoch", "best_loss"}}.
    """
    keep_freed_memory()
    if device is not None:
        ensemble.to(device)
    device, dtype = ensemble.fc1.weight.device, ensemble.fc1.weight.dtype
    members = list(range(ensemble.num_members)) if members is None else sorted(set(members))
    if any(not 0 <= m < ensemble.num_members for m in members):
        raise ValueError(f"members {members} out of range [0, {ensemble.num_members})")
    if store.num_features != ensemble.dim:
        raise ValueError(f"store has {store.num_features} features per pixel, ensemble expects {ensemble.dim}")
    if store.image_size != sampler.image_size:
        raise ValueError(f"store image size {store.image_size} differs from label size {sampler.image_size}")
    used = sampler.labels[sampler.valid]
    if used.min() < 0 or used.max() >= ensemble.num_classes:
        raise ValueError(f"labels must lie in [0, {ensemble.num_classes}) or be ignored, found {used.min().item()}..{used.max().item()}")

    streams = {m: sampler.stream(member_seed(seed, m), batch_size, pixel_fraction) for m in members}
    stats = {m: {"steps": 0, "epoch": 0, "best_loss": 10000000.0} for m in members}  # original starts at 1e7
    patience = {m: 0 for m in members}
    # The fused kernel updates all members' 10M+ parameters in one pass: ~10x faster than the per-tensor
    # loop on CPU, and the optimizer step, not the matmuls, bounds a step at batch 64.
    lr = scaled_lr(batch_size) if lr is None else lr
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=lr, fused=dtype in (torch.float32, torch.float64)
                                 and device.type in ("cpu", "cuda"))
    ensemble.train()
    active = list(members)
    # Steps, with the epoch, the members still training and the loss beside them. Members stop by the original
    # rule from epoch index 4 on, mostly within the fifth epoch: the bar's total is 5 epochs of steps, and grows
    # by one epoch whenever training goes past it. In a redirected log it writes a line a minute, and a plain
    # summary line closes it.
    on_terminal = sys.stderr.isatty()
    epoch_steps = sampler.steps_per_epoch(batch_size, pixel_fraction)
    bar = progress_bar(total=5 * epoch_steps if steps is None else steps, desc="train ensemble", unit="step",
                       disable=not progress)
    start, last_loss = time.time(), float("nan")

    def finish(m):
        active.remove(m)
        _freeze_member(optimizer, m)
        if on_member_done is not None:
            on_member_done(m)

    while active:
        batches = {m: next(streams[m]) for m in active}
        for m in list(active):
            if batches[m][0] >= max_epochs:
                finish(m)
            else:
                stats[m]["epoch"] = batches[m][0]
        if not active:
            break
        # All streams have the same length and batch size, so the members' batches line up. Sorting a
        # batch changes its loss and gradient only by float rounding, and the gather reads nearby rows in order.
        idx = torch.stack([batches[m][1] for m in active]).sort(dim=1).values
        img, ys, xs, target = sampler.lookup(idx.view(-1))
        parts = [part.to(device, matmul_dtype or dtype, non_blocking=True).view(*idx.shape, -1)
                 for part in store.gather_tables(img, ys, xs)]
        target = target.to(device, non_blocking=True).view(idx.shape)
        sel = None if len(active) == ensemble.num_members else torch.tensor(active, device=device)
        logits = ensemble(parts, sel, blocks=store.blocks)
        losses = F.cross_entropy(logits.flatten(0, 1), target.view(-1), reduction="none")
        losses = losses.view(idx.shape).mean(1)
        optimizer.zero_grad()
        losses.sum().backward()  # members share no parameters: each gets exactly its own gradient
        optimizer.step()

        for m, loss in zip(list(active), losses.tolist()):
            stats[m]["steps"] += 1
            if steps is not None:
                if stats[m]["steps"] >= steps:
                    finish(m)
            elif stats[m]["epoch"] > 3:
                if loss < stats[m]["best_loss"]:
                    stats[m]["best_loss"], patience[m] = loss, 0
                else:
                    patience[m] += 1
                if patience[m] > PATIENCE:
                    finish(m)
        # refresh=False: the postfix is shown at the bar's next (rate-limited) redraw, not one record per step.
        last_loss = losses.mean().item()
        epoch = max(s["epoch"] for s in stats.values())
        if bar.n + 1 > bar.total:
            bar.total += epoch_steps
        bar.set_postfix(epoch=epoch + 1, training=f"{len(active)}/{len(members)}", loss=f"{last_loss:.4f}",
                        refresh=False)
        bar.update(1)
    bar.close()
    if progress and not on_terminal:
        print(f"trained members {members} in {time.time() - start:.0f} s: up to {max(s['steps'] for s in stats.values())} "
              f"steps and {max(s['epoch'] for s in stats.values()) + 1} epochs per member, last mean batch loss "
              f"{last_loss:.4f}", file=sys.stderr)
    return stats


@torch.no_grad()
def predict_logits(ensemble, maps, out_size, chunk=8192):
    """Logits [M, C, H, W] of every member for one image, given its maps [C_k, h_k, w_k] in feature order.

    The first Linear commutes with bilinear upsampling, so it is applied at each map's native
    resolution (maps of equal resolution together, one matmul) and only its [M * h1] output is
    upsampled, instead of the full dim-channel stack. The rest runs per pixel, `chunk` pixels at a
    time, with batch norm in eval mode.
    """
    device, dtype = ensemble.fc1.weight.device, ensemble.fc1.weight.dtype
    num_members, h1, dim = ensemble.fc1.weight.shape
    if sum(f.shape[0] for f in maps) != dim:
        raise ValueError(f"maps have {sum(f.shape[0] for f in maps)} channels in total, ensemble expects {dim}")
    groups = {}
    start = 0
    for fmap in maps:
        groups.setdefault(tuple(fmap.shape[1:]), []).append((start, fmap))
        start += fmap.shape[0]
    height, width = out_size
    z1 = None  # first-layer pre-activation at full resolution, channels-last: [1, M * h1, H, W] over [H, W, M * h1]
    for (h, w), items in groups.items():
        feats = torch.cat([f.to(device, dtype).reshape(f.shape[0], h * w) for _, f in items])
        weight = torch.cat([ensemble.fc1.weight[:, :, s:s + f.shape[0]] for s, f in items], dim=2)
        z = feats.t() @ weight.reshape(num_members * h1, feats.shape[0]).t()
        # Channels-last interpolation reads each source pixel's channels as one row: ~1.5x faster on CPU.
        z = F.interpolate(z.view(1, h, w, -1).permute(0, 3, 1, 2), size=out_size, mode="bilinear",
                          align_corners=False)
        z1 = z if z1 is None else z1.add_(z)
    z1 = z1.permute(0, 2, 3, 1).reshape(height * width, num_members, h1)
    bias = ensemble.fc1.bias.unsqueeze(1)

    out = torch.empty(num_members, ensemble.num_classes, height * width, device=device)
    was_training = ensemble.training
    ensemble.eval()
    try:
        for begin in range(0, height * width, chunk):
            out[:, :, begin:begin + chunk] = ensemble.tail(z1[begin:begin + chunk].transpose(0, 1) + bias).transpose(1, 2)
    finally:
        ensemble.train(was_training)
    return out.view(num_members, ensemble.num_classes, height, width)
