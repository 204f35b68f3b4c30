"""One image reader for every command (16-bit, palette, grey, alpha, CMYK, EXIF orientation), PNG masks as
labels, and convert-labels."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ddpm_seg.class_info import default_palette
from ddpm_seg.cli import main as cli_main
from ddpm_seg.data import list_images, load_labelled_folder, read_image, read_label

RNG = np.random.default_rng(0)
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75]], dtype=np.uint8)


def png16(path, values):
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3] uint16) written byte by byte: Pillow writes no 16-bit RGB."""
    values = values if values.ndim == 3 else values[:, :, None]
    h, w, c = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour_type = {1: 0, 3: 2}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16bit_grey_png_reads_as_its_8bit_version(tmp_path):
    grey = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    # v * 257 is v's exact 16-bit value; anything within half a step of it must round back to v.
    noisy = np.minimum(grey.astype(np.uint32) * 257 + RNG.integers(0, 128, grey.shape), 65535)
    png16(tmp_path / "g16.png", noisy.astype(np.uint16))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = read_image(str(tmp_path / "g16.png"))
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3)
    assert np.array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))
    # What plain convert("RGB") did: nearly everything clipped to white.
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")).mean() > 250


def test_16bit_rgb_png_reads_as_its_8bit_version(tmp_path):
    rgb = RNG.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    png16(tmp_path / "c16.png", rgb.astype(np.uint16) * 257)
    assert np.array_equal(read_image(str(tmp_path / "c16.png")), rgb)


