"""Fundus photographs drawn with known geometry and the flaws of real ones: vignetting, dim exposure, a dark
sector at the rim, a camera's timestamp in a corner, fields that fill a 4:3 frame with rounded or octagonal
corners, JPEG noise. Every expected number in the tests comes from these parameters, not from the code."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ORANGE = (230, 120, 40)


def field_mask(w, h, cx, cy, r, shape="circle"):
    """Where the camera's field is: a disc, or a regular octagon with circumradius r (a pixel is inside
    when its centre is)."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    if shape == "circle":
        return np.hypot(xx - cx, yy - cy) < r
    angle = np.arctan2(yy - cy, xx - cx)
    apothem = r * math.cos(math.pi / 8)
    sector = np.round(angle / (math.pi / 4)) * (math.pi / 4)  # flat sides facing 0, 45, 90, ... degrees
    return (xx - cx) * np.cos(sector) + (yy - cy) * np.sin(sector) < apothem


def fundus_photo(w=600, h=400, cx=300.0, cy=200.0, r=180.0, *, colour=ORANGE, vignette=0.6, background=0,
                 noise=3.0, seed=0, shape="circle", dark_sector=None, timestamp=None, exposure=1.0,
                 vessels=True, disc=True, jpeg=None) -> Image.Image:
    """An orange retina, darker towards its rim, with an optic disc and dark vessels, on a noisy background.
    dark_sector: (start, end) angles in degrees where the outer third of the field is nearly unlit;
    timestamp: a corner ('tl', 'tr', 'bl', 'br') for a green date overlay; exposure scales the whole photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] + 0.5
    d = np.hypot(xx - cx, yy - cy) / r
    shade = np.clip(1 - vignette * d ** 2, 0, 1)
    if dark_sector is not None:
        angle = np.degrees(np.arctan2(yy - cy, xx - cx)) % 360
        start, end = dark_sector
        shade = np.where((angle >= start) & (angle <= end) & (d > 0.66), shade * 0.12, shade)
    inside = field_mask(w, h, cx, cy, r, shape)
    pixels = np.where(inside[..., None], np.array(colour) * shade[..., None], background)
    img = Image.fromarray(np.clip(pixels + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if disc:
        dx, dy, dr = cx + 0.45 * r, cy - 0.05 * r, 0.13 * r
        draw.ellipse([dx - dr, dy - dr, dx + dr, dy + dr], fill=tuple(min(255, int(c * 1.15 + 60)) for c in colour))
    if vessels:
        for angle in np.linspace(0, 2 * np.pi, 9)[:-1] + 0.3:
            end = (cx + 0.85 * r * np.cos(angle), cy + 0.85 * r * np.sin(angle))
            start = (cx + 0.45 * r, cy - 0.05 * r) if disc else (cx, cy)
            draw.line([start, end], fill=tuple(int(c * 0.45) for c in colour), width=max(1, round(r / 60)))
        img = img.filter(ImageFilter.GaussianBlur(max(0.5, r / 400)))  # optics: nothing is sharper than a pixel
    if exposure != 1.0:
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) * exposure, 0, 255).astype(np.uint8))
    if timestamp is not None:
        add_timestamp(img, timestamp)
    return jpeg_copy(img, jpeg) if jpeg else img


def add_timestamp(img: Image.Image, corner: str, colour=(40, 255, 40)) -> None:
    """A camera's green date and time in a corner, as many fundus cameras burn into their photos."""
    size = max(8, img.height // 18)
    font = ImageFont.load_default(size=size)
    text = "2019-03-14 10:22:31"
    width = ImageDraw.Draw(img).textlength(text, font=font)
    x = 4 if corner[1] == "l" else img.width - width - 4
    y = 3 if corner[0] == "t" else img.height - size - 5
    ImageDraw.Draw(img).text((x, y), text, fill=colour, font=font)


def jpeg_copy(img: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    out = Image.open(buffer)
    out.load()
    return out


def haemorrhage(img: Image.Image, cx: float, cy: float, r: float) -> Image.Image:
    """A large dark-red blot haemorrhage (an ellipse r by 0.8 r), its edge softened as in a photograph."""
    out = img.copy()
    ImageDraw.Draw(out).ellipse([cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r], fill=(90, 20, 10))
    return out.filter(ImageFilter.GaussianBlur(1.5))


def exudates(img: Image.Image, cx: float, cy: float, spread: float, n: int = 40, seed: int = 0) -> Image.Image:
    """A cluster of n hard exudates (yellow-white dots, 2-5 px) within spread px of (cx, cy), edges softened."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    pen = ImageDraw.Draw(out)
    for _ in range(n):
        x, y = cx + rng.normal(0, spread / 2), cy + rng.normal(0, spread / 2)
        r = rng.uniform(2, 5)
        pen.ellipse([x - r, y - r, x + r, y + r], fill=(250, 225, 120))
    return out.filter(ImageFilter.GaussianBlur(1.0))


def outer_eye(w=600, h=400, cx=300.0, cy=200.0, r=185.0, seed=0) -> Image.Image:
    """What DrimDB's outliers are: an open eye photographed through a fundus camera's field. Skin around an
    almond opening, white sclera, a brown iris with a black pupil and a catchlight, lashes along the upper lid;
    softened by the optics, with sensor noise and JPEG as a camera adds them."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (215, 160, 130))
    pen = ImageDraw.Draw(img)
    ex, ey, ew, eh = cx, cy + 0.05 * r, 0.95 * r, 0.45 * r  # a close-up: the opening spans the field
    pen.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(232, 222, 215))  # the opening: sclera
    ir = 0.38 * r
    pen.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=(110, 70, 40))  # iris
    pen.ellipse([ex - 0.4 * ir, ey - 0.4 * ir, ex + 0.4 * ir, ey + 0.4 * ir], fill=(12, 10, 10))  # pupil
    pen.ellipse([ex - 0.4 * ir + 6, ey - 0.4 * ir + 6, ex - 0.4 * ir + 14, ey - 0.4 * ir + 14], fill=(250, 250, 250))
    for x in np.linspace(ex - ew * 0.8, ex + ew * 0.8, 45):
        base = ey - eh * math.sqrt(max(0.0, 1 - ((x - ex) / ew) ** 2))  # on the upper lid's rim
        pen.line([(x, base), (x + rng.uniform(-12, 12), base - rng.uniform(25, 45))], fill=(30, 20, 15), width=2)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), np.float32) + rng.normal(0, 3, (h, w, 3))
    pixels[~field_mask(w, h, cx, cy, r)] = 0
    return jpeg_copy(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), 85)


