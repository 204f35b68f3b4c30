import json
import math
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from numpy.lib.stride_tricks import sliding_window_view

from ddpm_seg import visualize
from ddpm_seg.backbones.pixels import pixel_features
from ddpm_seg.class_info import dataset_info, dataset_names, default_class_names, default_palette
from ddpm_seg.config import validate_experiment
from ddpm_seg.data import read_image
from ddpm_seg.ensemble import MLPEnsemble
from ddpm_seg.interpreter import Interpreter
from ddpm_seg.visualize import (
    COLORBAR_WIDTH,
    IGNORE_COLOR,
    PANEL_GAP,
    SWATCH,
    TITLE_HEIGHT,
    colorize,
    display_size,
    heatmap,
    overlay,
    save_mask_png,
    save_panels,
    save_prediction_picture,
    save_segmentation_picture,
)

BENCHMARKS = ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
NAMES = ["sky", "grass", "road"]
TOP = (255, 255, 255)  # the heat map's colour at the top of its scale


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


def test_heatmap_with_a_fixed_top_gives_one_value_one_colour():
    low = heatmap(np.array([[0.0, 0.25, 0.3]]), vmax=1.0)
    high = heatmap(np.array([[0.25, 1.0, 3.0]]), vmax=1.0)
    assert low[0, 1].tolist() == high[0, 0].tolist() == [191, 0, 0]  # 0.25 of the scale in both maps
    assert high[0, 1].tolist() == list(TOP) and high[0, 2].tolist() == list(TOP)  # vmax and above: the top
    assert low[0, 2].tolist() != list(TOP), "a map's own maximum is not the top of a fixed scale"
    assert heatmap(np.full((2, 2), 0.5), vmax=0.0).max() == 0
    with pytest.raises(ValueError, match=">= 0"):
        heatmap(np.zeros((2, 2)), vmax=-1.0)


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


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _has_swatch(region, colour):
    """Whether region [H, W, 3] holds a square of the legend swatch's inner size in `colour`."""
    side = SWATCH - 2
    same = (region == np.asarray(colour, dtype=np.uint8)).all(-1)
    return min(same.shape) >= side and sliding_window_view(same, (side, side)).all(axis=(-2, -1)).any()


def _colour_bar_rows(picture):
    """Rows of the picture that hold the whole colour ramp of the uncertainty bar, from 0 to its top."""
    ramp = heatmap(np.linspace(0.0, 1.0, COLORBAR_WIDTH)[None], 1.0)[0].tobytes()
    rows = []
    for y, row in enumerate(picture):
        at = row.tobytes().find(ramp)
        if at >= 0 and at % 3 == 0:
            rows.append(y)
    return rows


@pytest.mark.parametrize("titles", [True, False])
def test_saved_picture_layout_and_panels(tmp_path, titles):
    image, gt, pred, unc = _example()
    path = tmp_path / "out" / "pred.png"
    save_prediction_picture(str(path), image, gt, pred, unc, PALETTE, 255, NAMES, titles=titles)
    picture = _read(path)
    top = TITLE_HEIGHT if titles else 0
    assert picture.shape[0] > top + 8 and picture.shape[1] >= 4 * 10 + 3 * PANEL_GAP
    np.testing.assert_array_equal(_panel(picture, 0, top, 8, 10), image)
    np.testing.assert_array_equal(_panel(picture, 1, top, 8, 10), colorize(gt, PALETTE, 255))
    np.testing.assert_array_equal(_panel(picture, 2, top, 8, 10), colorize(pred, PALETTE, 255))
    np.testing.assert_array_equal(_panel(picture, 3, top, 8, 10), heatmap(unc))  # no range given: its own
    assert (picture[top:top + 8, 10:10 + PANEL_GAP] == 255).all(), "gap between panels is background"
    key = picture[top + 8:]
    assert _colour_bar_rows(key), "the uncertainty colour bar is drawn below the panels"
    for colour in [*PALETTE, IGNORE_COLOR]:  # every class, and ignore_label 255 as "ignored"
        assert _has_swatch(key, colour)
    if titles:
        assert (picture[:TITLE_HEIGHT] < 128).any(), "title text should be drawn"
    assert os.listdir(path.parent) == ["pred.png"], "no temporary file may remain"


