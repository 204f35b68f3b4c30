import os

import pytest
import torch
import torch.nn.functional as F

from ddpm_seg.feature_store import FeatureStore, PixelSampler

IMAGE_SIZE = (12, 10)
# Coarser, equal, finer than the image; square and not.
MAP_SHAPES = [(3, 5, 7), (2, 12, 10), (4, 16, 20), (5, 3, 2), (2, 6, 5)]


def random_images(num_images, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) for shape in MAP_SHAPES] for _ in range(num_images)]


def naive_features(images):
    """The original path: every map upsampled to full size in float32, then concatenated -> [N, D, H, W]."""
    return torch.stack([
        torch.cat([F.interpolate(m[None], IMAGE_SIZE, mode="bilinear", align_corners=False)[0] for m in maps])
        for maps in images
    ])


def all_pixels(num_images):
    grid = torch.meshgrid(torch.arange(num_images), torch.arange(IMAGE_SIZE[0]), torch.arange(IMAGE_SIZE[1]),
                          indexing="ij")
    return [g.reshape(-1) for g in grid]


def filled_store(images, **kwargs):
    store = FeatureStore(MAP_SHAPES, IMAGE_SIZE, len(images), **kwargs)
    for i, maps in enumerate(images):
        store.put(i, maps)
    return store


