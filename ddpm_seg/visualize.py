"""Pictures of predictions: colourised label maps and an image | truth | prediction | uncertainty strip."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpm_seg.utils import atomic_path

# Ignored pixels are drawn black: no benchmark palette uses pure black, and
# default_palette never does.
IGNORE_COLOR = (0, 0, 0)
PANEL_GAP = 4  # pixels of background between panels
TITLE_HEIGHT = 14  # pixels above the panels holding their labels (when titles=True)
BACKGROUND = (255, 255, 255)
NO_LABEL_COLOR = (128, 128, 128)
TEXT_COLOR = (0, 0, 0)
PANEL_TITLES = ("image", "ground truth", "prediction", "uncertainty")


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


def heatmap(values) -> np.ndarray:
    """Non-negative map [H, W] -> uint8 RGB [H, W, 3], scaled to its own maximum.

    Colour ramp black -> red -> yellow -> white, so more uncertain reads brighter.
    Negative values (float rounding of a zero uncertainty) count as 0.
    """
    values = _to_numpy(values).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"heat map values must be 2-D, got shape {values.shape}")
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, None)
    peak = values.max() if values.size else 0.0
    t = values / peak if peak > 0 else np.zeros_like(values)
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


def save_prediction_picture(path, image, gt, pred, uncertainty, palette, ignore_label, titles=True, scale=1) -> None:
    """Write one PNG: image | ground truth | prediction | uncertainty, side by side.

    image: uint8 [H, W, 3]; gt: label map [H, W] or None (panel says "no label");
    pred: label map [H, W]; uncertainty: float map [H, W], drawn as a heat map scaled
    to its own maximum. titles and scale as in save_panels.
    """
    image = _to_numpy(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {image.shape} dtype {image.dtype}")
    height, width = image.shape[:2]
    for name, array in (("ground truth", gt), ("prediction", pred), ("uncertainty", uncertainty)):
        if array is not None and tuple(_to_numpy(array).shape) != (height, width):
            raise ValueError(f"{name} shape {tuple(_to_numpy(array).shape)} != image size {(height, width)}")
    panels = [
        image,
        colorize(gt, palette, ignore_label) if gt is not None else _no_label_panel(height, width),
        colorize(pred, palette, ignore_label),
        heatmap(uncertainty),
    ]
    save_panels(path, panels, PANEL_TITLES if titles else None, scale)


def save_panels(path, panels, titles=None, scale=1) -> None:
    """Write uint8 RGB panels [H, W, 3] of one size side by side as a PNG, PANEL_GAP pixels apart.

    titles (one per panel, or None) go in a TITLE_HEIGHT strip above them; scale > 1 enlarges every panel
    by that integer factor (nearest neighbour), so small images stay readable.
    """
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
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


OVERLAY_ALPHA = 0.5  # share of the class colour in an overlay pixel
SWATCH = 10  # legend colour square, pixels
LEGEND_LINE = 14


def _legend(class_names, palette, width: int) -> Image.Image:
    """Colour swatch and name of every class, wrapped into lines of `width` pixels."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries, lines, x = [], 0, 4
    for name, colour in zip(class_names, np.asarray(palette).reshape(-1, 3)):
        w = SWATCH + 4 + probe.textbbox((0, 0), name, font=font)[2] + 10
        if x + w > width and x > 4:
            lines, x = lines + 1, 4
        entries.append((x, lines, name, tuple(int(c) for c in colour)))
        x += w
    legend = Image.new("RGB", (width, (lines + 1) * LEGEND_LINE + 4), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for x, line, name, colour in entries:
        y = 2 + line * LEGEND_LINE
        draw.rectangle((x, y + 1, x + SWATCH - 1, y + SWATCH), fill=colour, outline=TEXT_COLOR)
        draw.text((x + SWATCH + 4, y), name, fill=TEXT_COLOR, font=font)
    return legend


def overlay(image, labels, palette, ignore_label=None) -> np.ndarray:
    """uint8 [H, W, 3]: the label colours blended over the image (OVERLAY_ALPHA of colour)."""
    colours = colorize(labels, palette, ignore_label).astype(np.float32)
    return np.round((1 - OVERLAY_ALPHA) * _to_numpy(image) + OVERLAY_ALPHA * colours).astype(np.uint8)


def save_overlay_picture(path, image, labels, palette, class_names, ignore_label=None) -> None:
    """Write one PNG: the mask blended over the image, with a legend of the class names below."""
    picture = Image.fromarray(overlay(image, labels, palette, ignore_label))
    legend = _legend(class_names, palette, max(picture.width, 160))
    canvas = Image.new("RGB", (legend.width, picture.height + legend.height), BACKGROUND)
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (0, picture.height))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


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
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
