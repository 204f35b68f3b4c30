"""The fast recipe's pieces that claim exactness: a projection at native resolution equals projecting the
upsampled features, a member trained on projected features folds into an original-format member that gives the
same logits on all features, and the sampler's epochs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_seg.ensemble import MLPEnsemble, predict_logits
from ddpm_seg.feature_store import FeatureStore, PixelSampler
from ddpm_seg.projection import fit_projection, fold_member, project_store, top_eigenvectors

SIZE = (24, 20)
SHAPES = [(6, 6, 5), (40, 12, 10), (5, 6, 5), (30, 3, 3)]  # two maps share the 6x5 table


def random_store(dtype=torch.float32, images=3):
    torch.manual_seed(0)
    store = FeatureStore(SHAPES, SIZE, images, dtype=dtype)
    maps = [[torch.randn(c, h, w) * (k + 1) + k for k, (c, h, w) in enumerate(SHAPES)] for _ in range(images)]
    for i, image_maps in enumerate(maps):
        store.put(i, image_maps)
    return store, maps


def upsampled(maps):
    return torch.cat([F.interpolate(m[None], size=SIZE, mode="bilinear", align_corners=False)[0] for m in maps])


def test_projecting_at_native_resolution_equals_projecting_the_upsampled_features():
    store, maps = random_store()
    projection = fit_projection(store, width=8, seed=0)
    assert projection.widths == [8, 8, 8]  # tables 6x5 (11 channels), 12x10 (40), 3x3 (30)
    projected = project_store(store, projection)
    img, ys, xs = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 5, 23, 11]), torch.tensor([0, 19, 3, 10])
    ours = torch.cat(projected.gather_tables(img, ys, xs), dim=1)
    for p, (i, y, x) in enumerate(zip(img, ys, xs)):
        full = upsampled(maps[i])[:, y, x]  # every feature of the pixel, in feature order
        expected = []
        for blocks, mean, basis in zip(store.blocks, projection.means, projection.bases):
            columns = torch.cat([full[f:f + c] for f, _, c in sorted(blocks, key=lambda b: b[1])])
            expected.append((columns - mean) @ basis)
        assert torch.allclose(ours[p], torch.cat(expected), atol=1e-4)


def test_a_folded_member_gives_the_trained_members_logits_on_all_features():
    store, maps = random_store()
    projection = fit_projection(store, width=8, seed=0)
    trainee = MLPEnsemble(sum(projection.widths), 4, 2, seed=3)
    with torch.no_grad():  # batch norms away from their initial identity, as after training
        for bn in (trainee.bn1, trainee.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
        trainee.fc1.bias.normal_()
    target = MLPEnsemble(store.num_features, 4, 2, seed=9)
    for m in range(2):
        fold_member(target, trainee, projection, store.blocks, m)
    trainee.eval()
    projected = project_store(store, projection)
    for i in range(3):
        folded = predict_logits(target, maps[i], SIZE)
        narrow = predict_logits(trainee, projected.maps(i), SIZE)
        assert torch.allclose(folded, narrow, atol=1e-3, rtol=1e-4)
        assert folded.abs().max() > 0.1


def test_a_table_narrower_than_the_width_keeps_every_direction():
    store, _ = random_store()
    projection = fit_projection(store, width=64, seed=0)
    assert projection.widths == [11, 40, 30]
    for basis in projection.bases:  # a rotation of the whole space
        assert torch.allclose(basis.t() @ basis, torch.eye(basis.shape[1]), atol=1e-5)


def test_the_basis_spans_the_principal_directions_rotated_and_scaled():
    store, _ = random_store()
    projection = fit_projection(store, width=8, seed=0, fit_rows=10**6)
    table = store._tables[1].reshape(-1, 40).float()  # the 12x10 table, 40 channels
    centred = table - table.mean(0)
    top = torch.linalg.eigh(centred.t() @ centred)[1][:, -8:]
    basis = projection.bases[1]
    assert torch.allclose(basis.t() @ basis, torch.eye(8) * 40 / 8, atol=1e-3)  # orthogonal, scaled by sqrt(C/k)
    spanned = top @ (top.t() @ basis)  # basis projected on the true principal subspace: unchanged
    assert torch.allclose(spanned, basis, atol=1e-3)
    # Rotated: no column is (nearly) one principal direction.
    assert (top.t() @ (basis / basis.norm(dim=0))).abs().max() < 0.95


def test_subspace_iteration_finds_the_leading_eigenvectors():
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(200, 200, generator=generator))[0]
    values = torch.cat([torch.tensor([50.0, 40, 30, 20, 10]), torch.rand(195, generator=generator)])
    matrix = q @ torch.diag(values) @ q.t()
    vectors = top_eigenvectors(matrix, 5, torch.Generator().manual_seed(1))
    assert torch.allclose((vectors.t() @ q[:, :5]).abs(), torch.eye(5), atol=1e-4)


def test_an_epoch_serves_a_fresh_share_of_the_pixels():
    labels = torch.zeros(2, 10, 10, dtype=torch.long)
    labels[0, 0, :5] = 255
    sampler = PixelSampler(labels)
    assert len(sampler) == 195
    stream = sampler.stream(seed=0, batch_size=16, fraction=0.25)
    epochs = {}
    for _ in range(4 * sampler.steps_per_epoch(16, 0.25)):
        epoch, batch = next(stream)
        epochs.setdefault(epoch, []).append(batch)
    assert sorted(epochs) == [0, 1, 2, 3]
    served = [torch.cat(b) for b in epochs.values()]
    assert all(len(s) == 49 and len(set(s.tolist())) == 49 for s in served)  # ceil(0.25 x 195), no repeats
    assert len({tuple(sorted(s.tolist())) for s in served}) == 4
    full = sampler.stream(seed=0, batch_size=16)
    assert sum(len(next(full)[1]) for _ in range(sampler.steps_per_epoch(16))) == 195
    with pytest.raises(ValueError, match="fraction"):
        next(sampler.stream(seed=0, batch_size=16, fraction=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projected_store_keeps_the_store_dtype(dtype):
    store, _ = random_store(dtype)
    projected = project_store(store, fit_projection(store, 4))
    assert projected.dtype == dtype and projected.num_features == 12
    assert np.isfinite(projected.maps(0)[0].float().numpy()).all()
