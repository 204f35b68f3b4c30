"""Pictures of predictions: colourised label maps, an image | truth | prediction | uncertainty strip, an
image | mask | overlay | uncertainty picture enlarged to be read at a glance, palette-indexed mask PNGs."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpm_seg.data import resize_label
from ddpm_seg.files import atomic_path

# Ignored pixels are drawn black: no benchmark palette uses pure black, and
# default_palette never does.
IGNORE_COLOR = (0, 0, 0)
PANEL_GAP = 4  # pixels of background between panels
TITLE_HEIGHT = 14  # pixels above the panels holding their labels (when titles=True)
BACKGROUND = (255, 255, 255)
NO_LABEL_COLOR = (128, 128, 128)
TEXT_COLOR = (0, 0, 0)
PANEL_TITLES = ("image", "ground truth", "prediction", "uncertainty")
SEGMENTATION_TITLES = ("image", "mask", "overlay", "uncertainty")
# save_segmentation_picture enlarges a small image by an integer factor until its shorter side reaches
# MIN_PANEL_SIDE, as far as its longer side stays within MAX_PANEL_SIDE; a larger image is reduced to that.
MIN_PANEL_SIDE = 256
MAX_PANEL_SIDE = 1024
COLORBAR_WIDTH = 128  # pixels of the uncertainty colour ramp below a picture
COLORBAR_HEIGHT = 10
LEGEND_MIN_WIDTH = 160  # a picture narrower than this gets a wider legend, so class names stay legible


def _to_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colorize(mask, palette, ignore_label=None) -> np.ndarray:
    """Label map [H, W] of class ids -> uint8 RGB [H, W, 3] using palette [K, 3] (or flat [3K]).

    Pixels equal to ignore_label are drawn IGNORE_COLOR, even when ignore_label is
    also a palette index (bedroom_28 ignores class 0).
    """
    mask = _to_numpy(mask)
    palette = np.asarray(palette)
    if palette.ndim == 1 and palette.size % 3 == 0:
        palette = palette.reshape(-1, 3)  # flat [r0, g0, b0, r1, ...] as stored in class_info.json
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be a 2-D array of integer class ids, got shape {mask.shape} dtype {mask.dtype}")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must have shape [K, 3], got {palette.shape}")
    if palette.size and (palette.min() < 0 or palette.max() > 255):
        raise ValueError(f"palette values must lie in 0..255, got {palette.min()}..{palette.max()}")
    ignored = mask == ignore_label if ignore_label is not None else np.zeros(mask.shape, dtype=bool)
    ids = np.where(ignored, 0, mask).astype(np.int64)
    outside = (ids < 0) | (ids >= len(palette))
    if outside.any():
        raise ValueError(
            f"mask holds class ids {np.unique(ids[outside])[:10].tolist()} beyond the palette's "
            f"{len(palette)} colours (ids 0..{len(palette) - 1}, ignore label {ignore_label})"
        )
    rgb = palette.astype(np.uint8)[ids]
    rgb[ignored] = IGNORE_COLOR
    return rgb


def _top_of_scale(values, vmax) -> float:
    """vmax, or where it is None the largest of `values` (NaN and negatives counting as 0)."""
    if vmax is not None:
        if not vmax >= 0:
            raise ValueError(f"the top of the colour scale must be >= 0, got {vmax}")
        return float(vmax)
    values = _to_numpy(values)
    return float(max(np.nan_to_num(values, nan=0.0).max(), 0.0)) if values.size else 0.0


def heatmap(values, vmax=None) -> np.ndarray:
    """Non-negative map [H, W] -> uint8 RGB [H, W, 3] on a colour scale from 0 to vmax.

    Colour ramp black -> red -> yellow -> white, so more uncertain reads brighter. Values are clipped to
    [0, vmax] and divided by vmax: with one vmax for all maps of a run, one value has one colour in all of
    them. vmax None scales the map to its own maximum. Negative values (float rounding of a zero
    uncertainty) count as 0; a scale whose top is 0 is all black.
    """
    values = _to_numpy(values).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"heat map values must be 2-D, got shape {values.shape}")
    top = _top_of_scale(values, vmax)
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, top)
    t = values / top if top > 0 else np.zeros_like(values)
    # Each channel rises over its own third of the ramp: red first, then green, then blue.
    rgb = np.stack([np.clip(3 * t - shift, 0.0, 1.0) for shift in (0, 1, 2)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _title_strip(text: str, width: int) -> Image.Image:
    # Drawn on a strip of the panel's width so a long title is clipped, not spilled onto the next panel.
    strip = Image.new("RGB", (width, TITLE_HEIGHT), BACKGROUND)
    ImageDraw.Draw(strip).text((1, 1), text, fill=TEXT_COLOR, font=ImageFont.load_default())
    return strip


def _no_label_panel(height: int, width: int) -> np.ndarray:
    panel = Image.new("RGB", (width, height), NO_LABEL_COLOR)
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), "no label", font=font)
    xy = ((width - (right - left)) // 2, (height - (bottom - top)) // 2)
    draw.text(xy, "no label", fill=TEXT_COLOR, font=font)
    return np.asarray(panel)


def _check_image(image) -> np.ndarray:
    image = _to_numpy(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {image.shape} dtype {image.dtype}")
    return image


def _check_sizes(image, maps) -> None:
    """Each of maps {name: array or None} must have the image's height and width."""
    height, width = image.shape[:2]
    for name, array in maps.items():
        if array is not None and tuple(_to_numpy(array).shape) != (height, width):
            raise ValueError(f"{name} shape {tuple(_to_numpy(array).shape)} != image size {(height, width)}")


