"""A fixed linear projection of the training features, fitted once at native resolution.

Most of a pixel's features are bilinear interpolations of coarse maps (at 256x256, 6144 of the paper's 8448
features live on a 32x32 grid), and the first Linear of every member is a linear map of them. A projection
P_t (the top principal directions of resolution table t, after subtracting its mean mu_t) commutes with
bilinear upsampling, because the interpolation weights sum to one (any linear map does; fit_projection's is
the principal subspace, rotated and scaled so that Adam trains on it as on the original features):

    upsample(P_t^T (x - mu_t)) = P_t^T (upsample(x) - mu_t)

so it is applied once per native position instead of once per pixel, and the members train on the narrow
projected features. Their first layer W' [h1, k] then folds back into one of the original shape:

    W' P^T (x - mu) + b' = (W' P^T) x + (b' - W' P^T mu)

which is saved in the original per-member format: prediction, predict and every reader of model_{i}.pth see
an ordinary member on all `dim` features.
"""

import torch

from .ensemble import MLPEnsemble
from .feature_store import FeatureStore

# Rows (native positions) a table's principal directions are estimated from: enough for a few hundred
# directions of a few thousand channels, and it bounds the fit's memory (16384 x 6144 float32 = 400 MB).
FIT_ROWS = 16384


class Projection:
    """Per resolution table t of a FeatureStore: mean [C_t] and basis [C_t, k_t] (float32): projected features
    are (x - mean) @ basis."""

    def __init__(self, means, bases):
        self.means, self.bases = means, bases

    @property
    def widths(self):
        return [basis.shape[1] for basis in self.bases]


def fit_projection(store, width, seed=0, fit_rows=FIT_ROWS):
    """The span of the top k = min(width, C_t) principal directions of each table of `store` (C_t channels),
    estimated from up to fit_rows native positions drawn at random (seeded) over all its images, as a basis
    [C_t, k]: the directions randomly rotated within their span and scaled by sqrt(C_t / k). A table no wider
    than `width` keeps its whole space (a rotation)."""
    generator = torch.Generator().manual_seed(seed)
    means, bases = [], []
    for table in store._tables:
        rows = table.reshape(-1, table.shape[-1])
        if rows.shape[0] > fit_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:fit_rows].sort().values]
        centred = rows.to("cpu", torch.float32, copy=True)
        mean = centred.mean(0)
        centred -= mean
        covariance = centred.t() @ centred
        del centred
        channels = table.shape[-1]
        k = min(width, channels)
        # Adam steps every input coordinate by about lr whatever its scale. In the principal basis the signal sits
        # in a few coordinates, and a member learns along it ~sqrt(C/k) times slower than on the original
        # features, where it is spread over all C channels (on the bench's quality task: 70.6 mIoU against 85.7).
        # A random rotation spreads it over the k coordinates again, and sqrt(C/k) gives each step the
        # original's reach.
        rotation = torch.linalg.qr(torch.randn(k, k, generator=generator))[0]
        bases.append(top_eigenvectors(covariance, k, generator) @ rotation * (channels / k) ** 0.5)
        means.append(mean)
    return Projection(means, bases)


def top_eigenvectors(matrix, k, generator, iterations=6, spare=16):
    """The k leading eigenvectors [C, k] of a symmetric positive semi-definite matrix [C, C], largest first.
    A full eigendecomposition of a 6144-wide covariance takes ~50 s on 2 cores; subspace iteration from a
    seeded start (k + spare columns, re-orthonormalised each time) needs a few [C, C] x [C, k] products."""
    size = matrix.shape[0]
    if size <= 2 * (k + spare):
        return torch.linalg.eigh(matrix.double())[1][:, -k:].flip(1).float().contiguous()
    basis = torch.linalg.qr(torch.randn(size, k + spare, generator=generator))[0]
    for _ in range(iterations):
        basis = torch.linalg.qr(matrix @ basis)[0]
    small = (basis.t() @ matrix @ basis).double()
    vectors = torch.linalg.eigh((small + small.t()) / 2)[1][:, -k:].flip(1).float()
    return (basis @ vectors).contiguous()


@torch.no_grad()
def project_store(store, projection, chunk=4096):
    """A RAM FeatureStore of the projected features: one map per table, [k_t, h_t, w_t], in store's dtype."""
    shapes = [(k, h, w) for k, (h, w) in zip(projection.widths, store.table_sizes)]
    out = FeatureStore(shapes, store.image_size, store.num_images, dtype=store.dtype)
    for t, (table, mean, basis) in enumerate(zip(store._tables, projection.means, projection.bases)):
        source = table.reshape(-1, table.shape[-1])
        target = out._tables[t].view(-1, basis.shape[1])
        for begin in range(0, source.shape[0], chunk):
            # chunk rows at a time: a float32 copy of a whole table would be the run's peak memory.
            block = source[begin:begin + chunk].to("cpu", torch.float32, copy=True)
            target[begin:begin + chunk] = (block.sub_(mean) @ basis).to(store.dtype)
    out._complete[:] = True
    return out


@torch.no_grad()
def fold_first_layer(weight, bias, projection, blocks, dim):
    """(weight [A, out, dim], bias [A, out]) of the first Linear on all features equal to `weight` [A, out,
    sum k_t] and `bias` [A, out] applied to the projected features; blocks: the store's column layout."""
    full = weight.new_zeros(weight.shape[0], weight.shape[1], dim)
    folded_bias = bias.clone()
    start = 0
    for table_blocks, mean, basis in zip(blocks, projection.means, projection.bases):
        k = basis.shape[1]
        table_weight = weight[:, :, start:start + k] @ basis.t().to(weight)  # [A, out, C_t]
        folded_bias -= table_weight @ mean.to(weight)
        for feature, column, c in table_blocks:
            full[:, :, feature:feature + c] = table_weight[:, :, column:column + c]
        start += k
    return full, folded_bias


@torch.no_grad()
def fold_member(target, trainee, projection, blocks, m):
    """Write member m of `trainee` (an MLPEnsemble trained on the projected features) into member m of `target`
    (an MLPEnsemble on all features): the first layer folded through the projection, the rest copied."""
    for name in ("bn1", "fc2", "bn2", "fc3"):
        source = getattr(trainee, name).member_state(m)
        for key, value in getattr(target, name).member_state(m).items():
            value.copy_(source[key])  # member_state gives views: writes go through
    weight, bias = fold_first_layer(trainee.fc1.weight[m:m + 1], trainee.fc1.bias[m:m + 1], projection, blocks,
                                    target.dim)
    target.fc1.weight[m].copy_(weight[0])
    target.fc1.bias[m].copy_(bias[0])


def projected_trainee(ensemble, store, width, seed):
    """What training `ensemble`'s members on store's features projected to `width` directions per resolution
    needs: (projection, the projected RAM store, a trainee MLPEnsemble on it with ensemble's classes, members and
    seed, fold(m) writing the trainee's member m into `ensemble`)."""
    projection = fit_projection(store, width, seed=seed)
    projected = project_store(store, projection)
    trainee = MLPEnsemble(projected.num_features, ensemble.num_classes, ensemble.num_members, seed=seed)
    return projection, projected, trainee, lambda m: fold_member(ensemble, trainee, projection, store.blocks, m)