def skin_close_up(w=600, h=400, cx=300.0, cy=200.0, r=185.0, glints=60, seed=0) -> Image.Image:
    """DrimDB's other outliers: skin (a temple, a lid) photographed close up through a fundus camera's field,
    one pale pink material with a fine texture, strewn with `glints` specular highlights of the flash on its
    moisture (white dots 2-4 px across, at most one per 30 x 30 px cell, so none merge); softened by the optics,
    with sensor noise and JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] + 0.5
    shade = 1 - 0.35 * (np.hypot(xx - cx, yy - cy) / r) ** 2
    texture = np.asarray(Image.fromarray(rng.normal(128, 40, (h, w)).clip(0, 255).astype(np.uint8))
                         .filter(ImageFilter.GaussianBlur(2)), np.float32) / 128 - 1
    img = Image.fromarray((np.array([225, 175, 160]) * (shade * (1 + 0.08 * texture))[..., None])
                          .clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    cells = [(x, y) for x in range(int(cx - r), int(cx + r), 30) for y in range(int(cy - r), int(cy + r), 30)
             if math.hypot(x + 15 - cx, y + 15 - cy) < 0.8 * r]
    for i in rng.choice(len(cells), size=glints, replace=False):
        x, y = cells[i][0] + rng.uniform(8, 22), cells[i][1] + rng.uniform(8, 22)
        s = rng.uniform(1.0, 2.0)
        pen.ellipse([x - s, y - s, x + s, y + s], fill=(255, 255, 250))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)), np.float32) + rng.normal(0, 3, (h, w, 3))
    pixels[~field_mask(w, h, cx, cy, r)] = 0
    return jpeg_copy(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), 85)


def png16(path, values: np.ndarray, significant_bits: int | None = None) -> None:
    """A 16-bit PNG (greyscale H x W, RGB H x W x 3 or RGBA H x W x 4, uint16), with an sBIT chunk when
    significant_bits is given: written by hand, as Pillow writes no 16-bit colour PNG and no sBIT."""
    import struct
    import zlib

    h, w = values.shape[:2]
    channels = values.shape[2] if values.ndim == 3 else 1
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = values.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    sbit = b"" if significant_bits is None else chunk(b"sBIT", bytes([significant_bits] * channels))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                + sbit + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
