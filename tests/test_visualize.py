import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_seg import visualize
from ddpm_seg.class_info import dataset_info, dataset_names, default_class_names, default_palette
from ddpm_seg.visualize import (
    IGNORE_COLOR,
    PANEL_GAP,
    TITLE_HEIGHT,
    colorize,
    heatmap,
    save_panels,
    save_prediction_picture,
)

BENCHMARKS = ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def test_packaged_class_info_equals_reference(reference_dir):
    import ddpm_seg

    packaged = os.path.join(os.path.dirname(ddpm_seg.__file__), "class_info.json")
    with open(packaged) as f, open(os.path.join(reference_dir, "class_info.json")) as g:
        assert json.load(f) == json.load(g)


def test_dataset_info_for_benchmarks(reference_dir):
    with open(os.path.join(reference_dir, "class_info.json")) as f:
        reference = json.load(f)
    assert dataset_names() == sorted(BENCHMARKS)
    for name in BENCHMARKS:
        info = dataset_info(name)
        k = reference[name]["number_class"]
        assert info["number_class"] == k
        assert info["ignore_label"] == reference[name]["ignore_label"]
        assert info["class_names"] == reference[name]["class_names"]
        assert info["palette"].shape == (k, 3) and info["palette"].dtype == np.uint8
        assert info["palette"].flatten().tolist() == reference[name]["palette"]
    assert dataset_info("bedroom_28")["ignore_label"] == 0
    assert dataset_info("ffhq_34")["palette"][1].tolist() == [112, 130, 107]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="bedroom_28.*ffhq_34"):
        dataset_info("bedroom")


def test_default_names_and_palette():
    assert default_class_names(3) == ["class_0", "class_1", "class_2"]
    palette = default_palette(2000)
    assert palette.shape == (2000, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 2000, "colours must be distinct"
    assert not (palette == 0).all(axis=1).any(), "black is kept for ignored pixels"
    np.testing.assert_array_equal(default_palette(5), palette[:5])
    with pytest.raises(ValueError):
        default_palette(0)


def test_colorize_uses_palette_and_ignore_color():
    mask = torch.tensor([[0, 1, 2], [2, 255, 1]])
    rgb = colorize(mask, PALETTE, ignore_label=255)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 2].tolist() == [0, 0, 255]
    assert rgb[1, 2].tolist() == [0, 255, 0]
    assert tuple(rgb[1, 1]) == IGNORE_COLOR
    # An ignore label that is also a palette index (bedroom_28 ignores 0) still draws as ignored.
    rgb0 = colorize(np.array([[0, 1]]), PALETTE, ignore_label=0)
    assert tuple(rgb0[0, 0]) == IGNORE_COLOR and rgb0[0, 1].tolist() == [0, 255, 0]
    # The flat [r0, g0, b0, ...] list stored in class_info.json works too.
    np.testing.assert_array_equal(colorize(mask, PALETTE.flatten().tolist(), 255), rgb)


def test_colorize_rejects_ids_beyond_palette():
    with pytest.raises(ValueError, match=r"\[3\].*3 colours"):
        colorize(np.array([[0, 3]]), PALETTE)
    with pytest.raises(ValueError, match=r"\[255\]"):
        colorize(np.array([[0, 255]]), PALETTE)  # 255 without ignore_label is just an unknown id


def test_heatmap_ramp():
    rgb = heatmap(torch.tensor([[0.0, 0.5], [2.0, -1e-7]]))
    assert rgb[1, 0].tolist() == [255, 255, 255]  # own maximum -> top of the ramp
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[1, 1].tolist() == [0, 0, 0]  # rounding-noise negatives read as zero
    assert rgb[0, 1].tolist() == [191, 0, 0]  # a quarter of the way: red rising
    assert heatmap(np.zeros((2, 2))).max() == 0


def _example(height=8, width=10):
    gen = np.random.default_rng(0)
    image = gen.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = gen.integers(0, 3, (height, width))
    gt[0, 0] = 255
    pred = torch.from_numpy(gen.integers(0, 3, (height, width)))
    unc = torch.rand(height, width, generator=torch.Generator().manual_seed(0))
    return image, gt, pred, unc


