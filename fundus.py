"""Fundus photographs: decoding any file as RGB, finding the eye's circle, the square crop of the eye,
and Ben Graham's normalisation. data/prepare.py crops datasets with it; evaluate.py --images crops
new photographs with the same functions, so a photo is prepared the same way in both.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from scipy import ndimage
from scipy.spatial import ConvexHull

# Image files, in order of preference when a dataset holds one name with several extensions.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")

# Detection needs the eye's outline, not its detail: on a copy at most this wide, find_eye takes
# 12 ms on a 3000x2000 photo (39 ms at 1024) and its radius is 0.2 % off (0.1 % at 1024).
DETECT_SIDE = 512
# Corner patches (this fraction of each side) lie outside a circle inscribed in the frame
# (that leaves 14.6 %), so they sample the background even when the eye fills the frame.
CORNER = 0.05
# The eye's rim is much darker than its centre (vignetting), so a pixel counts as eye already
# this fraction of the way from the background's level to the bright (95th percentile) level.
RIM_FRACTION = 0.15
# Below this many grey levels between background and eye there is nothing to find: black,
# blank or overexposed photos.
MIN_CONTRAST = 15
MIN_EYE_AREA = 0.01  # of the frame; smaller bright blobs are text or reflections, not an eye
# Ben Graham's Kaggle 2015 winning preprocessing: the blur's sigma is 1/30 of the eye radius
# (10 px at his radius 300), and the outer 10 % of the radius is blanked ("remove boundary effects").
GRAHAM_SIGMA = 1 / 30
GRAHAM_KEEP = 0.9


# --------------------------------------------------------------------------- reading photos
def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit greyscale scaled to 8 bits, transparency composited onto black
    (a transparent PNG background may hold any colour, often white, that would pass as eye)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(img, dtype=np.float32)
        peak = max(float(values.max()), 1.0)
        img = Image.fromarray(np.clip(values * (255 / peak), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_fundus(path: Path, size: int) -> Image.Image:
    """Decode as RGB. JPEGs decode at 1/2, 1/4 or 1/8 scale in the DCT (27 instead of 53 ms on a
    3000x2000 photo, and the crop's resize gets cheaper too) while the short side stays >= 1.5 x
    size, so an eye spanning at least 2/3 of it is still only ever downsampled."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            scale = 1.5 * size / min(img.size)
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img.load()
        return to_rgb(img)


# --------------------------------------------------------------------------- finding the eye
def bright_region(img: Image.Image) -> tuple[np.ndarray, int]:
    """The eye as a boolean mask on a reduced copy, and the reduction factor; ValueError when none."""
    factor = max(1, math.ceil(max(img.size) / DETECT_SIDE))
    rgb = to_rgb(img)
    red, green, blue = (rgb.reduce(factor) if factor > 1 else rgb).split()
    # the brightest channel: red for a colour fundus, any for a red-free or greyscale photo
    brightest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    grey = np.asarray(brightest.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    h, w = grey.shape
    ch, cw = max(1, round(CORNER * h)), max(1, round(CORNER * w))
    corners = [grey[:ch, :cw], grey[:ch, -cw:], grey[-ch:, :cw], grey[-ch:, -cw:]]
    # the darkest corner: another may hold a caption, a logo or the eye itself
    darkest = min(corners, key=np.median)
    background, noise = float(np.median(darkest)), float(darkest.std())
    bright = float(np.percentile(grey, 95))
    if bright - background < MIN_CONTRAST:
        raise ValueError(f"no eye found: nothing is more than {MIN_CONTRAST} grey levels brighter than "
                         f"the darkest corner ({background:.0f}); a black, blank or overexposed photo")
    level = background + max(RIM_FRACTION * (bright - background), 4 * noise)
    # opening cuts thin bright lines (a frame drawn by the camera, caption strokes) off the eye
    # (grey_opening: separable min/max filters, 2.5x faster than binary_opening's 5x5 structure)
    mask = ndimage.grey_opening((grey > level).view(np.uint8), size=(5, 5)).astype(bool)
    labels, count = ndimage.label(mask)
    areas = np.bincount(labels.ravel())[1:] if count else np.zeros(1)
    if areas.max() < MIN_EYE_AREA * h * w:
        raise ValueError("no eye found: no bright region covers 1 % of the photo")
    return labels == 1 + int(areas.argmax()), factor


def row_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The region's rows, and in each the x of its left and right edge (pixel edges, not centres)."""
    rows = np.flatnonzero(mask.any(axis=1))
    inside = mask[rows]
    return rows, inside.argmax(axis=1), mask.shape[1] - inside[:, ::-1].argmax(axis=1)


def row_ends(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the left and right edge of every row of the region that the frame did not cut.
    Every such end lies on the eye's circle, also in rows flattened by the frame or by the
    camera's field stop (EyePACS' flat tops and bottoms), where the top edge does not."""
    rows, left, right = row_edges(mask)
    y = rows + 0.5
    kept_left, kept_right = left > 0, right < mask.shape[1]
    return (np.concatenate([left[kept_left], right[kept_right]]).astype(float),
            np.concatenate([y[kept_left], y[kept_right]]))


def fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle (Kasa 1976: linear in cx, cy, r^2 - cx^2 - cy^2), refitted once without
    the points off by more than 3 median deviations (a notch in the rim, a dark sector)."""
    for _ in range(2):
        design = np.column_stack([2 * x, 2 * y, np.ones_like(x)])
        (cx, cy, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
        r = math.sqrt(max(c + cx * cx + cy * cy, 0.0))
        off = np.abs(np.hypot(x - cx, y - cy) - r)
        keep = off <= 3 * np.median(off) + 1
        x, y = x[keep], y[keep]
    return float(cx), float(cy), r


def find_eye(img: Image.Image) -> tuple[float, float, float]:
    """(cx, cy, radius) of the eye in pixels of img; ValueError when the photo shows no eye.

    The circle is fitted to the left and right ends of the bright region's rows; to the ends of
    its columns only when the frame cuts every row (their top ends would include flat tops). An
    eye cut on all sides, with no usable ends, is taken as the bright region's extent."""
    mask, factor = bright_region(img)
    x, y = row_ends(mask)
    if len(x) < 10:
        y, x = row_ends(mask.T)
    if len(x) >= 10:
        cx, cy, r = fit_circle(x, y)
    else:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        cx, cy = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
        r = max(cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) / 2
    return cx * factor, cy * factor, r * factor


def eye_region(img: Image.Image) -> np.ndarray:
    """Where img shows the eye, as a boolean mask of its size: the bright region's convex hull, so
    dark lesions at the rim count as eye while edges where the frame cut the eye stay straight."""
    mask, factor = bright_region(img)
    rows, left, right = row_edges(mask)  # the rows' ends span the same hull as the whole region
    ends = np.column_stack([np.concatenate([left, right - 1]), np.concatenate([rows, rows])])
    outline = (ends + 0.5) * factor - 0.5  # pixel indices, as ImageDraw takes them, at img's scale
    region = Image.new("1", img.size)
    ImageDraw.Draw(region).polygon([tuple(p) for p in outline[ConvexHull(outline).vertices]], fill=1)
    return np.asarray(region, dtype=bool)


def is_eye_crop(img: Image.Image) -> bool:
    """True when img already is an eye crop, so re-cropping would change (almost) nothing.

    The rule: the image is square (sides within 1 %), and find_eye's circle is centred within 3 %
    of the side and its diameter is 85-103 % of the side. 85 %, because --ben-graham output is
    black beyond 90 % of the radius. A photo with no eye is not a crop."""
    side = max(img.size)
    if abs(img.width - img.height) > 0.01 * side:
        return False
    try:
        cx, cy, r = find_eye(img)
    except ValueError:
        return False
    centred = max(abs(cx - img.width / 2), abs(cy - img.height / 2)) <= 0.03 * side
    return centred and 0.85 * side <= 2 * r <= 1.03 * side


# --------------------------------------------------------------------------- crop and normalise
def crop_eye(img: Image.Image, size: int = 512) -> Image.Image:
    """The eye's bounding square as RGB size x size; where the frame cut the eye off, the square
    reaches past the photo and PIL's crop fills it with black, so the eye stays round."""
    rgb = to_rgb(img)
    cx, cy, r = find_eye(rgb)
    side = max(1, round(2 * r))
    left, top = round(cx - r), round(cy - r)
    square = rgb.crop((left, top, left + side, top + side))
    # reducing_gap 2: a box reduce by an integer factor first, then Lanczos: on a 2200 px eye
    # 2.4x faster than plain Lanczos, and 0.24 grey levels from it on average
    return square.resize((size, size), Image.LANCZOS, reducing_gap=2.0)


def ben_graham(img: Image.Image, radius: float | None = None) -> Image.Image:
    """Local average colour subtracted: 4 * img - 4 * GaussianBlur(img) + 128, black outside
    90 % of the eye radius. img is an eye crop (crop_eye's output) whose eye radius is `radius`,
    centred; with radius None the eye is located with find_eye. Graham filled the outside with
    grey 128; black matches the zeros that dataloader.BatchTransform's rotations pad with, and
    keeps find_eye and is_eye_crop working on the output."""
    rgb = to_rgb(img)
    if radius is None:
        cx, cy, radius = find_eye(rgb)
    else:
        cx, cy = rgb.width / 2, rgb.height / 2
    yy, xx = np.ogrid[:rgb.height, :rgb.width]
    distance = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    eye = eye_region(rgb) & (distance < radius)
    # The average runs over the eye alone (normalised convolution, Knutsson & Westin 1993). A plain
    # blur mixes in the black beyond the eye: the halo at the rim is what Graham's 90 % cut hides,
    # but where the frame clipped the eye (most EyePACS photos) it leaves a bright band inside.
    blur = ImageFilter.GaussianBlur(radius * GRAHAM_SIGMA)
    pixels = np.asarray(rgb, np.float32)
    summed = np.asarray(Image.fromarray(np.where(eye[..., None], np.asarray(rgb), 0)).filter(blur), np.float32)
    weight = np.asarray(Image.fromarray(eye.astype(np.uint8) * 255).filter(blur), np.float32) / 255
    local = summed / np.maximum(weight, 1 / 255)[..., None]
    out = np.clip(4 * (pixels - local) + 128, 0, 255).astype(np.uint8)
    out[~eye | (distance > GRAHAM_KEEP * radius)] = 0
    return Image.fromarray(out)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (any case of the extension), sorted; one directory
    listing and no stat per file (EyePACS' train folder holds 35,126)."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
