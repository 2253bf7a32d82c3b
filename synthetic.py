"""The demo set: synthetic fundus photographs whose lesions grow with the retinopathy grade.

Every command of the repo must run on a fresh machine with no download, so this file draws a small
data set in the lab layout (layouts.LAB_FILES): an orange-red retina with an optic disc, vessels and
a macula, then the lesions of the International Clinical DR scale added grade by grade: microaneurysms
(1), blot haemorrhages and hard exudates (2), many of both plus cotton-wool spots (3), new vessels and
pre-retinal haemorrhage (4). Lesion counts overlap between neighbouring grades, as in real photographs,
so a small ResNet learns the task but does not find it trivial.

    python synthetic.py --root data/demo      # 1,500 images at 128 px, a few seconds on two cores
"""
from __future__ import annotations

import functools
import glob
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from layouts import LAB_FILES, read_column
from runtime import NO_ROOM, Parser, UserError, disk_full, exit_on_user_error, map_in_processes, process_alive

GRADE_MIX = (0.73, 0.07, 0.15, 0.025, 0.025)
# Patients whose two eyes differ in grade: 7 of the 55 with both eyes in the shared EyePACS sample (13 %)
DISCORDANT = 0.13
DEMO_DEFAULTS = dict(n_train=1200, n_test=300, size=128, seed=0)
# Written beside the CSVs so that generate_demo only ever replaces a folder it wrote itself:
# a lab-layout folder of real photographs looks the same otherwise.
MARKER = "SYNTHETIC_DEMO.txt"
JPEG_QUALITY = 90
IMAGES_PER_TASK = 25

# Inclusive (low, high) count of each lesion per image. The ranges of neighbouring grades overlap on
# purpose: a grade 2 with few lesions looks like a busy grade 1, as in EyePACS.
LESIONS = {
    0: {},
    1: dict(microaneurysms=(2, 6)),
    2: dict(microaneurysms=(4, 12), blots=(1, 5), exudate_clusters=(1, 3)),
    3: dict(microaneurysms=(8, 20), blots=(6, 14), flames=(2, 6), exudate_clusters=(2, 5),
            cotton_wool=(2, 5)),
}
# Proliferative retinopathy is severe retinopathy plus new vessels and, in half the eyes, a bleed from them.
LESIONS[4] = dict(LESIONS[3], new_vessels=(1, 3), preretinal=(0, 1))

# Each layer's blur as a fraction of the image width, in the order the layers are laid: a light
# anti-aliasing for the sharp ones, more for the fluffy ones.
LAYER_BLUR = {"vessels": 0.003, "new_vessel_haze": 0.02, "haemorrhages": 0.003, "exudates": 0.003,
              "cotton_wool": 0.012}


@dataclass(frozen=True)
class Retina:
    """Where things are on one image, in pixels."""

    size: int
    centre: tuple[float, float]
    radius: float
    nasal: int  # +1 when the optic disc sits right of centre (a right eye), -1 for a left eye
    disc: tuple[float, float]
    disc_radius: float
    macula: tuple[float, float]

    def px(self, fraction_of_width):
        return fraction_of_width * self.size


def place_retina(size: int, nasal: int, rng: np.random.Generator) -> Retina:
    cx, cy = size * (0.5 + rng.normal(0, 0.006, 2))
    radius = size * rng.uniform(0.45, 0.475)
    # Macula-centred 45-degree field: the fovea sits about 2.5 disc diameters temporal of the disc.
    disc_radius = size * rng.uniform(0.055, 0.068)
    disc = (cx + nasal * size * rng.uniform(0.22, 0.27), cy + size * rng.normal(0, 0.015))
    macula = (cx - nasal * size * rng.uniform(0.03, 0.08), cy + size * rng.normal(0, 0.015))
    return Retina(size, (cx, cy), radius, nasal, disc, disc_radius, macula)


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size, dtype=np.float32) + 0.5
    return centres[None, :], centres[:, None]


