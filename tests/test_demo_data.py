import glob
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from ddpm_seg.demo_data import DEMO_CLASS_NAMES, DEMO_PALETTE, MANIFEST_NAME, generate_demo_dataset

SMALL = dict(image_size=32, num_pool=6, num_train=8, num_test=5, num_val=5, seed=3)


def _files(root):
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if os.path.isfile(p))


def _load_pairs(folder):
    images = sorted(glob.glob(os.path.join(folder, "*.png")))
    return [(np.asarray(Image.open(p)), np.load(p[:-4] + ".npy")) for p in images]


def test_layout_shapes_and_ids(tmp_path):
    paths = generate_demo_dataset(str(tmp_path / "demo"), **SMALL)
    assert set(paths) == {"root", "train", "test", "val", "unlabelled", "manifest"}
    for split, count in [("train", 8), ("test", 5), ("val", 5)]:
        pairs = _load_pairs(paths[split])
        assert len(pairs) == count
        assert len(os.listdir(paths[split])) == 2 * count  # only image/label pairs
        for image, label in pairs:
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert label.shape == (32, 32) and label.dtype == np.uint8
            assert label.max() < len(DEMO_CLASS_NAMES)
    pool = sorted(os.listdir(paths["unlabelled"]))
    assert len(pool) == 6 and all(name.endswith(".png") for name in pool)
    assert np.asarray(Image.open(os.path.join(paths["unlabelled"], pool[0]))).shape == (32, 32, 3)
    assert len(DEMO_PALETTE) == 3 * len(DEMO_CLASS_NAMES)
    # Nothing of the temporary build folder is left beside the dataset.
    assert os.listdir(tmp_path) == ["demo"]


def test_every_class_appears_in_small_labelled_splits(tmp_path):
    paths = generate_demo_dataset(str(tmp_path / "demo"), **SMALL)
    for split in ("train", "test"):
        present = set(np.unique(np.stack([label for _, label in _load_pairs(paths[split])])))
        assert present == set(range(len(DEMO_CLASS_NAMES))), split


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_demo_dataset(str(tmp_path / "a"), **SMALL)["root"]
    b = generate_demo_dataset(str(tmp_path / "b"), **SMALL)["root"]
    c = generate_demo_dataset(str(tmp_path / "c"), **{**SMALL, "seed": 4})["root"]
    assert _files(a) == _files(b) == _files(c)
    for rel in _files(a):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    with open(os.path.join(a, "real/test/00000.png"), "rb") as fa, open(os.path.join(c, "real/test/00000.png"), "rb") as fc:
        assert fa.read() != fc.read()


def test_test_split_does_not_depend_on_pool_size(tmp_path):
    a = generate_demo_dataset(str(tmp_path / "a"), **SMALL)
    b = generate_demo_dataset(str(tmp_path / "b"), **{**SMALL, "num_pool": 2})
    for (ia, la), (ib, lb) in zip(_load_pairs(a["test"]), _load_pairs(b["test"])):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_idempotent_and_rebuilds_on_new_parameters(tmp_path):
    root = str(tmp_path / "demo")
    paths = generate_demo_dataset(root, **SMALL)
    marker = os.path.join(paths["train"], "00000.png")
    before = os.stat(marker).st_ino, os.stat(marker).st_mtime_ns
    generate_demo_dataset(root, **SMALL)
    assert (os.stat(marker).st_ino, os.stat(marker).st_mtime_ns) == before

    generate_demo_dataset(root, **{**SMALL, "num_test": 7})
    assert len(glob.glob(os.path.join(root, "real/test/*.png"))) == 7
    with open(os.path.join(root, MANIFEST_NAME)) as f:
        assert json.load(f)["num_test"] == 7
    assert os.listdir(tmp_path) == ["demo"]


def test_refuses_foreign_folder_and_bad_sizes(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo dataset"):
        generate_demo_dataset(str(foreign), **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_train"):
        generate_demo_dataset(str(tmp_path / "x"), **{**SMALL, "num_train": 0})


def _shape_miou_of_rgb_classifier(train_pairs, test_pairs):
    """Fit a class-balanced per-pixel classifier on RGB alone; mIoU over the shape classes on test."""
    def flat(pairs):
        x = np.concatenate([img.reshape(-1, 3) for img, _ in pairs]).astype(np.float64) / 255
        y = np.concatenate([lab.ravel() for _, lab in pairs])
        return x, y

    x_train, y_train = flat(train_pairs)
    x_test, y_test = flat(test_pairs)
    pred = LogisticRegression(max_iter=300, class_weight="balanced").fit(x_train, y_train).predict(x_test)
    ious = [((pred == c) & (y_test == c)).sum() / ((pred == c) | (y_test == c)).sum()
            for c in range(1, len(DEMO_CLASS_NAMES))]
    return float(np.mean(ious))


def test_pixel_colour_does_not_give_the_class(tmp_path):
    paths = generate_demo_dataset(str(tmp_path / "demo"), image_size=32, num_pool=0, num_train=20, num_test=20)
    train, test = _load_pairs(paths["train"]), _load_pairs(paths["test"])
    # Measured 0.05; guessing with the class frequencies gives 0.04.
    assert _shape_miou_of_rgb_classifier(train, test) < 0.15

    # Control: the same classifier separates the classes (measured 1.0) when colour does encode them.
    rng = np.random.default_rng(0)
    palette = np.array(DEMO_PALETTE, dtype=np.float64).reshape(-1, 3)

    def colour_coded(pairs):
        return [(np.clip(palette[lab] + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8), lab)
                for img, lab in pairs]

    assert _shape_miou_of_rgb_classifier(colour_coded(train), colour_coded(test)) > 0.8


def test_validation_split_is_not_the_test_split(tmp_path):
    paths = generate_demo_dataset(str(tmp_path / "demo"), **SMALL)
    val, test = _load_pairs(paths["val"]), _load_pairs(paths["test"])
    assert len(val) == SMALL["num_val"]
    assert not any(np.array_equal(v, t) for v, _ in val for t, _ in test)