def test_palette_grey_and_one_bit_images_read_as_their_colours(tmp_path):
    rgb = RNG.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "p.png")
    paletted = Image.open(tmp_path / "p.png")
    assert paletted.mode == "P"
    assert np.array_equal(read_image(str(tmp_path / "p.png")), np.asarray(paletted.convert("RGB")))
    grey = RNG.integers(0, 256, (10, 14), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert np.array_equal(read_image(str(tmp_path / "l.png")), np.repeat(grey[:, :, None], 3, axis=2))
    Image.fromarray(grey > 128).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(read_image(str(tmp_path / "b.png"))[:, :, 0], np.where(grey > 128, 255, 0))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_over_black(tmp_path, mode):
    rgb = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    if mode == "LA":
        rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    alpha = np.tile(np.array([255, 0, 128, 255], dtype=np.uint8), (6, 2))
    data = np.dstack([rgb if mode == "RGBA" else rgb[:, :, :1], alpha])
    Image.fromarray(data, mode).save(tmp_path / "a.png")
    image = read_image(str(tmp_path / "a.png")).astype(int)
    expected = np.round(rgb * (alpha[:, :, None] / 255.0))
    assert np.abs(image - expected).max() <= 1
    assert np.array_equal(image[alpha == 255], rgb[alpha == 255]) and not image[alpha == 0].any()


def test_cmyk_jpeg_reads_as_its_rgb(tmp_path):
    rgb = np.kron(RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert np.abs(read_image(str(tmp_path / "c.jpg")).astype(int) - rgb).mean() < 3


def exif_rotated_jpeg(path, displayed):
    """Save the photo `displayed` [H, W, 3] as a camera would: pixels stored turned, EXIF orientation 6
    ("rotate 90 degrees clockwise to display")."""
    stored = Image.fromarray(np.rot90(displayed, k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=100, exif=exif)


def test_exif_orientation_makes_a_label_drawn_on_the_displayed_photo_line_up(tmp_path):
    displayed = np.full((24, 40, 3), 40, dtype=np.uint8)
    displayed[4:12, 24:36] = 220  # a bright box, top right as the photo is shown
    label = np.zeros((24, 40), dtype=np.uint8)
    label[4:12, 24:36] = 1
    folder = tmp_path / "train"
    folder.mkdir()
    exif_rotated_jpeg(folder / "photo.jpg", displayed)
    assert Image.open(folder / "photo.jpg").size == (24, 40)  # stored turned
    (folder / "labels").mkdir()
    Image.fromarray(label).save(folder / "labels" / "photo.png")
    image = read_image(str(folder / "photo.jpg"))
    assert image.shape == (24, 40, 3) and np.abs(image.astype(int) - displayed).mean() < 3
    (item,) = load_labelled_folder(str(folder), 1, (24, 40), 2, 255, palette=PALETTE[:2])
    assert np.array_equal(item.label, label)
    assert item.image[item.label == 1].mean() > 200 and item.image[item.label == 0].mean() < 60


def write_masks(folder, labels, kind, palette=PALETTE):
    """labels {stem: ids [H, W]} as PNG masks in folder/labels/: 'ids' (grey), 'palette' (P) or 'colour' (RGB)."""
    (folder / "labels").mkdir(exist_ok=True)
    for stem, label in labels.items():
        if kind == "ids":
            mask = Image.fromarray(label.astype(np.uint8))
        elif kind == "palette":
            mask = Image.fromarray(label.astype(np.uint8)).convert("P")
            mask.putpalette((RNG.integers(0, 256, 768)).tolist())  # arbitrary colours: the index is the class
        else:
            mask = Image.fromarray(palette[label])
        mask.save(folder / "labels" / f"{stem}.png")


@pytest.mark.parametrize("kind", ["ids", "palette", "colour"])
def test_png_masks_give_the_npy_labels(experiment, tmp_path, kind):
    _, cfg = experiment
    folder = tmp_path / "data" / "train"
    stems = [f"{i:03d}" for i in range(4)]
    labels = {s: np.load(folder / f"{s}.npy") for s in stems}
    if kind == "colour":  # a colour mask has no colour for ignore_label: compare on fully labelled images
        for s in stems:
            labels[s][0, 0] = labels[s][0, 1]
            np.save(folder / f"{s}.npy", labels[s])
    expected = load_labelled_folder(str(folder), 4, (32, 32), 3, 255, palette=PALETTE)
    masked = tmp_path / "masked"
    masked.mkdir()
    for s in stems:
        os.link(folder / f"{s}.png", masked / f"{s}.png")
    write_masks(masked, labels, kind)
    got = load_labelled_folder(str(masked), 4, (32, 32), 3, 255, palette=PALETTE)
    assert [os.path.basename(it.path) for it in got] == [f"{s}.png" for s in stems]  # no mask taken for an image
    for a, b in zip(expected, got):
        assert np.array_equal(a.label, b.label) and np.array_equal(a.image, b.image)


def test_bmp_tiff_and_webp_images_are_found_and_read(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "b.TIF")
    Image.fromarray(rgb).save(tmp_path / "c.webp", lossless=True)
    grey16 = rgb[..., 0].astype(np.uint16) * 257  # a 16-bit TIFF scanner output reads as its 8-bit levels
    Image.fromarray(grey16).save(tmp_path / "d.tiff")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list_images(str(tmp_path))
    assert [os.path.basename(p) for p in found] == ["a.bmp", "b.TIF", "c.webp", "d.tiff"]
    for path in found[:3]:
        assert np.array_equal(read_image(path), rgb), path
    assert np.array_equal(read_image(found[3]), np.repeat(rgb[..., :1], 3, axis=2))


def test_unknown_colour_in_a_mask_is_named_with_its_pixel_count(tmp_path):
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    mask = PALETTE[np.zeros((8, 8), dtype=int)]
    mask[:2, :3] = (1, 2, 3)
    Image.fromarray(mask).save(tmp_path / "labels" / "a.png")
    with pytest.raises(ValueError, match=r"labels/a.png'?: colour \(1, 2, 3\) \(6 pixels\) is not in the experiment's palette"):
        read_label(str(tmp_path / "a.png"), str(tmp_path), (8, 8), 3, 255, PALETTE)


def test_mask_beside_its_image_hidden_files_and_two_labels_are_refused_or_skipped(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.jpg")
    np.save(tmp_path / "a.npy", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(image).save(tmp_path / ".hidden" / "b.png")
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "labels" / "c.png")
    assert list_images(str(tmp_path)) == [str(tmp_path / "a.jpg")]
    assert len(load_labelled_folder(str(tmp_path), 5, (8, 8), 2, 255)) == 1
    # The same image with a second label as a PNG mask: which one is meant?
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(ValueError, match="has two labels"):
        load_labelled_folder(str(tmp_path), 1, (8, 8), 2, 255)
    os.remove(tmp_path / "labels" / "a.png")
    # A mask saved beside its JPEG used to be trained on as one more image.
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="share the stem 'a'.*labels/ folder"):
        load_labelled_folder(str(tmp_path), 1, (8, 8), 2, 255)


def test_convert_labels_writes_the_official_layout(experiment, tmp_path):
    exp, cfg = experiment
    src = tmp_path / "mine"
    src.mkdir()
    displayed = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif_rotated_jpeg(src / "photo.jpg", displayed)
    label = RNG.integers(0, 3, (24, 40)).astype(np.uint8)
    Image.fromarray(RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(src / "plain.png")
    plain_label = RNG.integers(0, 3, (10, 10)).astype(np.uint8)
    plain_label[0, 0] = 255
    write_masks(src, {"photo": label}, "colour", default_palette(3))  # the tiny experiment's colours
    write_masks(src, {"plain": plain_label}, "ids")
    cli_main(["convert-labels", "--exp", str(exp), "--input", str(src), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["photo.npy", "photo.png", "plain.npy", "plain.png"]
    assert np.load(out / "photo.npy").dtype == np.uint8 and np.array_equal(np.load(out / "photo.npy"), label)
    assert np.array_equal(np.load(out / "plain.npy"), plain_label)
    # The original code opens images without EXIF orientation: the rotated photo is written upright.
    assert np.array_equal(np.asarray(Image.open(out / "photo.png").convert("RGB")), read_image(str(src / "photo.jpg")))
    assert (out / "plain.png").read_bytes() == (src / "plain.png").read_bytes()  # copied as it is
    with pytest.raises(ValueError, match="must lie outside"):
        cli_main(["convert-labels", "--exp", str(exp), "--input", str(src), "--out", str(src / "x")])


def test_an_animated_gif_is_refused_a_still_gif_read_and_a_bomb_named(tmp_path):
    from ddpm_seg.data import IMAGE_EXTENSIONS
    assert ".gif" in IMAGE_EXTENSIONS
    frames = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"a.gif': it holds 3 frames \(animated or multi-page\)"):
        read_image(str(tmp_path / "a.gif"))
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "still.gif")
    assert read_image(str(tmp_path / "still.gif")).shape == (8, 8, 3)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # claims 20000 x 20000 RGB
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"cannot read image '.*bomb.png': Image size \(400000000 pixels\) exceeds"):
        read_image(str(tmp_path / "bomb.png"))