def squared_distance(size: int, point, scale: float) -> np.ndarray:
    x, y = pixel_grid(size)
    return ((x - np.float32(point[0])) ** 2 + (y - np.float32(point[1])) ** 2) / np.float32(scale * scale)


def mottling(size: int, falloff: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven lighting plus the finer mottling of the choroid, as one smooth field around 0."""
    broad = Image.fromarray(rng.normal(0, falloff, (5, 5)).astype(np.float32), "F").resize((16, 16), Image.BILINEAR)
    fine = np.asarray(broad) + rng.normal(0, 0.03, (16, 16)).astype(np.float32)
    return np.asarray(Image.fromarray(fine, "F").resize((size, size), Image.BILINEAR))


def paint_background(retina: Retina, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """The retina without vessels or lesions, the mask of the black surround, and the retina's colour."""
    size = retina.size
    r2 = squared_distance(size, retina.centre, retina.radius)
    # Fundus cameras light the centre best; the falloff, the choroid's mottling and the pigment
    # (hence the hue) vary from patient to patient.
    shade = 1 - rng.uniform(0.25, 0.55) * r2
    shade *= 1 + mottling(size, rng.uniform(0.04, 0.1), rng)
    shade *= 1 - rng.uniform(0.25, 0.45) * np.exp(-squared_distance(size, retina.macula, retina.px(0.07)) / 2)
    shade *= 1 + 0.25 * np.exp(-squared_distance(size, retina.disc, 2.2 * retina.disc_radius))
    colour = rng.uniform((160, 55, 15), (230, 110, 55)).astype(np.float32) * rng.uniform(0.8, 1.1)
    pixels = np.clip(shade[..., None] * colour, 0, 255).astype(np.uint8)
    rim = retina.radius / 1.5  # a soft edge 1.5 pixels wide
    surround = np.clip((np.sqrt(r2) - 1) * rim * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), Image.fromarray(surround, "L"), colour


def paint_optic_disc(image: Image.Image, retina: Retina, rng: np.random.Generator) -> None:
    """A pale, slightly tall disc with a paler cup, pasted through small blurred masks."""
    r = retina.disc_radius
    half = math.ceil(1.6 * r)
    x0, y0 = round(retina.disc[0]) - half, round(retina.disc[1]) - half
    stretch = rng.uniform(1.0, 1.15)
    colours = [tuple(rng.integers((225, 175, 105), (256, 225, 160)).tolist()), (255, 240, 205)]
    for scale, colour in zip((1.0, rng.uniform(0.35, 0.55)), colours):
        mask = Image.new("L", (2 * half, 2 * half))
        ImageDraw.Draw(mask).ellipse([half - scale * r, half - scale * r * stretch,
                                      half + scale * r, half + scale * r * stretch], fill=255)
        image.paste(colour, (x0, y0), mask.filter(ImageFilter.GaussianBlur(0.2 * r)))


class Layers:
    """Grey masks, one per colour of tissue, drawn with PIL and then pasted over the retina in order."""

    def __init__(self, size: int):
        self.size = size
        self.masks: dict[str, Image.Image] = {}
        self.pens: dict[str, ImageDraw.ImageDraw] = {}  # kept: ImageDraw.Draw() costs ~30 us a call

    def draw(self, name: str) -> ImageDraw.ImageDraw:
        if name not in self.masks:
            self.masks[name] = Image.new("L", (self.size, self.size))
            self.pens[name] = ImageDraw.Draw(self.masks[name])
        return self.pens[name]

    def lay(self, image: Image.Image, name: str, colour, blur: float) -> None:
        mask = self.masks.get(name)
        if mask is not None and mask.getbbox():
            image.paste(tuple(int(c) for c in colour), (0, 0), mask.filter(ImageFilter.GaussianBlur(blur)))


def dots(draw: ImageDraw.ImageDraw, centres: np.ndarray, radii: np.ndarray, fills: np.ndarray) -> None:
    """Round lesions; radii and fills are arrays, one entry per lesion."""
    for (x, y), r, fill in zip(centres.tolist(), radii.tolist(), fills.tolist()):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def blobs(draw, centres, lengths, widths, angles, fills, rng) -> None:
    """Irregular ellipses: haemorrhages and cotton-wool spots are never quite round."""
    if len(centres) == 0:
        return
    theta = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    wobble = 1 + 0.25 * rng.normal(0, 1, (len(centres), 12))
    u, v = lengths[:, None] * wobble * np.cos(theta), widths[:, None] * wobble * np.sin(theta)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    xs, ys = centres[:, :1] + u * cos - v * sin, centres[:, 1:] + u * sin + v * cos
    for outline, fill in zip(np.stack([xs, ys], axis=2).reshape(len(centres), 24).tolist(), fills.tolist()):
        draw.polygon(outline, fill=fill)


def draw_vessel(draw, start, heading, turn, length, width, fill, depth, rng) -> None:
    """A vessel as a random walk that bends by `turn` radians in all, thinning, with side branches."""
    # Plain floats, not numpy: with ~70 short vessels per image, numpy's per-call cost dominated.
    steps = 8
    jitter = rng.random(2 * steps).tolist()
    x, y = start
    points, headings = [x, y], []
    for i in range(steps):
        heading += turn / steps + 0.4 * (jitter[i] - 0.5)
        x, y = x + length / steps * math.cos(heading), y + length / steps * math.sin(heading)
        points += [x, y]
        headings.append(heading)
    thick, thin = max(1, round(width)), max(1, round(0.7 * width))
    if thick == thin:
        draw.line(points, fill=fill, width=thick, joint="curve")
    else:
        draw.line(points[:10], fill=fill, width=thick, joint="curve")
        draw.line(points[8:], fill=fill, width=thin, joint="curve")
    branching = 0.25 if depth > 1 else 0.15  # enough for the look: every vessel costs ~50 us
    for i in range(1, steps - 1) if depth else ():
        if jitter[steps + i] < branching:
            side, angle, bend, reach = rng.random(4).tolist()
            draw_vessel(draw, (points[2 * i], points[2 * i + 1]),
                        headings[i] + (1 if side < 0.5 else -1) * (0.45 + 0.45 * angle), turn * (bend - 0.5),
                        length * (0.3 + 0.25 * reach), 0.65 * width, fill, depth - 1, rng)


def draw_vessels(layers: Layers, retina: Retina, rng: np.random.Generator) -> None:
    # (heading, turn, reach) for a left eye (macula to the right, +x) with y pointing down; a right eye
    # is the mirror image. The temporal arcades arc round the macula, the nasal vessels run straighter.
    arcades = [(-1.2, 1.9, 1.05), (1.2, -1.9, 1.05), (-2.2, -0.5, 0.65), (2.2, 0.5, 0.65),
               (-0.2, 0.3, 0.35), (0.2, -0.3, 0.35)]
    depth = 2 if retina.size >= 64 else 1  # the finest branches would be sub-pixel
    # Veins are wider and darker than their arteries: same colour, more opaque.
    for heading, turn, reach in arcades:
        for fill, width in ((235, 0.017), (165, 0.013)):
            h, t = heading + rng.normal(0, 0.12), turn + rng.normal(0, 0.2)
            if retina.nasal > 0:
                h, t = math.pi - h, -t
            start = np.asarray(retina.disc) + rng.normal(0, 0.2, 2) * retina.disc_radius
            draw_vessel(layers.draw("vessels"), tuple(start), h, t, retina.radius * reach * rng.uniform(0.85, 1.1),
                        retina.px(width) * (0.6 if reach < 0.5 else 1.0), fill, depth, rng)


def lesion_points(retina: Retina, rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """n random points on the retina off the optic disc, most in the posterior pole where DR lesions gather."""
    points = np.empty((0, 2))
    while len(points) < n:
        m = 2 * n + 4
        near = rng.normal(retina.macula, spread * retina.radius, (m, 2))
        angle, distance = rng.uniform(0, 2 * math.pi, m), retina.radius * np.sqrt(rng.random(m))
        anywhere = np.asarray(retina.centre) + distance[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
        candidates = np.where((rng.random(m) < 0.7)[:, None], near, anywhere)
        inside = np.hypot(*(candidates - retina.centre).T) < 0.85 * retina.radius
        off_disc = np.hypot(*(candidates - retina.disc).T) > 1.3 * retina.disc_radius
        points = np.vstack([points, candidates[inside & off_disc]])
    return points[:n]


def count(grade: int, lesion: str, rng: np.random.Generator) -> int:
    low, high = LESIONS[grade].get(lesion, (0, 0))
    return int(rng.integers(low, high + 1)) if high else 0


def draw_haemorrhages(layers: Layers, retina: Retina, grade: int, rng: np.random.Generator) -> None:
    pen = layers.draw("haemorrhages")
    spots = lesion_points(retina, rng, count(grade, "microaneurysms", rng), 0.4)
    n = len(spots)
    # At least 0.8 px in radius, or they vanish at 32 px; real ones are about 1/100 of the field.
    dots(pen, spots, np.maximum(0.8, retina.px(rng.uniform(0.007, 0.011, n))), rng.integers(200, 256, n))
    spots = lesion_points(retina, rng, count(grade, "blots", rng), 0.4)
    n = len(spots)
    blobs(pen, spots, retina.px(rng.uniform(0.012, 0.03, n)), retina.px(rng.uniform(0.012, 0.03, n)),
          rng.uniform(0, math.pi, n), rng.integers(190, 256, n), rng)
    spots = lesion_points(retina, rng, count(grade, "flames", rng), 0.5)
    n = len(spots)
    # Flame haemorrhages lie in the nerve fibre layer, so they point away from the optic disc.
    angles = np.arctan2(spots[:, 1] - retina.disc[1], spots[:, 0] - retina.disc[0]) + rng.normal(0, 0.2, n)
    blobs(pen, spots, retina.px(rng.uniform(0.025, 0.045, n)), np.maximum(1.0, retina.px(rng.uniform(0.007, 0.012, n))),
          angles, rng.integers(170, 240, n), rng)
    for x, y in lesion_points(retina, rng, count(grade, "preretinal", rng), 0.3).tolist():
        rx, ry = retina.px(rng.uniform(0.05, 0.09)), retina.px(rng.uniform(0.04, 0.07))
        # Blood under the hyaloid settles into a boat: flat top, round bottom.
        pen.chord([x - rx, y - ry, x + rx, y + ry], 0, 180, fill=255)


def draw_exudates(layers: Layers, retina: Retina, grade: int, rng: np.random.Generator) -> None:
    pen = layers.draw("exudates")
    for cx, cy in lesion_points(retina, rng, count(grade, "exudate_clusters", rng), 0.25).tolist():
        # Hard exudates gather in clumps and rings around leaking vessels near the macula.
        n, spread = int(rng.integers(3, 10)), retina.px(rng.uniform(0.02, 0.05))
        dots(pen, rng.normal((cx, cy), spread, (n, 2)), np.maximum(0.7, retina.px(rng.uniform(0.004, 0.011, n))),
             rng.integers(200, 256, n))
    spots = lesion_points(retina, rng, count(grade, "cotton_wool", rng), 0.45)
    n = len(spots)
    blobs(layers.draw("cotton_wool"), spots, retina.px(rng.uniform(0.018, 0.035, n)),
          retina.px(rng.uniform(0.018, 0.035, n)), rng.uniform(0, math.pi, n), rng.integers(110, 190, n), rng)


def draw_new_vessels(layers: Layers, retina: Retina, grade: int, rng: np.random.Generator) -> None:
    for _ in range(count(grade, "new_vessels", rng)):
        # New vessels sprout at the disc (NVD) or along the arcades (NVE) as tangled loops in a haze.
        x, y = retina.disc if rng.random() < 0.4 else lesion_points(retina, rng, 1, 0.45)[0]
        reach = retina.px(rng.uniform(0.035, 0.06))
        layers.draw("new_vessel_haze").ellipse([x - 1.1 * reach, y - reach, x + 1.1 * reach, y + reach],
                                               fill=int(rng.integers(60, 110)))
        for _ in range(int(rng.integers(2, 5))):
            heading, px, py = rng.uniform(0, 2 * math.pi), x, y
            points = [px, py]
            for turn in rng.normal(0, 0.9, int(rng.integers(10, 18))):
                heading += turn
                if math.hypot(px - x, py - y) > reach:  # curl back into the tuft
                    heading = math.atan2(y - py, x - px) + turn / 2
                px, py = px + reach / 4 * math.cos(heading), py + reach / 4 * math.sin(heading)
                points += [px, py]
            layers.draw("haemorrhages").line(points, fill=200, width=max(1, round(retina.px(0.004))), joint="curve")


def tissue_colours(retina_colour: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Blood is a darker shade of the retina's own colour, so vessels and haemorrhages keep their
    # contrast on pale and on heavily pigmented fundi alike; exudates and cotton wool are pale whatever the fundus.
    return {
        "vessels": retina_colour * rng.uniform((0.45, 0.2, 0.3), (0.6, 0.35, 0.45)),
        "new_vessel_haze": retina_colour * rng.uniform((0.75, 0.5, 0.6), (0.85, 0.65, 0.75)),
        "haemorrhages": retina_colour * rng.uniform((0.3, 0.08, 0.15), (0.45, 0.22, 0.3)),
        "exudates": rng.uniform((235, 205, 90), (255, 235, 150)),
        "cotton_wool": rng.uniform((225, 210, 175), (245, 230, 210)),
    }


def draw_fundus(grade: int, size: int, rng: np.random.Generator, eye: str | None = None) -> Image.Image:
    """One synthetic RGB fundus image of the given grade.

    `eye` ("left" or "right") puts the optic disc on that side; None lets rng choose. The retina is
    drawn before any lesion, so the same rng state gives the same retina whatever the grade.
    """
    if grade not in LESIONS:
        raise ValueError(f"grade must be 0-4, got {grade!r}")
    if eye not in (None, "left", "right"):
        raise ValueError(f"eye must be 'left' or 'right', got {eye!r}")
    nasal = {"left": -1, "right": 1}.get(eye) or (1 if rng.random() < 0.5 else -1)
    retina = place_retina(size, nasal, rng)
    image, surround, retina_colour = paint_background(retina, rng)
    paint_optic_disc(image, retina, rng)
    layers = Layers(size)
    draw_vessels(layers, retina, rng)
    colours = tissue_colours(retina_colour, rng)
    draw_haemorrhages(layers, retina, grade, rng)
    draw_exudates(layers, retina, grade, rng)
    draw_new_vessels(layers, retina, grade, rng)
    for name, blur in LAYER_BLUR.items():
        layers.lay(image, name, colours[name], retina.px(blur))
    image.paste((0, 0, 0), (0, 0), surround)
    return image


def grade_counts(n: int) -> list[int]:
    """Images per grade in a split of n: round(p * n) for grades 1-4, at least one each; grade 0 the rest."""
    rare = [max(1, round(p * n)) for p in GRADE_MIX[1:]]
    return [n - sum(rare)] + rare


def pair_grades(grades: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The split's grades (its exact counts) arranged as patients' two eyes, [n // 2, 2], one grade for both eyes
    in all but DISCORDANT of the patients, whose eyes differ by one grade (as in EyePACS, where the worse eye
    is most often one grade worse); the pairs in random order, either eye the worse."""
    ordered = np.sort(grades)[: len(grades) // 2 * 2].reshape(-1, 2)  # neighbours in grade order: concordant
    target = round(DISCORDANT * len(ordered))
    for _ in range(50 * len(ordered)):  # bounded: a split of one grade has no neighbouring grade to trade with
        discordant = ordered[:, 0] != ordered[:, 1]
        if discordant.sum() >= target:
            break
        a, b = rng.integers(0, len(ordered), 2)
        if not discordant[a] and not discordant[b] and abs(int(ordered[a, 0]) - int(ordered[b, 0])) == 1:
            ordered[a, 1], ordered[b, 1] = ordered[b, 1], ordered[a, 1]
    ordered = ordered[rng.permutation(len(ordered))]
    swap = rng.random(len(ordered)) < 0.5
    ordered[swap] = ordered[swap][:, ::-1]
    return ordered


def plan_split(split_index: int, n: int, first_patient: int, seed: int) -> list[tuple[str, int]]:
    """(name, grade) rows of one split: both eyes of each patient (an odd one out alone), their grades
    correlated as patients' are (pair_grades), the split's grade mix exactly grade_counts(n)."""
    grades = np.repeat(np.arange(len(GRADE_MIX)), grade_counts(n))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, split_index)))
    rng.shuffle(grades)
    paired = pair_grades(grades, rng).reshape(-1)
    rest = np.sort(grades)[len(paired):] if len(grades) % 2 else np.array([], dtype=grades.dtype)
    grades = np.concatenate([paired, rest])
    names = [f"{first_patient + i // 2}_{'right' if i % 2 else 'left'}" for i in range(n)]
    return list(zip(names, grades.tolist()))


def draw_task(task: tuple) -> int:
    """Draw and save a run of images; each is seeded by (seed, split, index), not by the worker."""
    images_dir, size, seed, rows = task
    for split_index, index, name, grade in rows:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, split_index, index)))
        image = draw_fundus(grade, size, rng, eye=name.rsplit("_", 1)[1])
        image.save(Path(images_dir) / f"{name}.jpeg", quality=JPEG_QUALITY)
    return len(rows)


def draw_images(images_dir: Path, splits: list, size: int, seed: int, workers: int, quiet: bool) -> None:
    rows = [(s, i, name, grade) for s, split in enumerate(splits) for i, (name, grade) in enumerate(split)]
    tasks = [(str(images_dir), size, seed, rows[i:i + IMAGES_PER_TASK])
             for i in range(0, len(rows), IMAGES_PER_TASK)]
    workers = min(workers, len(tasks))
    with tqdm(total=len(rows), desc="demo set", unit="img", disable=True if quiet else None) as bar:
        for done in map_in_processes(draw_task, tasks, workers):
            bar.update(done)


def write_csvs(folder: Path, splits: list) -> None:
    for (img_csv, label_csv), rows in zip(LAB_FILES.values(), splits):
        (folder / img_csv).write_text("".join(f"{name}\n" for name, _ in rows))
        (folder / label_csv).write_text("".join(f"{grade}\n" for _, grade in rows))


def check_arguments(n_train, n_test, size, seed, workers) -> None:
    for flag, value, least in (("n_train", n_train, 5), ("n_test", n_test, 5), ("size", size, 16),
                               ("seed", seed, 0), ("workers", workers, 1)):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")


def check_replaceable(root: Path) -> None:
    """Refuse to replace anything but an empty folder or a demo set this file wrote."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; give a folder for the demo set")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ValueError(f"{root} already holds files that are not a demo set; choose an empty or new folder")


def holds_same_set(root: Path, partial: Path) -> bool:
    marker = root / MARKER
    return marker.is_file() and marker.read_text() == (partial / MARKER).read_text() and demo_is_complete(root)


def move_into_place(partial: Path, root: Path) -> None:
    """Put the finished set at root. Where another process (a torchrun rank, say) has just put the very
    same set there, keep theirs: swapping it would pull the files from under its readers."""
    if holds_same_set(root, partial):
        shutil.rmtree(partial)
        return
    old = partial.with_name(f".{root.absolute().name}.old-{os.getpid()}")
    if root.exists():  # os.replace cannot overwrite a non-empty folder, so the old set steps aside
        shutil.rmtree(old, ignore_errors=True)
        os.replace(root, old)
    try:
        os.replace(partial, root)
    except OSError:
        if not holds_same_set(root, partial):
            raise
        shutil.rmtree(partial)
    shutil.rmtree(old, ignore_errors=True)


def generate_demo(root, n_train=1200, n_test=300, size=128, seed=0, workers=None, quiet=False) -> Path:
    """Write the demo set in the lab layout under root and return root.

    The same arguments give byte-identical files whatever `workers` is (default: every CPU). The set
    is written into a sibling folder and moved into place at the end, so an interrupted run never
    leaves half a set behind.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_arguments(n_train, n_test, size, seed, workers)
    root = Path(root)
    check_replaceable(root)
    root.absolute().parent.mkdir(parents=True, exist_ok=True)
    partial = root.absolute().parent / f".{root.absolute().name}.partial-{os.getpid()}"
    remove_dead_sets(root)
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    try:
        splits = [plan_split(0, n_train, 1, seed), plan_split(1, n_test, 1 + (n_train + 1) // 2, seed)]
        write_csvs(partial, splits)
        (partial / MARKER).write_text(
            f"Synthetic fundus images written by synthetic.py (n_train={n_train}, n_test={n_test}, "
            f"size={size}, seed={seed}). Not patient data; delete this folder to regenerate it.\n")
        draw_images(partial / "images", splits, size, seed, workers, quiet)
        move_into_place(partial, root)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in NO_ROOM:  # one sentence, the set there before kept
            raise disk_full(root, err.errno) from None
        raise
    return root


def remove_dead_sets(root: Path) -> list[Path]:
    """The half-written sets beside root (.<root>.partial-<pid>, .<root>.old-<pid>) that a generate_demo killed
    midway left (SIGKILL, a power cut): removed, unless their process still runs here (a torchrun rank writing
    the same set now)."""
    removed = []
    for folder in root.absolute().parent.glob(f".{glob.escape(root.absolute().name)}.*-*"):
        kind, _, pid = folder.name.rpartition("-")
        if (kind.endswith((".partial", ".old")) and pid.isdigit() and int(pid) != os.getpid()
                and not process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def demo_is_complete(root) -> bool:
    """True when root holds the four CSVs and every image they list."""
    root = Path(root)
    try:
        for img_csv, label_csv in LAB_FILES.values():
            names = read_column(root / img_csv)
            if not names or len(names) != len(read_column(root / label_csv)):
                return False
            if not all((root / "images" / f"{name}.jpeg").is_file() for name in names):
                return False
    except UserError:  # a CSV missing or unreadable
        return False
    return True


def ensure_demo(root, **kwargs) -> bool:
    """Generate the demo set into root if it is not complete; return True when it generated it."""
    if demo_is_complete(root):
        return False
    generate_demo(root, **kwargs)
    return True


CLI_FLAGS = {"n_train": "--train", "n_test": "--test", "size": "--size", "seed": "--seed", "workers": "--workers"}


@exit_on_user_error
def main(argv=None) -> None:
    parser = Parser(description="Write the synthetic fundus demo set in the lab layout.")
    parser.add_argument("--root", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--train", type=int, default=DEMO_DEFAULTS["n_train"],
                        help=f"training images (default: {DEMO_DEFAULTS['n_train']})")
    parser.add_argument("--test", type=int, default=DEMO_DEFAULTS["n_test"],
                        help=f"test images (default: {DEMO_DEFAULTS['n_test']})")
    parser.add_argument("--size", type=int, default=DEMO_DEFAULTS["size"],
                        help=f"image side in pixels (default: {DEMO_DEFAULTS['size']})")
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"],
                        help=f"random seed (default: {DEMO_DEFAULTS['seed']})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate_demo(args.root, args.train, args.test, args.size, args.seed, args.workers)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")  # generate_demo names its arguments; the user typed flags
        parser.error(f"{CLI_FLAGS.get(name, name)} {rest}")
    seconds = time.perf_counter() - start
    grades = [a + b for a, b in zip(grade_counts(args.train), grade_counts(args.test))]
    print(f"wrote {args.train + args.test} images ({args.train} train, {args.test} test, {args.size} px) "
          f"to {root}; grades 0-4: {' / '.join(map(str, grades))}; {seconds:.1f} s")


if __name__ == "__main__":
    main()