def test_picture_without_label(tmp_path):
    image, _, pred, unc = _example(32, 64)
    path = tmp_path / "nolabel.png"
    save_prediction_picture(str(path), image, None, pred, unc, PALETTE, 255, NAMES, titles=False)
    picture = _read(path)
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
        save_prediction_picture(str(tmp_path / "x.png"), image, gt, pred, unc, PALETTE, 255, NAMES)
    assert os.listdir(tmp_path) == []


def test_mismatched_sizes_raise(tmp_path):
    image, gt, pred, unc = _example()
    with pytest.raises(ValueError, match="prediction shape"):
        save_prediction_picture(str(tmp_path / "x.png"), image, gt, pred[:4], unc, PALETTE, 255, NAMES)
    assert os.listdir(tmp_path) == []


def test_picture_scale_enlarges_each_panel(tmp_path):
    image, gt, pred, unc = _example()
    path = tmp_path / "big.png"
    save_prediction_picture(str(path), image, gt, pred, unc, PALETTE, 255, NAMES, titles=False, scale=3)
    picture = _read(path)
    assert picture.shape[1] >= 4 * 30 + 3 * PANEL_GAP
    assert (picture[24, :4 * 30 + 3 * PANEL_GAP] == 255).all() and not (picture[23] == 255).all(), \
        "the panels end 24 pixels down"
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


def test_prediction_pictures_of_a_run_share_one_uncertainty_scale(tmp_path):
    image, gt, pred, _ = _example()
    pictures = []
    for name, peak in (("a.png", 0.6), ("b.png", 0.2)):
        unc = np.full((8, 10), 0.1)
        unc[0, 0] = peak
        save_prediction_picture(str(tmp_path / name), image, gt, pred, unc, PALETTE, 255, NAMES, uncertainty_max=0.6)
        pictures.append(_panel(_read(tmp_path / name), 3, TITLE_HEIGHT, 8, 10))
    assert pictures[0][0, 0].tolist() == list(TOP) and pictures[1][0, 0].tolist() != list(TOP)
    np.testing.assert_array_equal(pictures[0][1:], pictures[1][1:])  # 0.1 has one colour in both
    np.testing.assert_array_equal(pictures[0], heatmap(np.where(np.arange(80).reshape(8, 10) == 0, 0.6, 0.1), 0.6))


@pytest.mark.parametrize("size,shown", [((32, 32), (256, 256)), ((300, 200), (600, 400)), ((10, 300), (30, 900)),
                                        ((1024, 768), (1024, 768)), ((2000, 1000), (1024, 512))])
def test_display_size_enlarges_small_images_and_reduces_large_ones(size, shown):
    assert display_size(*size) == shown


