"""Fundus photographs: decoding any file as RGB, finding the eye's circle, judging whether the photo is
gradable (a fitted score, quality_model.json), the square crop of the eye, and Ben Graham's normalisation.
data/prepare.py crops datasets with it; evaluate.py --images crops new photographs with the same functions,
so a photo is prepared the same way in both.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, ImageChops, ImageFilter
from scipy import ndimage

from runtime import atomic_write

# Image files, in order of preference when a dataset holds one name with several extensions.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")

# Detection needs the eye's outline, not its detail: on a copy at most this wide, find_eye takes
# 12 ms on a 3000x2000 photo (39 ms at 1024) and its radius is 0.2 % off (0.1 % at 1024).
DETECT_SIDE = 512
# The background is read in the frame's four corners, in patches this fraction of each side: a field that
# fills a 4:3 frame leaves black only in small rounded or cut corners (a 253 px photo whose field reached
# 98 % of the half-diagonal had 4 px of black along each diagonal). A corner's 10th percentile ignores a
# timestamp or caption burnt in there, and the darkest corner wins over one that holds retina.
CORNER = 0.025
# The eye's rim is much darker than its centre (vignetting), so a pixel counts as eye already this fraction
# of the way from the background's level to the bright (95th percentile) level, and at least MIN_STEP grey
# levels above the background (JPEG noise on black: sigma 2-3 after the 3x3 blur).
RIM_FRACTION = 0.15
MIN_STEP = 8
# Below this many grey levels between background and eye there is nothing to find: black,
# blank or overexposed photos.
MIN_CONTRAST = 15
# A fundus camera leaves black around its field, in the corners at least (0-14 in every photo measured for
# assess below); a photo whose darkest corner is brighter than this shows no field: a scene, static, a wall.
MAX_BACKGROUND = 40
MIN_EYE_AREA = 0.01  # of the frame; smaller bright blobs are text or reflections, not an eye
# A field stop's flat top or bottom (EyePACS) is a chord at least this share of the diameter long; a
# narrower top is the circle's own rim, or a dark sector there, and the circle bounds the field instead.
FLAT_CHORD = 0.3
# Ben Graham's Kaggle 2015 winning preprocessing: the blur's sigma is 1/30 of the eye radius
# (10 px at his radius 300), and the outer 10 % of the radius is blanked ("remove boundary effects").
GRAHAM_SIGMA = 1 / 30
GRAHAM_KEEP = 0.9


# --------------------------------------------------------------------------- reading photos
def png_bits(img: Image.Image) -> tuple[int, int | None]:
    """(bit depth, significant bits) of a PNG file: its IHDR's depth and its sBIT chunk's largest value
    (None without one), read from the chunks before the pixel data; (8, None) for anything else. Pillow
    keeps neither, and a 16-bit camera file with 12 significant bits holds values under 4,096."""
    name = getattr(img, "filename", None)
    if img.format != "PNG" or not name:
        return 8, None
    with open(name, "rb") as f:
        head = f.read(1 << 16)
    depth, significant, at = head[24] if len(head) > 24 else 8, None, 8
    while at + 8 <= len(head):
        length, kind = int.from_bytes(head[at:at + 4], "big"), head[at + 4:at + 8]
        if kind == b"sBIT" and length:
            significant = max(head[at + 8:at + 8 + length])
        if kind in (b"IDAT", b"IEND"):
            break
        at += 12 + length
    return depth, significant


# A 16-bit container whose values all stay under this holds 12-bit data (many fundus cameras' sensors).
TWELVE_BITS = 4096


def full_scale(img: Image.Image, values: np.ndarray) -> float:
    """The value that is white: by the bit depth (a PNG's sBIT where it has one; else 12 bits when every value
    stays under TWELVE_BITS, 16 bits otherwise; 1.0 for floats within 0-1), never by the image's own peak, so
    a dim photo stays dim."""
    significant = png_bits(img)[1]
    if significant:
        return 2.0 ** significant - 1
    peak = float(values.max(initial=0))
    if img.mode == "F" and peak <= 1.0:
        return 1.0
    return 2.0 ** (12 if peak < TWELVE_BITS else 16) - 1


def colour_png16(img: Image.Image) -> Image.Image:
    """A 16-bit RGB or RGBA PNG as 8-bit RGB, scaled by its bit depth (full_scale) and composited onto black.
    Pillow has no 16-bit colour mode and keeps each value's high byte: a 12-bit photo came back in 16 grey
    levels, or 16 times too dark without an sBIT chunk to say so. imagecodecs (libpng) decodes the values."""
    try:
        values = imagecodecs.png_decode(Path(img.filename).read_bytes()).astype(np.float32)
    except imagecodecs.PngError as err:  # as Pillow's decoding errors are: the photo is unreadable
        raise OSError(f"libpng: {err}") from err
    colour, alpha = values[..., :3], values[..., 3:]
    colour = colour * (255 / full_scale(img, colour))
    if alpha.size:
        colour = colour * (alpha / 65535)
    return Image.fromarray(np.clip(np.rint(colour), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: high-depth images scaled by their bit depth (full_scale); transparency composited
    onto black (a transparent PNG background may hold any colour, often white, that would pass as eye)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img, np.float32)
        img = Image.fromarray(np.clip(np.rint(values * (255 / full_scale(img, values))), 0, 255).astype(np.uint8))
    elif img.mode in ("RGB", "RGBA") and img.format == "PNG" and png_bits(img)[0] == 16:
        img = colour_png16(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# A JPEG ends with its end-of-image marker (FF D9). A copy cut short and padded with zeros to its size (what a
# broken copy or an interrupted download leaves) ends in a run of zero bytes instead, which the decoder reads
# as image data without a word: flat blocks below the last real row, which the gradability check graded
# (quality 0.99 in the hostile trial of issue 31). At least ZERO_TAIL zero bytes at the end, with no end
# marker before them, is a damaged file. Only the file's tail is read (4 KB, more while it is all zeros).
ZERO_TAIL = 256


def zero_padded(path) -> int:
    """How many zero bytes end a JPEG file in place of its end-of-image marker (0 where the file ends, or its
    zeros begin, with the marker: some cameras pad a whole file after it)."""
    with open(path, "rb") as f:
        end = pos = f.seek(0, os.SEEK_END)
        chunk = 4096
        while pos > 0:
            n = min(chunk, pos)
            f.seek(pos - n)
            kept = len(f.read(n).rstrip(b"\0"))
            if kept:
                last = pos - n + kept  # one past the last byte that is not zero
                f.seek(max(0, last - 2))
                return 0 if f.read(2) == b"\xff\xd9" else end - last
            pos, chunk = pos - n, 2 * chunk
        return end


def check_whole(path, img: Image.Image) -> None:
    """OSError (as the decoder's own errors: the photo is unreadable) for a JPEG padded with zeros in place
    of its end (see ZERO_TAIL)."""
    if img.format == "JPEG" and (zeros := zero_padded(path)) >= ZERO_TAIL:
        raise OSError(f"damaged: its last {zeros} bytes are zeros where a JPEG's image data and end marker "
                      "belong (a copy cut short and padded); the photo below its last real row is no image")


def decode(path: Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode as RGB. A JPEG with at_least (w, h) decodes at the smallest of the DCT's 1/1, 1/2, 1/4 and 1/8
    scales that is at least that large (draft mode: the decoder skips the detail, several times faster).
    A JPEG padded with zeros in place of its end is an OSError (check_whole)."""
    with Image.open(path) as img:
        check_whole(path, img)
        if img.format == "JPEG" and at_least is not None:
            img.draft("RGB", at_least)
        img.load()
        return to_rgb(img)


# load_photo decodes a JPEG at the smallest DCT scale whose short side is this many times the crop's size:
# enough for an eye spanning 80 % of the short side (EyePACS' span the whole height, 4:3 fields more), so a
# 12 MP camera file decodes at 1/4. A smaller eye is decoded again, larger. Decoding twice costs most of a
# full decode (entropy decoding does not shrink with the scale: 38 + 22 ms against 51 for a full one).
DRAFT_SPAN = 1.25


def photo_for_crop(path: Path, size: int) -> tuple[Image.Image, Field]:
    """A photo decoded for an eye crop of `size` at the least decoding cost, and its field in pixels of the
    photo returned; NoField (with the photo as .photo) when it shows none. A JPEG decodes at a reduced
    scale (see DRAFT_SPAN), and again at a larger one only where its eye came out under `size` across:
    the crop is only ever a downsample."""
    with Image.open(path) as img:
        full, is_jpeg = img.size, img.format == "JPEG"
    # never under the smallest photo the gradability check judges (MIN_SIDE), whatever the crop's size
    scale = min(1.0, max(DRAFT_SPAN * size, MIN_SIDE) / min(full))
    photo = decode(path, tuple(math.ceil(side * scale) for side in full) if is_jpeg else None)
    try:
        field = find_field(photo)
    except NoField as err:
        err.photo = photo
        raise
    if not is_jpeg or 2 * field.r >= size or photo.size == full:
        return photo, field
    bigger = decode(path, tuple(math.ceil(side * size / (2 * field.r)) for side in photo.size))
    k = bigger.width / photo.width
    return bigger, Field(field.cx * k, field.cy * k, field.r * k, field.top * k, field.bottom * k, bigger.size)


def load_photo(path: Path, size: int, min_quality: float | None = None) -> tuple[Image.Image, "Quality"]:
    """photo_for_crop, and the photo's assessment at the operating point min_quality (default the model's;
    its field in pixels of the photo returned; the whole frame where it shows none)."""
    try:
        photo, field = photo_for_crop(path, size)
    except NoField as err:
        return err.photo, assess(err.photo, frame_field(err.photo.size), min_quality)
    return photo, assess(photo, field, min_quality)


# --------------------------------------------------------------------------- finding the eye
class NoField(ValueError):
    """The photo shows no camera field (no eye): the message says what was seen instead."""


@dataclass(frozen=True)
class Field:
    """The camera's field in a photo of `size` (w, h): the circle (cx, cy, r, in pixels) and the rows where a
    flat field stop or the frame ends it. Dark lesions, a dark sector at the rim, a vignetted edge all lie
    inside; the field is the camera's, not the retina's bright part."""

    cx: float
    cy: float
    r: float
    top: float
    bottom: float
    size: tuple[int, int]
    # the lit region on the reduced copy
    lit: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def mask(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The field as a boolean mask of `size` (default the photo's), pixel centres inside."""
        w, h = size or self.size
        sx, sy = w / self.size[0], h / self.size[1]
        yy, xx = np.ogrid[:h, :w]
        yy, xx = (yy + 0.5) / sy, (xx + 0.5) / sx
        return (np.hypot(xx - self.cx, yy - self.cy) < self.r) & (yy >= self.top) & (yy <= self.bottom)


def reduced(img: Image.Image) -> tuple[Image.Image, int]:
    """The photo as RGB on a copy at most DETECT_SIDE wide, where its field is found; the factor."""
    rgb = to_rgb(img)
    factor = max(1, math.ceil(max(rgb.size) / DETECT_SIDE))
    return (rgb.reduce(factor) if factor > 1 else rgb), factor


def brightest_channel(small: Image.Image) -> np.ndarray:
    """The brightest of R, G, B per pixel (red for a colour fundus, any for a red-free or greyscale one),
    lightly blurred against JPEG noise."""
    red, green, blue = small.split()
    brightest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    return np.asarray(brightest.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)


def background_level(grey: np.ndarray) -> float:
    """The black around the field: the darkest corner's 10th percentile (see CORNER)."""
    h, w = grey.shape
    ch, cw = max(2, round(CORNER * h)), max(2, round(CORNER * w))
    corners = [grey[:ch, :cw], grey[:ch, -cw:], grey[-ch:, :cw], grey[-ch:, -cw:]]
    return min(float(np.percentile(c, 10)) for c in corners)


def bright_region(small: Image.Image) -> np.ndarray:
    """The lit part of the field as a boolean mask of the reduced copy `small`; NoField when there is none."""
    grey = brightest_channel(small)
    h, w = grey.shape
    background, bright = background_level(grey), float(np.percentile(grey, 95))
    if background > MAX_BACKGROUND:
        raise NoField(f"no eye found: no corner of the photo is dark (the darkest is at {background:.0f} of 255), "
                      "where a fundus camera's field leaves black")
    if bright - background < MIN_CONTRAST:
        raise NoField(f"no eye found: nothing is more than {MIN_CONTRAST} grey levels brighter than the "
                      f"darkest corner ({background:.0f}); a black, blank or overexposed photo")
    level = background + max(RIM_FRACTION * (bright - background), MIN_STEP)
    # opening cuts thin bright lines (a frame drawn by the camera, caption strokes) off the eye
    # (grey_opening: separable min/max filters, 2.5x faster than binary_opening's 5x5 structure)
    mask = ndimage.grey_opening((grey > level).view(np.uint8), size=(5, 5)).astype(bool)
    labels, count = ndimage.label(mask)
    areas = np.bincount(labels.ravel())[1:] if count else np.zeros(1)
    if areas.max() < MIN_EYE_AREA * h * w:
        raise NoField("no eye found: no bright region covers 1 % of the photo")
    return labels == 1 + int(areas.argmax())


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
    """Least-squares circle (Kasa 1976: linear in cx, cy, r^2 - cx^2 - cy^2), refitted without the points
    far inside it, three times: those are edges of a dark sector or a notch at the rim, never of the field,
    which no lit pixel lies outside of."""
    for _ in range(4):
        design = np.column_stack([2 * x, 2 * y, np.ones_like(x)])
        (cx, cy, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
        r = math.sqrt(max(c + cx * cx + cy * cy, 0.0))
        off = np.hypot(x - cx, y - cy) - r
        keep = off >= -(3 * np.median(np.abs(off)) + 1)
        if keep.all() or keep.sum() < 10:
            break
        x, y = x[keep], y[keep]
    return float(cx), float(cy), r


def find_field(img: Image.Image, small: tuple[Image.Image, int] | None = None) -> Field:
    """The camera's field of the photo; NoField when it shows none.

    The circle is fitted to the left and right ends of the lit region's rows; to the ends of its columns
    only when the frame cuts every row (their top ends would include flat tops). An eye cut on all sides,
    with no usable ends, is taken as the lit region's extent. small: reduced(img), when already made."""
    small_img, factor = small or reduced(img)
    mask = bright_region(small_img)
    x, y = row_ends(mask)
    if len(x) < 10:
        y, x = row_ends(mask.T)
    if len(x) >= 10:
        cx, cy, r = fit_circle(x, y)
    else:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        cx, cy = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
        r = max(cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) / 2
    rows, left, right = row_edges(mask)
    width = right - left
    top = rows[0] if width[0] >= FLAT_CHORD * 2 * r else cy - r
    bottom = rows[-1] + 1 if width[-1] >= FLAT_CHORD * 2 * r else cy + r
    return Field(cx * factor, cy * factor, r * factor, top * factor, bottom * factor, img.size, mask)


def find_eye(img: Image.Image) -> tuple[float, float, float]:
    """(cx, cy, radius) of the eye in pixels of img; NoField (a ValueError) when the photo shows no eye."""
    field = find_field(img)
    return field.cx, field.cy, field.r


def eye_region(img: Image.Image) -> np.ndarray:
    """Where img shows the eye, as a boolean mask of its size: the camera's field (see Field), so dark
    lesions or a dark sector at the rim count as eye, and edges where the frame cut it stay straight."""
    return find_field(img).mask()


def is_square(size: tuple[int, int]) -> bool:
    """Sides within 1 % of each other: the shape of an eye crop; camera frames are 4:3 or 3:2."""
    return abs(size[0] - size[1]) <= 0.01 * max(size)


def is_eye_crop(img: Image.Image, field: Field | None = None) -> bool:
    """True when img already is an eye crop, so re-cropping would change (almost) nothing.

    The rule: the image is square (sides within 1 %), and its field's circle (found here unless given) is
    centred within 3 % of the side and its diameter is 85-103 % of the side. 85 %, because --ben-graham
    output is black beyond 90 % of the radius. A photo with no eye is not a crop."""
    side = max(img.size)
    if not is_square(img.size):
        return False
    try:
        field = field or find_field(img)
    except NoField:
        return False
    centred = max(abs(field.cx - img.width / 2), abs(field.cy - img.height / 2)) <= 0.03 * side
    return centred and 0.85 * side <= 2 * field.r <= 1.03 * side


# --------------------------------------------------------------------------- gradability
# The check is a measured classifier (issue 19): a few measures of the field, each independent of the camera's
# resolution and exposure; a logistic regression on three of them scores gradability, and three one-measure
# limits tell a retina from anything else: the lit region's span, specular glints and a fitted limit on colour
# edges (chroma_edges). QUALITY_MODEL holds the limit, the coefficients and the operating point, fitted by
# benchmarks/quality_check.py on public labelled photographs (DrimDB, EyePACS with EyeQ's labels) with the held-out
# figures beside them. The measures are taken on the field's bounding square resampled to QUALITY_SIDE, so a photo
# at 350, 760 or 1,500 px (or a 12 MP camera file) gives the same numbers.
QUALITY_SIDE = 256
# The smallest photo (short side, in px) the check judges: under it the measures are not what they were fitted
# on, and a gradable photo reads as out of focus. Shrunk to a short side of 16, 32, 48, 64, 96 and 128 px, the
# 119 gradable photos fitted (DrimDB good, EyePACS with EyeQ good or usable) passed 2, 68, 103, 111, 114 and 117
# times, and the 586 rahim_pairs photos passed at their own size (never fitted on) 0, 222, 511, 574, 586 and 586
# times (benchmarks/quality_check.py --rahim, "shrunk"): from 96 px none is lost that 128 px keeps on rahim.
MIN_SIDE = 96
QUALITY_MODEL = Path(__file__).with_name("quality_model.json")
# Inside this share of the radius: the rim of every camera is vignetted, notched or cut by the frame.
QUALITY_INNER = 0.9
# Sharpness is judged patch by patch (16 px of 256: about two vessel widths near the disc) and read where the
# photo is sharpest, the 90th percentile of the patches: a haemorrhage, an exudate cluster or fibrosis
# covering part of the field leaves the rest's vessels to judge by. On a drawn eye with a blot haemorrhage over
# a quarter of its field the 90th percentile read 0.25 (0.14 without it), the median over patches 0.006: out
# of focus, as the old whole-field vessel contrast called the severe eyes of another camera.
SHARP_PATCH, SHARP_PERCENTILE = 16, 90
# The band-pass's sigmas (px of QUALITY_SIDE): vessel scale, and coarser than the finest detail a 350 px photo
# holds (its field is about 256 px across). In an earlier version of these measures (0.8, 3) refused 67 % of
# DrimDB's bad photos held out, (1.2, 3.5) 72 %; the same eye at 350 and 760 px differed most at the finest.
SHARP_SIGMAS = (1.6, 4.0)
# Colour edges are read on the square at half QUALITY_SIDE (128 px), the blue share smoothed over CHROMA_SIGMA px
# there and over at least CHROMA_SOURCE_PX pixels of the photo itself (a 128 px photo's JPEG chroma is blotchy
# pixel by pixel: the demo set's read up to 1.9 times the highest real fundus photo at 1.5 px, at most 1.15 at 3
# of its own), where the brightest channel is at least CHROMA_FLOOR of 255 over CHROMA_LIT px around (darker,
# the blue share is JPEG noise: 20 raised no fundus photo's reading by more than 2 %, the dimmest DrimDB photos'
# most, to 0.87 of the highest; 40 left DrimDB's dim room, median 37 of 255, unread), CHROMA_RIM px inside the field's edge and CHROMA_GROW px away from the
# brightest CHROMA_BRIGHT % of the field (the optic disc, exudates and cotton-wool spots are yellow or white on
# orange: their rims are the only sharp colour edges a retina has), at the CHROMA_PERCENTILE percentile.
CHROMA_SIGMA, CHROMA_SOURCE_PX, CHROMA_FLOOR, CHROMA_LIT, CHROMA_RIM = 1.5, 3.0, 20, 3, 3
CHROMA_BRIGHT, CHROMA_GROW, CHROMA_PERCENTILE = 5, 2, 95
# Pixels darker than this (of 255, brightest channel) carry no colour: JPEG noise on black.
DARK = 12
# Specular glints (see specular_dots): white spots (darkest channel at least DOT_WHITE of the brightest) that rise
# DOT_RISE (of 255) over every line of DOT_LINE px (of QUALITY_SIDE) through them, DOT_RIM px or more inside the
# field. A photo with more than MAX_DOTS of them is not a fundus photo. On 259 real fundus photos (DrimDB good and
# bad, EyePACS of every grade) the most was 1 (three photos; 256 had none), on 300 drawn demo eyes 2; DrimDB's
# skin close-ups taken through the camera 14 and 57, its other outliers 0-24. A fixed limit, 8 times the most of
# any fundus photo, not fitted: a count of a rare event, and a fundus photo called no fundus is the worst wrong
# reason there is. By the square's top-hat alone (no lines), a young retina's vessel reflexes made 110 spots,
# the skin close-ups 102 and 90; by lines at 4 orientations, every pixel judged and no pixel missed, still 12.
DOT_LINE, DOT_ANGLES, DOT_MISS, DOT_RISE, DOT_WHITE, DOT_RIM, MAX_DOTS = 7, 8, 2, 20, 0.75, 4, 8


@dataclass(frozen=True)
class Quality:
    """assess()'s answer: gradable or not at the operating point, why not (one phrase), the score in [0, 1]
    (how likely a grader could grade it), the field judged (frame_field where the photo shows none) and the
    measures it rests on."""

    gradable: bool
    reason: str
    field: Field
    measures: dict
    score: float = 1.0


def frame_field(size: tuple[int, int]) -> Field:
    """The whole frame as the field, for a photo that shows no camera field: a fundus photo that fills its
    frame with retina is judged (and cropped) on that retina, padded with black to a square."""
    w, h = size
    return Field(w / 2, h / 2, max(w, h) / 2, 0.0, float(h), (w, h))


def field_square(photo: Image.Image, field: Field) -> tuple[Image.Image, np.ndarray]:
    """The field's bounding square, resampled from the photo itself to QUALITY_SIDE, and where it lies inside
    QUALITY_INNER of the radius, the photo (a frame cuts many fields) and a flat field stop. One antialiased
    resampling from the photo, whatever its size: measuring on the reduced copy made for find_field left a
    350 px photo sharper than its 760 px twin (that copy is box-reduced by 2 at 760 px, not at 350)."""
    left, top, side = round(field.cx - field.r), round(field.cy - field.r), max(1, round(2 * field.r))
    square = photo.crop((left, top, left + side, top + side)).resize((QUALITY_SIDE, QUALITY_SIDE), Image.BILINEAR,
                                                                      reducing_gap=2.0)
    centre = (np.arange(QUALITY_SIDE) + 0.5) * (side / QUALITY_SIDE)
    x, y = centre + left, centre + top
    # within a pixel of the frame's edge, the resampling already mixed in the black that crop() padded with
    margin = side / QUALITY_SIDE
    rows = (y >= margin) & (y <= photo.height - margin) & (y >= field.top) & (y <= field.bottom)
    columns = (x >= margin) & (x <= photo.width - margin)
    inside = np.hypot(*np.meshgrid(x - field.cx, y - field.cy)) < QUALITY_INNER * field.r
    return square, inside & rows[:, None] & columns[None, :]


def sharpness(green: np.ndarray, inside: np.ndarray) -> float:
    """Vessel-scale darkening (a difference of Gaussians, SHARP_SIGMAS px at QUALITY_SIDE) over the local
    brightness, its 95th percentile per patch, read at SHARP_PERCENTILE over the patches that lie in the field
    (see SHARP_PATCH). Relative to the local brightness, so a dim or vignetted part counts as a bright one."""
    coarse = ndimage.gaussian_filter(green, SHARP_SIGMAS[1])
    band = coarse - ndimage.gaussian_filter(green, SHARP_SIGMAS[0])
    relative = band / np.maximum(ndimage.uniform_filter(coarse, 2 * SHARP_PATCH), 4.0)
    n = QUALITY_SIDE // SHARP_PATCH
    covered = inside.reshape(n, SHARP_PATCH, n, SHARP_PATCH).mean(axis=(1, 3)) >= 0.9
    if not covered.any():
        return 0.0
    tiles = relative.reshape(n, SHARP_PATCH, n, SHARP_PATCH).transpose(0, 2, 1, 3)[covered]
    tiles = tiles.reshape(-1, SHARP_PATCH ** 2)
    k = round(0.95 * (SHARP_PATCH ** 2 - 1))
    return float(np.percentile(np.partition(tiles, k, axis=1)[:, k], SHARP_PERCENTILE))


def chroma_edges(rgb: tuple[np.ndarray, np.ndarray, np.ndarray], brightest: np.ndarray, inside: np.ndarray,
                 side: float) -> float:
    """How sharply the field's blue share b/(r+g+b) changes: its gradient's CHROMA_PERCENTILE percentile over the
    well-lit field, away from its brightest parts (see CHROMA_SIGMA; side: the field's bounding square in the
    photo's pixels; rgb, brightest and inside: the square's channels, their maximum and the field, all at half
    QUALITY_SIDE, as quality_measures has them). A retina is one tissue lit through one pupil, and what changes its
    colour is blood and pigment, which trade red against green: vessels, haemorrhages, fibrosis and laser scars
    leave the blue share nearly as it was (a drawn blot haemorrhage over a quarter of the field reads 0.4 of the
    highest real fundus photo; its red share's gradient read 2.0). An outer eye, an eyelid, skin, a face or a room
    is several materials side by side, and the blue share jumps where sclera meets iris or skin, where lashes cross
    skin. 0 where too little of the field is lit to tell."""
    total = rgb[0] + rgb[1] + rgb[2]
    sigma = max(CHROMA_SIGMA, CHROMA_SOURCE_PX * total.shape[0] / max(side, 1.0))
    blue = ndimage.gaussian_filter(rgb[2] / np.maximum(total, 1.0), sigma)
    keep = ndimage.binary_erosion(inside, iterations=CHROMA_RIM) & \
        (ndimage.minimum_filter(brightest, CHROMA_LIT) > CHROMA_FLOOR)
    if keep.sum() < 64:
        return 0.0
    keep &= ~ndimage.binary_dilation(total > np.percentile(total[keep], 100 - CHROMA_BRIGHT), iterations=CHROMA_GROW)
    return float(np.percentile(np.hypot(*np.gradient(blue))[keep], CHROMA_PERCENTILE)) if keep.sum() >= 64 else 0.0


def running(a: np.ndarray, n: int, op, axis: int) -> np.ndarray:
    """op (np.minimum or np.maximum) over n (odd) neighbours along axis, the edge repeated beyond it: the
    shifted slices of numpy, 10-20 times faster on a 256 px square than scipy.ndimage's filters."""
    h, length = n // 2, a.shape[axis]
    padded = np.moveaxis(np.pad(a, [(h, h) if i == axis else (0, 0) for i in range(a.ndim)], mode="edge"), axis, 0)
    out = padded[:length].copy()
    for k in range(1, n):
        op(out, padded[k:k + length], out=out)
    return np.moveaxis(out, 0, axis)


def box(a: np.ndarray, n: int, op) -> np.ndarray:
    """op over the n x n box around each pixel (see running): an erosion (np.minimum) or dilation."""
    return running(running(a, n, op, 0), n, op, 1)


def specular_dots(rgb: np.ndarray, inside: np.ndarray) -> int:
    """How many specular glints the field shows: white spots whose brightest pixel stands DOT_RISE over every
    line of DOT_LINE px through it, at DOT_ANGLES orientations (each line's DOT_MISS + 1-th darkest pixel: a
    thin line drawn on pixels steps off itself now and then). Moist skin, an eyelid, a cornea or a tear film
    under the camera's flash is strewn with them; a retina, seen through the eye's optics with the corneal
    reflex designed out, shows none: the vessels' light reflexes are lines, and the line along one keeps its
    brightness; exudates and drusen are yellow, not white (see DOT_WHITE). rgb: the square at QUALITY_SIDE,
    inside: the field there."""
    channels = [rgb[..., c].astype(np.int16) for c in range(3)]
    low = np.minimum(np.minimum(channels[0], channels[1]), channels[2])
    top = np.maximum(np.maximum(channels[0], channels[1]), channels[2])
    keep = box(inside, 2 * DOT_RIM + 1, np.minimum) & (low >= DOT_WHITE * np.maximum(top, 1))
    # the opening by a square is at most the opening by any line inside it: its top-hat finds every candidate
    keep &= low - box(box(low, DOT_LINE, np.minimum), DOT_LINE, np.maximum) > DOT_RISE
    labels, n = ndimage.label(keep, structure=np.ones((3, 3)))
    if not n:
        return 0
    # each spot judged where it is brightest over 3 x 3 px: a line's flank, half on it, reads as a row of dots,
    # and of a line's equally bright pixels the first is an end
    ys, xs = np.nonzero(labels)
    clip = lambda a, n: np.clip(a, 0, n - 1)  # noqa: E731
    near = sum(low[clip(ys + dy, low.shape[0]), clip(xs + dx, low.shape[1])].astype(np.int32)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    spot = labels[ys, xs]
    order = np.lexsort((-near, spot))
    brightest = order[np.r_[True, spot[order][1:] != spot[order][:-1]]]
    ys, xs = ys[brightest], xs[brightest]
    steps = np.arange(1 - DOT_LINE, DOT_LINE)
    opened = np.zeros(n, np.int16)
    for angle in np.arange(DOT_ANGLES) * (np.pi / DOT_ANGLES):
        # a digital line: one pixel a step along its major axis (a diagonal's 7 px span 7 rows and 7 columns)
        sin, cos = np.sin(angle), np.cos(angle)
        major = max(abs(sin), abs(cos))
        dy, dx = np.round(steps * sin / major).astype(int), np.round(steps * cos / major).astype(int)
        along = low[clip(ys[:, None] + dy, low.shape[0]), clip(xs[:, None] + dx, low.shape[1])]
        # each line of DOT_LINE px through the pixel: its DOT_MISS + 1-th darkest; the opening is the largest
        windows = np.lib.stride_tricks.sliding_window_view(along, DOT_LINE, axis=1)
        opened = np.maximum(opened, np.partition(windows, DOT_MISS, axis=2)[..., DOT_MISS].max(axis=1))
    return int((low[ys, xs] - opened > DOT_RISE).sum())


def quality_measures(photo: Image.Image, field: Field) -> dict:
    """The measures the check judges by, of the field (see field_square): sharpness; brightness (median
    brightest channel, 0-1), saturation (median), white (share where all three channels exceed 200),
    contrast (green's 5-95 % range over its median), each on the field's lit pixels at half QUALITY_SIDE
    (they need no more, and cost a quarter); chroma_edges and specular_dots (see there); the
    field's median colour and its span (for is_ben_graham_crop)."""
    square, inside = field_square(to_rgb(photo), field)
    pixels = np.asarray(square)
    sharp = sharpness(pixels[..., 1].astype(np.float32), inside)
    red, green, blue = (np.asarray(c, np.float32) for c in square.reduce(2).split())
    brightest = np.maximum(np.maximum(red, green), blue)
    half = inside[::2, ::2] & inside[1::2, 1::2]
    lit = half & (brightest > DARK)
    if lit.sum() < 0.05 * half.sum():
        lit = half
    r, g, b, top = red[lit], green[lit], blue[lit], brightest[lit]
    darkest = np.minimum(np.minimum(r, g), b)
    low, median_green, high = np.percentile(g, [5, 50, 95])
    return {"brightness": float(np.median(top)) / 255,
            "saturation": float(np.median((top - darkest) / np.maximum(top, 1.0))),
            "white": float((darkest > 200).mean()), "contrast": float(high - low) / max(float(median_green), 1.0),
            "chroma_edges": chroma_edges((red, green, blue), brightest, half, 2 * field.r),
            "specular_dots": specular_dots(pixels, inside),
            "sharpness": sharp, "red": float(np.median(r)), "green": float(median_green),
            "blue": float(np.median(b)), "span": 2 * field.r / min(field.size)}


# The limits beyond which no model is asked (the score is 0): a field this dark (median brightest channel,
# of full scale: DrimDB's black "bad" photos from 0.008; every good photo of DrimDB and EyeQ 0.27 or more,
# the dimmest EyePACS photo 0.19) or this white (share of the field over 200 in all three channels: DrimDB's
# washed-out "bad" photos 0.87-0.89, every good photo 0.001 or less) shows nothing to grade, and a grey one
# (median saturation: DrimDB's grey "bad" photos and greyscale copies 0, every colour fundus photo of both
# sets 0.11 or more, bluish EyePACS eyes the lowest; two thirds of that) is no colour photo for a grader
# trained on colour.
MIN_BRIGHTNESS, MAX_WHITE, MIN_SATURATION = 0.12, 0.5, 0.075
# And a field whose sharpest patches are this soft is out of focus whatever else it shows (half the softest
# gradable photo's sharpness: DrimDB good 0.049-0.16, EyeQ good 0.068-0.12; DrimDB's "bad" from 0.002).
MIN_SHARPNESS = 0.025
# A camera's field spans most of its frame: 0.89-1.58 of the short side on every fundus photo of DrimDB and
# EyePACS, so a lit region under two thirds of the smallest is something else (a temple's sky, a face).
MIN_SPAN = 0.6
# A photo refused for its sharpness or contrast whose field is this dim (median brightest channel, of full
# scale) is called too dark: the darkness is what hid the detail. Every good photo of DrimDB and EyeQ is
# brighter (0.27-0.87); brightness is no input to the score, so a dim photo with sharp vessels is graded.
DIM = 0.25
# What each measure, when it is the one that pulls the score down most, says about the photo: (the
# measure, whether it is too low) -> the reason.
REASONS = {("sharpness", True): "out of focus", ("white", False): "overexposed",
           ("contrast", True): "low contrast", ("contrast", False): "uneven illumination"}
NOT_FUNDUS = "not a fundus photo"
MAX_Z = 3.0  # standard deviations (see model_inputs)


@functools.lru_cache(maxsize=4)
def quality_model(path: Path = QUALITY_MODEL) -> dict:
    """The fitted coefficients (benchmarks/quality_check.py writes them; provenance inside)."""
    return json.loads(Path(path).read_text())


def check_version(model: dict | None = None) -> str:
    """Which gradability check judges: the first 12 hex digits of the SHA-256 of its fitted model (default
    QUALITY_MODEL), provenance included. A change of the measures is refitted, and its held-out figures in the
    provenance change with it; data/prepare.py records this beside the operating point."""
    model = quality_model() if model is None else model
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:12]


def model_inputs(part: dict, measures: dict) -> np.ndarray:
    """The measures a model part reads, as it was fitted on them: log(value + offset), standardised, and
    held within MAX_Z of the fitted photos' mean: a flat field's contrast of 0 must not outvote its sharpness
    of 0 by extrapolating a line fitted on photographs far from it."""
    x = np.array([math.log(measures[name] + offset) for name, offset in zip(part["measures"], part["offsets"])])
    return np.clip((x - np.array(part["mean"])) / np.array(part["scale"]), -MAX_Z, MAX_Z)


def probability(part: dict, measures: dict) -> float:
    """A logistic regression's probability of its positive class (the gradable part: gradable)."""
    logit = float(model_inputs(part, measures) @ np.array(part["coef"]) + part["intercept"])
    return 1 / (1 + math.exp(-max(-40.0, min(40.0, logit))))


def weakest_measure(part: dict, measures: dict) -> tuple[str, bool]:
    """The measure that lowers the gradability logit most against a typical gradable photo (the fit's mean
    of its gradable class), and whether it lies below that photo's."""
    z = model_inputs(part, measures)
    pull = np.array(part["coef"]) * (z - np.array(part["gradable_mean"]))
    i = int(np.argmin(pull))
    return part["measures"][i], bool(z[i] < part["gradable_mean"][i])


def exposure_fault(measures: dict) -> str:
    """Why the photo shows nothing to grade, beyond the exposure limits above; "" when it is within them."""
    if measures["brightness"] < MIN_BRIGHTNESS:
        return f"too dark: the field's median is {measures['brightness']:.0%} of full scale"
    if measures["white"] > MAX_WHITE:
        return f"overexposed: {measures['white']:.0%} of the field is white"
    if measures["saturation"] < MIN_SATURATION:
        return f"not a colour photo: the field's median saturation is {measures['saturation']:.2f}"
    return ""


def not_fundus(model: dict, measures: dict) -> str:
    """Why the photo is not a fundus photo: a lit region far smaller than any camera's field, specular glints,
    or colour edges over the fitted limit; "" when it may be one. Each is one measure of what a retina never
    shows, whatever its quality, pigment or reflexes: a regression on the colour spread, contrast and sharpness
    (fitted against DrimDB's outliers) read a sharp young retina's sheen and a tessellated fundus's choroid on
    another camera as no retina (3 of 593 photos of rahim_pairs), and refused one outlier that the colour edges
    now refuse alone (see CHROMA_FLOOR)."""
    if measures["span"] < MIN_SPAN:
        return f"{NOT_FUNDUS}: its lit region spans {measures['span']:.0%} of the photo's short side"
    if measures["specular_dots"] > MAX_DOTS:
        return (f"{NOT_FUNDUS}: it shows {measures['specular_dots']} specular glints, as skin or the eye's surface "
                f"does under a flash and a retina does not (over {MAX_DOTS})")
    edges = model["fundus"]
    if measures[edges["measure"]] > edges["limit"]:
        return (f"{NOT_FUNDUS}: its colour changes sharply from place to place, as a retina's does not "
                f"({edges['measure'].replace('_', ' ')} {measures[edges['measure']]:.4f}, over {edges['limit']:.4f})")
    return ""


def plainly_blurred(measures: dict) -> str:
    """Out of focus beyond doubt (MIN_SHARPNESS); "" otherwise."""
    if measures["sharpness"] < MIN_SHARPNESS:
        return f"out of focus: sharpness {measures['sharpness']:.3f} where the field is sharpest"
    return ""


def verdict(measures: dict, min_quality: float | None = None, model: dict | None = None) -> tuple[bool, str, float]:
    """(gradable, reason, score). The score is P(gradable) from the fitted gradable part, and 0 beyond the
    exposure limits, for what is plainly not a fundus photo (see not_fundus) or plainly blurred; refused under
    min_quality (default: the model's operating point), the reason naming what is wrong. A photo that may be
    a fundus is judged as one, on its quality measures alone: the fundus limits never lower the score of a
    photo they do not refuse outright (an in-between "unlike a retina" refused three gradable DrimDB photos
    and three severe EyePACS eyes, their two-tone fields or lesions read as more than one hue).
    model: the fitted JSON (default QUALITY_MODEL)."""
    model = model or quality_model()
    min_quality = model["min_quality"] if min_quality is None else min_quality
    fault = exposure_fault(measures) or not_fundus(model, measures) or plainly_blurred(measures)
    quality = 0.0 if fault else probability(model["gradable"], measures)
    if quality >= min_quality:
        return True, "", quality
    tail = f" (quality {quality:.2f}, under {min_quality:.2f})"
    if fault:
        return False, fault + tail, quality
    name, low = weakest_measure(model["gradable"], measures)
    if measures["brightness"] < DIM and name in ("sharpness", "contrast"):
        return False, f"too dark: brightness {measures['brightness']:.3f}, {name} {measures[name]:.3f}" + tail, \
            quality
    reason = f"{REASONS.get((name, low), 'low quality')}: {name.replace('_', ' ')} {measures[name]:.3f}"
    return False, reason + tail, quality


def judged_field(img: Image.Image) -> Field:
    """The field assess() judges a photo by: its camera field, or the whole frame where it shows none."""
    try:
        return find_field(img)
    except NoField:
        return frame_field(img.size)


def assess(img: Image.Image, field: Field | None = None, min_quality: float | None = None) -> Quality:
    """Whether a photo is a gradable fundus photograph at the operating point min_quality, its score, and if
    not why: too dark, overexposed, not a fundus photo, low contrast, out of focus. A photo with no camera
    field (a frame-filling fundus, or no fundus at all) is judged as a whole (frame_field)."""
    field = judged_field(img) if field is None else field
    if min(img.size) < MIN_SIDE:  # before any measure: a sliver of a few pixels has no patches to measure
        return Quality(False, f"too small: {img.width}x{img.height} px; the check judges photos of at least "
                              f"{MIN_SIDE} px on the short side", field, {}, 0.0)
    measures = quality_measures(img, field)
    gradable, reason, quality = verdict(measures, min_quality)
    return Quality(gradable, reason, field, measures, quality)


# Ben Graham's output (ben_graham: data/prepare.py --ben-graham) is not a photograph for assess() to judge:
# its field's median is grey in every channel (128-132 on 40 demo crops and three drawn photos; greyscale
# crops of the same eyes 56-114) and it is black beyond GRAHAM_KEEP of the radius, so its field spans
# 0.906-0.907 of the side (plain crops 1.00-1.003).
GRAHAM_GREY = 12


def is_ben_graham_crop(img: Image.Image, quality: Quality) -> bool:
    """Whether img is a square crop already Ben Graham-normalised, from assess()'s measures of it."""
    m = quality.measures
    if quality.field is None or "span" not in m or not is_square(img.size):
        return False
    grey = all(abs(m[channel] - 128) <= GRAHAM_GREY for channel in ("red", "green", "blue"))
    return grey and abs(m["span"] - GRAHAM_KEEP) <= 0.05


# --------------------------------------------------------------------------- crop and normalise
def crop_eye(img: Image.Image, size: int = 512, field: Field | None = None) -> Image.Image:
    """The eye's bounding square as RGB size x size (the field found here unless given); where the frame
    cut the eye off, the square reaches past the photo and PIL's crop fills it with black, so the eye
    stays round."""
    rgb = to_rgb(img)
    cx, cy, r = (field.cx, field.cy, field.r) if field is not None else find_eye(rgb)
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


# --------------------------------------------------------------------------- one photo, as data/prepare.py does
# What became of a photo.
WRITTEN, KEPT, UNGRADABLE, FAILED = "written", "kept", "ungradable", "failed"


def prepare_photo(src: Path, dst: Path, size: int, graham: bool, quality: int = 95,
                  keep_ungradable: bool = False, min_quality: float | None = None) -> tuple[str, str, float | None]:
    """Crop src into dst (JPEG at `quality`), Ben Graham-normalised with graham, unless assess() calls it
    ungradable at min_quality (then kept only with keep_ungradable). Returns (WRITTEN, KEPT, UNGRADABLE or
    FAILED, the reason, the quality score; None when it failed).
    dst appears complete or not at all (runtime.atomic_write), so an interrupted run leaves no truncated
    JPEG that the next run would skip as done."""
    try:
        photo, verdict = load_photo(src, size, min_quality)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return FAILED, f"unreadable: {' '.join(str(err).split())}", None
    if not (verdict.gradable or keep_ungradable):
        return UNGRADABLE, verdict.reason, verdict.score
    eye = crop_eye(photo, size, verdict.field)
    if graham:
        eye = ben_graham(eye, size / 2)
    # 4:4:4 chroma: microaneurysms are a few red pixels at 512 px, and 4:2:0 halves colour resolution
    with atomic_write(dst) as f:
        eye.save(f, format="JPEG", quality=quality, subsampling=0)
    return (WRITTEN if verdict.gradable else KEPT), verdict.reason, verdict.score


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (any case of the extension), sorted; one directory
    listing and no stat per file (EyePACS' train folder holds 35,126)."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