def save_prediction_picture(path, image, gt, pred, uncertainty, palette, ignore_label, class_names,
                            uncertainty_max=None, titles=True, scale=1) -> None:
    """Write one PNG: image | ground truth | prediction | uncertainty, side by side, with the uncertainty
    colour bar and the legend of class_names below.

    image: uint8 [H, W, 3]; gt: label map [H, W] or None (panel says "no label"); pred: label map [H, W];
    uncertainty: float map [H, W] in nats, drawn as a heat map from 0 to uncertainty_max (the same for every
    picture of a run, so that a colour means one value in all of them; the map's own maximum when None).
    titles and scale as in save_panels.
    """
    image = _check_image(image)
    _check_sizes(image, {"ground truth": gt, "prediction": pred, "uncertainty": uncertainty})
    top = _top_of_scale(uncertainty, uncertainty_max)
    panels = [
        image,
        colorize(gt, palette, ignore_label) if gt is not None else _no_label_panel(*image.shape[:2]),
        colorize(pred, palette, ignore_label),
        heatmap(uncertainty, top),
    ]
    row = _panel_row(panels, PANEL_TITLES if titles else None, scale)
    _save_png(path, _with_key(row, class_names, palette, ignore_label, top))


def _panel_row(panels, titles=None, scale=1) -> Image.Image:
    """uint8 RGB panels [H, W, 3] of one size side by side, PANEL_GAP pixels apart, each enlarged `scale`
    times (nearest neighbour), under a TITLE_HEIGHT strip of titles (one per panel) unless titles is None."""
    shapes = {tuple(np.shape(panel)) for panel in panels}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"panels must all be [H, W, 3] of one size, got shapes {sorted(shapes)}")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"got {len(titles)} titles for {len(panels)} panels")
    panels = [np.asarray(panel).repeat(scale, axis=0).repeat(scale, axis=1) for panel in panels]
    height, width = panels[0].shape[:2]
    top = TITLE_HEIGHT if titles else 0
    canvas = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * PANEL_GAP, top + height), BACKGROUND)
    for i, panel in enumerate(panels):
        left = i * (width + PANEL_GAP)
        canvas.paste(Image.fromarray(panel), (left, top))
        if titles:
            canvas.paste(_title_strip(titles[i], width), (left, 0))
    return canvas


def _save_png(path, picture: Image.Image) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def save_panels(path, panels, titles=None, scale=1) -> None:
    """Write uint8 RGB panels [H, W, 3] of one size side by side as a PNG, PANEL_GAP pixels apart.

    titles (one per panel, or None) go in a TITLE_HEIGHT strip above them; scale > 1 enlarges every panel
    by that integer factor (nearest neighbour), so small images stay readable.
    """
    _save_png(path, _panel_row(panels, titles, scale))


OVERLAY_ALPHA = 0.5  # share of the class colour in an overlay pixel
SWATCH = 10  # legend colour square, pixels
LEGEND_LINE = 14


def _text_width(text: str, font) -> int:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)[2]