def _scene(size=32, seed=0):
    gen = np.random.default_rng(seed)
    image = gen.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.int64)
    labels[size // 4:, :size // 2] = 1
    labels[:, 3 * size // 4:] = 2
    return image, labels


def test_segmentation_picture_of_a_small_image_is_enlarged_with_pure_mask_colours(tmp_path):
    image, labels = _scene()
    unc = np.linspace(0.0, math.log(3), 32 * 32).reshape(32, 32)
    path = tmp_path / "seg.png"
    save_segmentation_picture(str(path), image, labels, PALETTE, NAMES, uncertainty=unc, uncertainty_max=math.log(3))
    picture = _read(path)
    side = 256  # 32 px enlarged 8 times
    assert picture.shape[1] == 4 * side + 3 * PANEL_GAP and picture.shape[0] > TITLE_HEIGHT + side
    panels = [_panel(picture, i, TITLE_HEIGHT, side, side) for i in range(4)]
    np.testing.assert_array_equal(panels[0], image.repeat(8, 0).repeat(8, 1))
    # The mask panel holds the palette colours exactly: class 1 at row 20, column 5 -> pixels 160..167, 40..47.
    assert (panels[1][160:168, 40:48] == PALETTE[1]).all()
    np.testing.assert_array_equal(panels[1], colorize(labels, PALETTE).repeat(8, 0).repeat(8, 1))
    np.testing.assert_array_equal(panels[2], overlay(image, labels, PALETTE).repeat(8, 0).repeat(8, 1))
    assert panels[3][-1, -1].tolist() == list(TOP)  # uncertainty_max is the top of the ramp
    assert (picture[:TITLE_HEIGHT] < 128).any(), "titles are drawn"
    key = picture[TITLE_HEIGHT + side:]
    assert _colour_bar_rows(key)
    for colour in PALETTE:
        assert _has_swatch(key, colour), f"legend swatch {colour}"
    assert not _has_swatch(key, IGNORE_COLOR), "no ignore_label, no 'ignored' entry"
    assert os.listdir(tmp_path) == ["seg.png"]


def test_segmentation_picture_uncertainty_colours_follow_the_fixed_range(tmp_path):
    image, labels = _scene()
    top = math.log(2)
    sure, unsure = np.full((32, 32), 0.3), np.full((32, 32), 0.3)
    unsure[0, 0] = top  # this map reaches the top of the range, the other stops at 0.3
    strips = {}
    for name, unc, vmax in (("unsure", unsure, top), ("sure", sure, top), ("own", sure, None)):
        save_segmentation_picture(str(tmp_path / f"{name}.png"), image, labels, PALETTE, NAMES, uncertainty=unc,
                                  uncertainty_max=vmax)
        picture = _read(tmp_path / f"{name}.png")
        panel = _panel(picture, 3, TITLE_HEIGHT, 256, 256)
        rows = _colour_bar_rows(picture)
        assert rows, f"{name}: colour bar"
        strips[name] = (panel[0, 0].tolist(), panel[100, 100].tolist(), picture[rows[0] - 3:rows[-1] + 4])
    assert strips["unsure"][0] == list(TOP)  # a value equal to uncertainty_max: the top colour
    assert strips["unsure"][1] == strips["sure"][1] == strips["sure"][0] == heatmap([[0.3]], top)[0, 0].tolist()
    assert strips["own"][1] == list(TOP), "without a range the map's own maximum is the top"
    np.testing.assert_array_equal(strips["unsure"][2], strips["sure"][2])  # one range, one bar
    assert not np.array_equal(strips["sure"][2], strips["own"][2]), "the bar writes its range (0.693 vs 0.3 nats)"


def test_segmentation_picture_without_uncertainty_and_with_ignored_pixels(tmp_path):
    image, labels = _scene()
    labels[0, :4] = 0  # bedroom_28 ignores class 0: drawn black, and the legend says so
    save_segmentation_picture(str(tmp_path / "s.png"), image, labels, PALETTE, NAMES, ignore_label=0)
    picture = _read(tmp_path / "s.png")
    assert picture.shape[1] == 3 * 256 + 2 * PANEL_GAP, "three panels: no uncertainty"
    assert (_panel(picture, 1, TITLE_HEIGHT, 256, 256)[:8, :32] == IGNORE_COLOR).all()
    key = picture[TITLE_HEIGHT + 256:]
    assert not _colour_bar_rows(picture)
    assert _has_swatch(key, IGNORE_COLOR) and not _has_swatch(key, PALETTE[0])
    assert _has_swatch(key, PALETTE[1]) and _has_swatch(key, PALETTE[2])


def test_segmentation_picture_of_a_large_image_is_reduced(tmp_path):
    image = np.zeros((1500, 600, 3), dtype=np.uint8)
    labels = np.zeros((1500, 600), dtype=np.int64)
    labels[:, 300:] = 2
    save_segmentation_picture(str(tmp_path / "big.png"), image, labels, PALETTE, NAMES)
    picture = _read(tmp_path / "big.png")
    height, width = display_size(1500, 600)
    assert (height, width) == (1024, 410) and picture.shape[1] == 3 * width + 2 * PANEL_GAP
    mask = _panel(picture, 1, TITLE_HEIGHT, height, width)
    assert {tuple(c) for c in mask.reshape(-1, 3)} == {tuple(PALETTE[0]), tuple(PALETTE[2])}, "pure class colours"
    with pytest.raises(ValueError, match="labels shape"):
        save_segmentation_picture(str(tmp_path / "bad.png"), image, labels[:10], PALETTE, NAMES)


def test_save_mask_png_round_trips_class_ids_and_palette(tmp_path):
    labels = torch.tensor([[0, 1, 2], [2, 255, 1]])
    path = tmp_path / "masks" / "m.png"
    save_mask_png(str(path), labels, PALETTE)
    with Image.open(path) as mask:
        assert mask.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask), labels.numpy())
        assert mask.getpalette()[:9] == PALETTE.flatten().tolist()
        rgb = np.asarray(mask.convert("RGB"))
    assert rgb[0, 2].tolist() == [0, 0, 255] and tuple(rgb[1, 1]) == IGNORE_COLOR  # 255: beyond the palette
    assert os.listdir(path.parent) == ["m.png"]
    with pytest.raises(ValueError, match="0..255"):
        save_mask_png(str(tmp_path / "x.png"), np.array([[0, 256]]), PALETTE)