def test_gather_equals_interpolate_then_index():
    images = random_images(3)
    store = filled_store(images, dtype=torch.float32)
    img, ys, xs = all_pixels(3)
    expected = naive_features(images)[img, :, ys, xs]
    got = store.gather(img, ys, xs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    # A random subset in random order, with repeats, picks the same rows.
    pick = torch.randint(0, img.numel(), (50,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(store.gather(img[pick], ys[pick], xs[pick]), got[pick])
    assert store.num_features == sum(c for c, _, _ in MAP_SHAPES)


def test_float16_store_within_half_precision():
    images = random_images(2)
    store = filled_store(images)  # float16 by default
    assert store.nbytes == 2 * sum(c * h * w for c, h, w in MAP_SHAPES) * 2
    img, ys, xs = all_pixels(2)
    expected = naive_features(images)[img, :, ys, xs]
    assert (store.gather(img, ys, xs) - expected).abs().max().item() <= 4e-3  # |x| < 5, fp16 ulp 2^-11
    as_bf16 = store.gather(img, ys, xs, out_dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert (as_bf16.float() - expected).abs().max().item() <= 4e-2


def test_memmap_store_equals_ram_store_and_resumes(tmp_path):
    images = random_images(3)
    root = str(tmp_path / "features")
    ram = filled_store(images)
    disk = FeatureStore(MAP_SHAPES, IMAGE_SIZE, 3, root=root)
    disk.put(0, images[0])
    disk.put(2, images[2])
    assert disk.missing() == [1]

    # An interrupted extraction reopens with what it had; the same constructor call resumes.
    resumed = FeatureStore(MAP_SHAPES, IMAGE_SIZE, 3, root=root)
    assert resumed.missing() == [1]
    resumed.put(1, images[1])
    reopened = FeatureStore.open(root)
    assert reopened.missing() == [] and reopened.dtype == torch.float16
    img, ys, xs = all_pixels(3)
    assert torch.equal(reopened.gather(img, ys, xs), ram.gather(img, ys, xs))
    for got, want in zip(reopened.maps(2), ram.maps(2)):
        assert torch.equal(got, want)
    in_memory = reopened.to("cpu")
    assert in_memory.root is None and torch.equal(in_memory.gather(img, ys, xs), ram.gather(img, ys, xs))

    with pytest.raises(ValueError, match="map_shapes"):
        FeatureStore(MAP_SHAPES[:-1], IMAGE_SIZE, 3, root=root)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        FeatureStore.open(str(tmp_path / "nothing"))


def test_put_rejects_wrong_maps():
    store = FeatureStore(MAP_SHAPES, IMAGE_SIZE, 2)
    maps = random_images(1)[0]
    with pytest.raises(ValueError, match="map 1 has shape"):
        store.put(0, [maps[0], maps[0]] + maps[2:])
    with pytest.raises(ValueError, match="expected 5 maps"):
        store.put(0, maps[:4])
    with pytest.raises(ValueError, match="out of range"):
        store.put(2, maps)


def labels_with_holes(seed=0, ignore=255):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (2, 5, 7), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = ignore
    return labels


def take_epochs(stream, num_epochs):
    epochs = [[] for _ in range(num_epochs)]
    for epoch, batch in stream:
        if epoch == num_epochs:
            return [torch.cat(e) for e in epochs], [len(b) for b in epochs[0]]
        epochs[epoch].append(batch)


def test_sampler_covers_each_labelled_pixel_once_per_epoch():
    labels = labels_with_holes()
    sampler = PixelSampler(labels, ignore_label=255)
    valid = torch.nonzero(labels.reshape(-1) != 255).squeeze(1)
    assert len(sampler) == valid.numel() < labels.numel()
    epochs, _ = take_epochs(sampler.stream(seed=3, batch_size=8), 3)
    for order in epochs:
        assert torch.equal(order.sort().values, valid)
        img, ys, xs, target = sampler.lookup(order)
        assert torch.equal(labels[img, ys, xs], target) and (target != 255).all()
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_member_streams_differ_and_repeat():
    sampler = PixelSampler(labels_with_holes())
    first, _ = take_epochs(sampler.stream(seed=1, batch_size=8), 1)
    again, _ = take_epochs(sampler.stream(seed=1, batch_size=8), 1)
    other, _ = take_epochs(sampler.stream(seed=2, batch_size=8), 1)
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other[0])


def test_single_pixel_tail_joins_previous_batch():
    labels = torch.full((1, 3, 4), 255)
    labels.view(-1)[:9] = 1
    _, sizes = take_epochs(PixelSampler(labels).stream(seed=0, batch_size=4), 1)
    assert sizes == [4, 5]
    with pytest.raises(ValueError, match="labelled pixels"):
        PixelSampler(torch.full((1, 3, 4), 255))


def test_maps_of_one_resolution_share_a_table_and_parts_hold_their_columns():
    shapes = [(3, 4, 4), (2, 8, 8), (5, 4, 4), (1, 8, 8)]  # two resolutions, interleaved in feature order
    store = FeatureStore(shapes, (8, 8), 2, dtype=torch.float32)
    assert store.table_sizes == [(4, 4), (8, 8)]
    assert store.blocks == [[(0, 0, 3), (5, 3, 5)], [(3, 0, 2), (10, 2, 1)]]
    gen = torch.Generator().manual_seed(0)
    images = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    for i, maps in enumerate(images):
        store.put(i, maps)
        assert all(torch.equal(a, b) for a, b in zip(store.maps(i), maps))
    img, ys, xs = (torch.tensor(v) for v in ([0, 1, 1], [0, 3, 7], [5, 2, 7]))
    full = store.gather(img, ys, xs)
    for part, blocks in zip(store.gather_tables(img, ys, xs), store.blocks):
        assert part.shape[1] == sum(c for _, _, c in blocks)
        for feature, column, c in blocks:
            assert torch.equal(part[:, column:column + c], full[:, feature:feature + c])


def test_bfloat16_store_in_ram_and_on_disk(tmp_path):
    images = random_images(2)
    ram = filled_store(images, dtype=torch.bfloat16)
    assert ram.nbytes == 2 * sum(c * h * w for c, h, w in MAP_SHAPES) * 2
    img, ys, xs = all_pixels(2)
    expected = naive_features(images)[img, :, ys, xs]
    assert (ram.gather(img, ys, xs) - expected).abs().max().item() <= 4e-2  # |x| < 5, bf16 ulp 2^-8
    root = str(tmp_path / "bf16")
    disk = filled_store(images, dtype=torch.bfloat16, root=root)
    assert os.path.isfile(os.path.join(root, "table0.bf16"))
    reopened = FeatureStore.open(root)
    assert reopened.dtype == torch.bfloat16
    assert torch.equal(reopened.gather(img, ys, xs), ram.gather(img, ys, xs))
    assert torch.equal(disk.maps(1)[2], ram.maps(1)[2])