def _legend(class_names, palette, width: int, ignore_label=None) -> Image.Image:
    """Colour swatch and name of every class, wrapped into lines of `width` pixels. With an ignore_label,
    ignored pixels' colour (IGNORE_COLOR) is named too: on the ignored class's entry when ignore_label is a
    class id (it is drawn in that colour), otherwise as an entry "ignored" of its own."""
    entries = [(name, tuple(int(c) for c in colour))
               for name, colour in zip(class_names, np.asarray(palette).reshape(-1, 3))]
    if ignore_label is not None:
        if 0 <= ignore_label < len(entries):
            entries[ignore_label] = (entries[ignore_label][0] + " (ignored)", IGNORE_COLOR)
        else:
            entries.append(("ignored", IGNORE_COLOR))
    font = ImageFont.load_default()
    placed, lines, x = [], 0, 4
    for name, colour in entries:
        w = SWATCH + 4 + _text_width(name, font) + 10
        if x + w > width and x > 4:
            lines, x = lines + 1, 4
        placed.append((x, lines, name, colour))
        x += w
    legend = Image.new("RGB", (width, (lines + 1) * LEGEND_LINE + 4), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for x, line, name, colour in placed:
        y = 2 + line * LEGEND_LINE
        draw.rectangle((x, y + 1, x + SWATCH - 1, y + SWATCH), fill=colour, outline=TEXT_COLOR)
        draw.text((x + SWATCH + 4, y), name, fill=TEXT_COLOR, font=font)
    return legend


def _colour_bar(top: float) -> Image.Image:
    """The uncertainty colour scale as a strip: "uncertainty 0", the ramp heatmap draws from 0 to `top`
    (COLORBAR_WIDTH x COLORBAR_HEIGHT, framed), then the top value in nats."""
    font = ImageFont.load_default()
    low, high = "uncertainty  0", f"{top:.3g} nats"
    left = PANEL_GAP + _text_width(low, font) + 4
    strip = Image.new("RGB", (left + COLORBAR_WIDTH + 4 + _text_width(high, font) + PANEL_GAP,
                              COLORBAR_HEIGHT + 6), BACKGROUND)
    ramp = heatmap(np.tile(np.linspace(0.0, 1.0, COLORBAR_WIDTH), (COLORBAR_HEIGHT, 1)), 1.0)
    strip.paste(Image.fromarray(ramp), (left, 3))
    draw = ImageDraw.Draw(strip)
    draw.rectangle((left - 1, 2, left + COLORBAR_WIDTH, 3 + COLORBAR_HEIGHT), outline=TEXT_COLOR)
    draw.text((PANEL_GAP, 2), low, fill=TEXT_COLOR, font=font)
    draw.text((left + COLORBAR_WIDTH + 4, 2), high, fill=TEXT_COLOR, font=font)
    return strip


def _with_key(picture: Image.Image, class_names, palette, ignore_label=None, uncertainty_top=None) -> Image.Image:
    """`picture` with, below it, the uncertainty colour bar from 0 to uncertainty_top (none when None) and the
    legend of the classes, as wide as the widest of them (at least LEGEND_MIN_WIDTH)."""
    parts = [picture] + ([_colour_bar(uncertainty_top)] if uncertainty_top is not None else [])
    width = max([LEGEND_MIN_WIDTH] + [part.width for part in parts])
    parts.append(_legend(class_names, palette, width, ignore_label))
    canvas = Image.new("RGB", (width, sum(part.height for part in parts)), BACKGROUND)
    top = 0
    for part in parts:
        canvas.paste(part, (0, top))
        top += part.height
    return canvas


def overlay(image, labels, palette, ignore_label=None) -> np.ndarray:
    """uint8 [H, W, 3]: the label colours blended over the image (OVERLAY_ALPHA of colour)."""
    colours = colorize(labels, palette, ignore_label).astype(np.float32)
    return np.round((1 - OVERLAY_ALPHA) * _to_numpy(image) + OVERLAY_ALPHA * colours).astype(np.uint8)


def display_size(height: int, width: int) -> tuple:
    """(H, W) that save_segmentation_picture draws an image of height x width at: a small image enlarged by
    the integer factor that brings its shorter side to MIN_PANEL_SIDE, without its longer side passing
    MAX_PANEL_SIDE; a larger image reduced until its longer side is MAX_PANEL_SIDE."""
    longer, shorter = max(height, width), min(height, width)
    if longer > MAX_PANEL_SIDE:
        ratio = MAX_PANEL_SIDE / longer
        return max(1, round(height * ratio)), max(1, round(width * ratio))
    factor = max(1, min(-(-MIN_PANEL_SIDE // shorter), MAX_PANEL_SIDE // longer))
    return height * factor, width * factor


def _fit(array: np.ndarray, size, smooth: bool) -> np.ndarray:
    """array [H, W] or [H, W, 3] at size (H', W'). Enlarged: nearest neighbour, so each pixel becomes a
    crisp square. Reduced: nearest neighbour too unless `smooth` (class ids must stay ids), else Pillow's
    bilinear filter, which averages the pixels each output pixel covers."""
    if not smooth or (size[0] >= array.shape[0] and size[1] >= array.shape[1]):
        return resize_label(array, size)
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


def save_segmentation_picture(path, image, labels, palette, class_names, ignore_label=None, uncertainty=None,
                              uncertainty_max=None) -> None:
    """Write one PNG to read at a glance: image | mask | overlay (| uncertainty), titled, with the uncertainty
    colour bar (when there is a map) and the legend of class_names below.

    image: uint8 [H, W, 3]; labels: class ids [H, W]; uncertainty: float map [H, W] in nats, or None. The
    panels are drawn at display_size(H, W): a 32 x 32 image becomes 256 x 256, a large photo at most 1024
    pixels long. The mask panel shows each class's pure palette colour, the overlay blends them over the image
    (OVERLAY_ALPHA). The uncertainty heat map runs from 0 to uncertainty_max: give every picture of a run the
    same (the largest possible, e.g. Interpreter.uncertainty_max) so that a colour means one value in all of
    them; None scales the map to its own maximum.
    """
    image = _check_image(image)
    labels = _to_numpy(labels)
    _check_sizes(image, {"labels": labels, "uncertainty": uncertainty})
    size = display_size(*image.shape[:2])
    shown_image, shown_labels = _fit(image, size, smooth=True), _fit(labels, size, smooth=False)
    panels = [shown_image, colorize(shown_labels, palette, ignore_label),
              overlay(shown_image, shown_labels, palette, ignore_label)]
    top = None
    if uncertainty is not None:
        uncertainty = _to_numpy(uncertainty).astype(np.float32)
        top = _top_of_scale(uncertainty, uncertainty_max)
        panels.append(heatmap(_fit(uncertainty, size, smooth=True), top))
    row = _panel_row(panels, SEGMENTATION_TITLES[:len(panels)])
    _save_png(path, _with_key(row, class_names, palette, ignore_label, top))


def save_mask_png(path, labels, palette) -> None:
    """Class ids [H, W] as a palette-indexed PNG: each pixel's index is its class id, shown in the palette's
    colours ([K, 3] or flat [3K], K <= 256), so the file reads back as ids and views as a coloured mask."""
    labels = _to_numpy(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D array of integer class ids, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"a palette PNG holds class ids 0..255, got {labels.min()}..{labels.max()}")
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) > 256:
        raise ValueError(f"a palette PNG holds at most 256 colours, got {len(colours)}")
    # All 256 entries, the unused ones IGNORE_COLOR: with a shorter palette the PNG is written with fewer bits
    # per pixel, and an id beyond the palette (ignore label 255) would come back as another id.
    unused = np.tile(np.asarray(IGNORE_COLOR, dtype=np.uint8), (256 - len(colours), 1))
    mask = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    mask.putpalette(np.concatenate([colours, unused]).reshape(-1).tolist())
    _save_png(path, mask)


def _thumbnail(array: np.ndarray, side: int, resample) -> Image.Image:
    picture = Image.fromarray(array)
    scale = side / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)


def save_contact_sheet(path, entries, palette, class_names, side=128) -> None:
    """One PNG of rows `caption` / image | predicted mask, from entries (caption, image, labels), thumbnails
    fitted into side x side, with the class legend at the bottom."""
    font = ImageFont.load_default()
    width = 2 * side + 3 * PANEL_GAP
    row = TITLE_HEIGHT + side + PANEL_GAP
    legend = _legend(class_names, palette, width)
    canvas = Image.new("RGB", (width, len(entries) * row + legend.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (caption, image, labels) in enumerate(entries):
        top = i * row
        draw.text((PANEL_GAP, top + 1), caption, fill=TEXT_COLOR, font=font)
        canvas.paste(_thumbnail(image, side, Image.BILINEAR), (PANEL_GAP, top + TITLE_HEIGHT))
        canvas.paste(_thumbnail(colorize(labels, palette), side, Image.NEAREST),
                     (2 * PANEL_GAP + side, top + TITLE_HEIGHT))
    canvas.paste(legend, (0, len(entries) * row))
    _save_png(path, canvas)