def _pixel_interpreter():
    """A small interpreter on the pixels' own colours: 3 members, 4 classes, no backbone network."""
    cfg = dict(exp_dir="x", model_type="pixels", category="mine", number_class=4, ignore_label=255,
               training_path="a", testing_path="b", model_path="m", dim=[32, 32, 3], steps=[], blocks=[],
               model_num=3, batch_size=64, training_number=1, testing_number=1, upsample_mode="bilinear",
               share_noise=True, input_activations=False, class_names=["a", "b", "c", "d"])
    return Interpreter(validate_experiment(cfg), pixel_features, MLPEnsemble(3, 4, 3, seed=0).eval())


def test_interpreter_segments_a_path_and_saves_mask_and_overlay(tmp_path):
    interp = _pixel_interpreter()
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photo)
    labels, unc, score = interp(read_image(str(photo)))
    for source in (str(photo), pathlib.Path(photo)):
        by_path, unc_by_path, score_by_path = interp(source)
        np.testing.assert_array_equal(by_path, labels)
        np.testing.assert_array_equal(unc_by_path, unc)
        assert score_by_path == score
    np.testing.assert_array_equal(interp.segment([photo])[0][0], labels)
    with pytest.raises(TypeError, match="list of images"):
        interp.segment(str(photo))
    with pytest.raises(ValueError, match="missing.png"):
        interp(tmp_path / "missing.png")

    assert interp.uncertainty_max == pytest.approx(math.log(3))  # 3 members, 4 classes
    interp.save_mask(str(tmp_path / "mask.png"), labels)
    with Image.open(tmp_path / "mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), labels)
        assert mask.getpalette()[:12] == interp.palette.flatten().tolist()
    interp.save_overlay(str(tmp_path / "overlay.png"), photo, labels, unc)
    save_segmentation_picture(str(tmp_path / "expected.png"), read_image(str(photo)), labels, interp.palette,
                              interp.class_names, uncertainty=unc, uncertainty_max=math.log(3))
    np.testing.assert_array_equal(_read(tmp_path / "overlay.png"), _read(tmp_path / "expected.png"))