def _panel(picture, index, top, height, width):
    left = index * (width + PANEL_GAP)
    return picture[top:top + height, left:left + width]


@pytest.mark.parametrize("titles", [True, False])
def test_saved_picture_layout_and_panels(tmp_path, titles):
    image, gt, pred, unc = _example()
    path = tmp_path / "out" / "pred.png"
    save_prediction_picture(str(path), image, gt, pred, unc, PALETTE, 255, titles=titles)
    picture = np.asarray(Image.open(path).convert("RGB"))
    top = TITLE_HEIGHT if titles else 0
    assert picture.shape == (top + 8, 4 * 10 + 3 * PANEL_GAP, 3)
    np.testing.assert_array_equal(_panel(picture, 0, top, 8, 10), image)
    np.testing.assert_array_equal(_panel(picture, 1, top, 8, 10), colorize(gt, PALETTE, 255))
    np.testing.assert_array_equal(_panel(picture, 2, top, 8, 10), colorize(pred, PALETTE, 255))
    np.testing.assert_array_equal(_panel(picture, 3, top, 8, 10), heatmap(unc))
    assert (picture[top:, 10:10 + PANEL_GAP] == 255).all(), "gap between panels is background"
    if titles:
        assert (picture[:TITLE_HEIGHT] < 128).any(), "title text should be drawn"
    assert os.listdir(path.parent) == ["pred.png"], "no temporary file may remain"


def test_picture_without_label(tmp_path):
    image, _, pred, unc = _example(32, 64)
    path = tmp_path / "nolabel.png"
    save_prediction_picture(str(path), image, None, pred, unc, PALETTE, 255, titles=False)
    picture = np.asarray(Image.open(path).convert("RGB"))
    panel = _panel(picture, 1, 0, 32, 64)
    grey = (panel == visualize.NO_LABEL_COLOR).all(-1)
    assert grey.mean() > 0.5 and not grey.all(), "grey panel with 'no label' written on it"
    np.testing.assert_array_equal(_panel(picture, 2, 0, 32, 64), colorize(pred, PALETTE, 255))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    image, gt, pred, unc = _example()

    def broken_save(self, fp, format=None, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_prediction_picture(str(tmp_path / "x.png"), image, gt, pred, unc, PALETTE, 255)
    assert os.listdir(tmp_path) == []


def test_mismatched_sizes_raise(tmp_path):
    image, gt, pred, unc = _example()
    with pytest.raises(ValueError, match="prediction shape"):
        save_prediction_picture(str(tmp_path / "x.png"), image, gt, pred[:4], unc, PALETTE, 255)
    assert os.listdir(tmp_path) == []


def test_picture_scale_enlarges_each_panel(tmp_path):
    image, gt, pred, unc = _example()
    path = tmp_path / "big.png"
    save_prediction_picture(str(path), image, gt, pred, unc, PALETTE, 255, titles=False, scale=3)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (24, 4 * 30 + 3 * PANEL_GAP, 3)
    np.testing.assert_array_equal(_panel(picture, 2, 0, 24, 30), colorize(pred, PALETTE, 255).repeat(3, 0).repeat(3, 1))


def test_save_panels_places_any_number_of_panels(tmp_path):
    panels = [np.full((5, 6, 3), v, dtype=np.uint8) for v in (10, 120, 250)]
    save_panels(str(tmp_path / "p.png"), panels, titles=None, scale=2)
    picture = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert picture.shape == (10, 3 * 12 + 2 * PANEL_GAP, 3)
    for i, panel in enumerate(panels):
        np.testing.assert_array_equal(_panel(picture, i, 0, 10, 12), panel.repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="one size"):
        save_panels(str(tmp_path / "bad.png"), [panels[0], np.zeros((4, 6, 3), np.uint8)])
    assert sorted(os.listdir(tmp_path)) == ["p.png"]
