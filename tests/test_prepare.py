"""data/prepare.py: the eye found, cropped round and unstretched, Graham's normalisation, the CLI.

The raw photos are drawn here with known geometry (centre, radius, where the frame clips them),
so every expected number comes from that geometry, not from the code under test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

import fundus
from data.prepare import main
from fundus import (ben_graham, check_version, crop_eye, eye_region, find_eye, is_eye_crop, prepare_photo,
                    quality_model)
from dataloader import load_fundus_data, patient_id

ORANGE = np.array([230, 120, 40])


def fundus_photo(w=600, h=400, cx=300.0, cy=200.0, r=180.0, background=0, noise=3.0, seed=0):
    """An orange disc, darker towards its rim as real fundi are, with dark vessels, on a noisy
    dark background of the given grey level. Pixel (x, y) is inside when its centre is."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) / r
    shade = np.clip(1 - 0.6 * d ** 2, 0, 1)[..., None]
    pixels = np.where((d < 1)[..., None], ORANGE * shade, background) + rng.normal(0, noise, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for angle in np.linspace(0, 2 * np.pi, 7)[:-1] + 0.3:
        end = (cx + 0.8 * r * np.cos(angle), cy + 0.8 * r * np.sin(angle))
        draw.line([(cx, cy), end], fill=(110, 30, 20), width=max(1, round(r / 60)))
    return img


def expected_crop_mask(size, w, h, cx, cy, r):
    """Where the crop of fundus_photo(w, h, cx, cy, r) must show eye: the inscribed disc, less the
    bands the frame cut off (which must be black padding, the disc not stretched over them)."""
    scale = size / (2 * r)
    yy, xx = np.mgrid[:size, :size] + 0.5
    inside = np.hypot(xx - size / 2, yy - size / 2) < size / 2
    in_frame = (yy >= (0 - (cy - r)) * scale) & (yy < (h - (cy - r)) * scale)
    in_frame &= (xx >= (0 - (cx - r)) * scale) & (xx < (w - (cx - r)) * scale)
    return inside & in_frame


def eye_mask(img, level=40):
    return np.asarray(img).max(axis=2) > level


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def jpeg_round_trip(img, tmp_path, name="photo.jpeg"):
    img.save(tmp_path / name, quality=85)
    with Image.open(tmp_path / name) as decoded:
        decoded.load()
    return decoded


# The frame: full disc; clipped at top and bottom (EyePACS); clipped at the top only; larger than
# the frame on every side but the corners.
GEOMETRIES = {
    "whole": (600, 400, 300.0, 200.0, 180.0),
    "clipped_top_bottom": (600, 400, 310.0, 200.0, 235.0),
    "clipped_top": (600, 400, 280.0, 170.0, 200.0),
    "clipped_all_sides": (400, 400, 200.0, 200.0, 230.0),
}


# --------------------------------------------------------------------------- find_eye
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("variant", ["rgb", "jpeg", "grey", "rgba", "faint_background", "corner_label"])
def test_find_eye_recovers_centre_and_radius(geometry, variant, tmp_path):
    w, h, cx, cy, r = GEOMETRIES[geometry]
    img = fundus_photo(w, h, cx, cy, r, background=14 if variant == "faint_background" else 0,
                       noise=8.0 if variant == "faint_background" else 3.0)
    if variant == "jpeg":
        img = jpeg_round_trip(img, tmp_path)
    elif variant == "corner_label":  # a camera's white caption in one corner is not background
        ImageDraw.Draw(img).rectangle([4, 4, 34, 20], fill=(255, 255, 255))
    elif variant == "grey":
        img = img.convert("L")
    elif variant == "rgba":
        # transparent background whose hidden colour is white: must count as background
        rgba = np.dstack([np.asarray(img), np.where(eye_mask(img, 20), 255, 0)]).astype(np.uint8)
        rgba[rgba[..., 3] == 0, :3] = 255
        img = Image.fromarray(rgba, "RGBA")
    found = find_eye(img)
    assert found == pytest.approx((cx, cy, r), abs=3.0)


@pytest.mark.parametrize("pixels", ["black", "noisy_black", "white", "grey", "dim_glow", "static"])
def test_find_eye_rejects_photos_without_eye(pixels):
    value = {"black": 0, "noisy_black": 4, "white": 255, "grey": 128}.get(pixels, 0)
    arr = np.full((400, 600, 3), value, np.float64)
    rng = np.random.default_rng(0)
    if pixels == "noisy_black":
        arr += rng.normal(0, 3, arr.shape)
    elif pixels == "dim_glow":  # an underexposed blank frame: a faint glow, never an eye's contrast
        yy, xx = np.mgrid[:400, :600]
        arr += 12 * np.exp(-((xx - 300) ** 2 + (yy - 200) ** 2) / 150 ** 2)[..., None]
    elif pixels == "static":
        arr = rng.uniform(0, 255, arr.shape)
    with pytest.raises(ValueError, match="no eye"):
        find_eye(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))


def test_eye_region_keeps_dark_lesions_at_the_rim_and_the_clipped_edges():
    w, h, cx, cy, r = GEOMETRIES["clipped_top_bottom"]
    photo = fundus_photo(w, h, cx, cy, r)
    ImageDraw.Draw(photo).ellipse([cx + r - 60, cy - 40, cx + r + 20, cy + 40], fill=(15, 5, 3))  # a blot
    yy, xx = np.mgrid[:h, :w] + 0.5
    disc = np.hypot(xx - cx, yy - cy) < r
    region = eye_region(photo)
    assert iou(region, disc) > 0.98
    assert region[int(cy), int(cx + r - 30)]  # inside the blot, darker than the background threshold


# --------------------------------------------------------------------------- crop_eye
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_crop_eye_fills_the_square_and_pads_clipped_eyes(geometry, tmp_path):
    w, h, cx, cy, r = GEOMETRIES[geometry]
    size = 256
    crop = crop_eye(jpeg_round_trip(fundus_photo(w, h, cx, cy, r), tmp_path), size)
    assert crop.size == (size, size) and crop.mode == "RGB"
    expected, found = expected_crop_mask(size, w, h, cx, cy, r), eye_mask(crop)
    assert iou(found, expected) > 0.95
    # the disc fills the square: bright at the middle of each side (4 px in), dark in the corners
    grey = np.asarray(crop).max(axis=2)
    mid, edge = size // 2, 4
    for y, x in [(mid, edge), (mid, size - 1 - edge), (edge, mid), (size - 1 - edge, mid)]:
        assert grey[y, x] > 40 or not expected[y, x], (y, x)
    for y, x in [(edge, edge), (edge, -edge), (-edge, edge), (-edge, -edge)]:
        assert grey[y, x] < 20, (y, x)
    # padded, not stretched: the visible part keeps its width/height ratio
    rows, cols = np.flatnonzero(found.any(axis=1)), np.flatnonzero(found.any(axis=0))
    e_rows, e_cols = np.flatnonzero(expected.any(axis=1)), np.flatnonzero(expected.any(axis=0))
    aspect, expected_aspect = len(cols) / len(rows), len(e_cols) / len(e_rows)
    assert aspect == pytest.approx(expected_aspect, rel=0.03)


def test_is_eye_crop_tells_crops_from_raw_photos():
    raw = fundus_photo(*GEOMETRIES["clipped_top_bottom"])
    square_small_eye = fundus_photo(400, 400, 200.0, 200.0, 110.0)
    black = Image.new("RGB", (256, 256))
    assert not is_eye_crop(raw)
    assert not is_eye_crop(square_small_eye)
    assert not is_eye_crop(black)
    assert is_eye_crop(crop_eye(raw, 256))
    assert is_eye_crop(crop_eye(square_small_eye, 256))
    assert is_eye_crop(ben_graham(crop_eye(raw, 256), 128))


# --------------------------------------------------------------------------- ben_graham
def graham_reference(img, radius):
    """Graham's formula with scipy's true Gaussian (PIL approximates it with box blurs)."""
    pixels = np.asarray(img, np.float64)
    blurred = ndimage.gaussian_filter(pixels, sigma=(radius / 30, radius / 30, 0), mode="nearest")
    return np.clip(4 * pixels - 4 * blurred + 128, 0, 255)


@pytest.mark.parametrize("radius", [128, None])
def test_ben_graham_centres_the_eye_on_grey_and_blanks_the_rim(radius):
    crop = crop_eye(fundus_photo(*GEOMETRIES["whole"]), 256)
    out = ben_graham(crop, radius)
    assert out.size == crop.size and out.mode == "RGB"
    pixels = np.asarray(out, np.float64)
    yy, xx = np.mgrid[:256, :256] + 0.5
    d = np.hypot(xx - 128, yy - 128) / 128
    assert abs(pixels[d < 0.8].mean() - 128) < 6
    assert pixels[d > 0.92].max() == 0
    # against the formula itself, away from the blanked rim
    assert np.abs(pixels[d < 0.85] - graham_reference(crop, 128)[d < 0.85]).mean() < 2


def test_ben_graham_leaves_no_band_where_the_frame_clipped_the_eye():
    w, h, cx, cy, r = GEOMETRIES["clipped_top_bottom"]
    crop = crop_eye(fundus_photo(w, h, cx, cy, r), 256)
    pixels = np.asarray(ben_graham(crop, 128), np.float64)
    scale = 256 / (2 * r)
    top, bottom = round((r - cy) * scale), round((h + r - cy) * scale)  # the frame's edges in the crop
    assert pixels[:top - 1].max() == 0 and pixels[bottom + 1:].max() == 0
    # a plain blur mixes the black padding into the average: a bright band along the cut
    strip = pixels[top + 2:top + 10, 100:156]
    assert abs(strip.mean() - 128) < 10


# --------------------------------------------------------------------------- the command line
def write_photos(folder):
    """Photos of every kind the CLI takes, with their geometry: name -> (file, geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = {
        "a_jpeg": ("a_jpeg.jpeg", "whole"), "b_png": ("b_png.png", "clipped_top_bottom"),
        "c_grey": ("c_grey.PNG", "clipped_top"), "d_rgba": ("d_rgba.png", "whole"),
        "e_upper": ("e_upper.JPG", "clipped_all_sides"), "f_tiff": ("f_tiff.tif", "whole"),
    }
    for seed, (stem, (file, geometry)) in enumerate(photos.items()):
        img = fundus_photo(*GEOMETRIES[geometry], seed=seed)
        img = img.convert("L") if stem == "c_grey" else img.convert("RGBA") if stem == "d_rgba" else img
        img.save(folder / file)
    (folder / "notes.txt").write_text("not a photo")
    return photos


def test_cli_crops_every_photo_and_skips_them_on_a_second_run(tmp_path, capsys):
    photos = write_photos(tmp_path / "raw")
    colour = {stem: v for stem, v in photos.items() if stem != "c_grey"}  # a greyscale photo is ungradable
    dst = tmp_path / "prepared"
    assert main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1"]) == 0
    assert f"{len(colour)} written, 0 skipped (already done), 1 ungradable, 0 failed" in capsys.readouterr().out
    outputs = sorted(p.name for p in (dst / "images").iterdir())
    assert outputs == sorted(f"{stem}.jpeg" for stem in colour)
    listed = pd.read_csv(dst / "ungradable.csv")
    assert listed["path"].tolist() == [str(tmp_path / "raw" / "c_grey.PNG")]
    assert listed["reason"].iloc[0].startswith("not a colour photo") and listed["quality"].iloc[0] == 0
    for stem, (_, geometry) in colour.items():
        with Image.open(dst / "images" / f"{stem}.jpeg") as img:
            assert img.format == "JPEG" and img.size == (128, 128) and img.mode == "RGB"
            assert iou(eye_mask(img), expected_crop_mask(128, *GEOMETRIES[geometry])) > 0.93
    stamps = {p.name: p.stat().st_mtime_ns for p in (dst / "images").iterdir()}
    assert main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1"]) == 0
    assert f"0 written, {len(colour)} skipped (already done), 1 ungradable, 0 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (dst / "images").iterdir()} == stamps
    assert not (dst / "prepare_failures.txt").exists()
    # --keep-ungradable crops it too, and still lists it
    assert main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1", "--keep-ungradable"]) == 0
    assert "1 written, 5 skipped (already done), 1 ungradable (1 kept with --keep-ungradable)" in capsys.readouterr().out
    with Image.open(dst / "images" / "c_grey.jpeg") as img:
        assert iou(eye_mask(img), expected_crop_mask(128, *GEOMETRIES["clipped_top"])) > 0.93
    assert len(pd.read_csv(dst / "ungradable.csv")) == 1
    # other options into the same folder would mix two kinds of crop behind the skipping
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "raw"), str(dst), "--size", "128", "--ben-graham", "--workers", "1"])
    assert exit_info.value.code == 2 and "--size 128, not --size 128 --ben-graham" in capsys.readouterr().err


def test_a_rerun_at_a_stricter_operating_point_stops_and_a_looser_one_adds(tmp_path, capsys):
    # crops accepted at one --min-quality are skipped by the next run: at a higher one the photos scoring
    # between would stay in images/ beside those it refuses, so it stops with nothing changed
    write_photos(tmp_path / "raw")
    dst = tmp_path / "prepared"
    assert main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1", "--min-quality", "0.3"]) == 0
    record = json.loads((dst / "prepare_options.json").read_text())
    assert record == {"size": 128, "ben_graham": False, "min_quality": 0.3, "quality_check": check_version()}
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1", "--min-quality", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "accepted at --min-quality 0.3; at 0.5" in err, err
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    # the model's default operating point (0.18) is lower: the run goes on and the record keeps the lower one
    assert quality_model()["min_quality"] < 0.3
    assert main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1"]) == 0
    assert json.loads((dst / "prepare_options.json").read_text())["min_quality"] == \
        quality_model()["min_quality"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1", "--min-quality", "0.3"])


def test_a_rerun_with_another_gradability_check_stops(tmp_path, capsys, monkeypatch):
    # a refitted quality_model.json (or measures changed and refitted) judges photos otherwise: the crops the
    # earlier check accepted and this one refuses would stay beside the photos it refuses, so a rerun into
    # the same DST_DIR stops with nothing changed; a record from before the check was kept is adopted
    write_photos(tmp_path / "raw")
    dst = tmp_path / "prepared"
    args = [str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", "1"]
    assert main(args) == 0
    record = dst / "prepare_options.json"
    assert json.loads(record.read_text())["quality_check"] == check_version()
    refitted = json.loads(json.dumps(quality_model()))
    refitted["gradable"]["intercept"] += 0.5
    judged, now = check_version(), check_version(refitted)
    assert judged != now
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with monkeypatch.context() as patch:
        patch.setattr(fundus, "quality_model", lambda *a: refitted)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"quality_model.json {judged}, now {now}" in err, err
        assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
        # an older record, without the check: taken as this run's, and kept from now on
        old = {k: v for k, v in json.loads(record.read_text()).items() if k != "quality_check"}
        record.write_text(json.dumps(old) + "\n")
        assert main(args) == 0
        assert json.loads(record.read_text())["quality_check"] == now
    with pytest.raises(SystemExit):
        main(args)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_stops_with_the_summary_and_keeps_the_finished_crops(tmp_path, capsys, monkeypatch, workers):
    # the disk fills while the fourth photo's crop is written: every later photo would fail alike, so the run
    # stops as a signal stops it, with the summary and one sentence (exit 1, no traceback); the crops written
    # before are recorded and whole, no temporary file is left, and the same command then finishes the rest
    import errno
    write_photos(tmp_path / "raw")
    dst = tmp_path / "prepared"
    args = [str(tmp_path / "raw"), str(dst), "--size", "128", "--workers", workers]
    real = fundus.prepare_photo

    def fills_up(src, out, *rest, **options):
        if src.stem == "d_rgba":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
        return real(src, out, *rest, **options)

    with monkeypatch.context() as patch:
        patch.setattr(fundus, "prepare_photo", fills_up)
        assert main(args) == 1
    out, err = capsys.readouterr()
    assert out.startswith("prepare: ") and " written, 0 skipped" in out, out
    assert "No space left on device in " in err and "run the same command again" in err, err
    assert "Traceback" not in err
    # with 2 workers the fourth photo may fail before any earlier one is finished: then nothing is recorded
    recorded = set((dst / "prepared.txt").read_text().split()) if (dst / "prepared.txt").exists() else set()
    images = {p.name for p in (dst / "images").iterdir()}
    assert recorded == images and "d_rgba.jpeg" not in images  # nothing half-written, nothing hidden left
    for name in images:
        with Image.open(dst / "images" / name) as img:
            img.load()
            assert img.size == (128, 128)
    assert main(args) == 0
    assert "d_rgba.jpeg" in {p.name for p in (dst / "images").iterdir()}
    assert f"{len(images)} skipped" in capsys.readouterr().out


def test_cli_lists_ungradable_photos_and_reports_unreadable_ones(tmp_path, capsys):
    photos = write_photos(tmp_path / "raw")
    (tmp_path / "raw" / "x.jpeg").write_bytes(np.random.default_rng(0).bytes(5000))
    Image.new("RGB", (600, 400)).save(tmp_path / "raw" / "black.jpeg")
    dst = tmp_path / "prepared"
    assert main([str(tmp_path / "raw"), str(dst), "--size", "96", "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert f"{len(photos) - 1} written, 0 skipped (already done), 2 ungradable, 1 failed" in out
    assert "x.jpeg" in err and "black.jpeg" not in err
    listed = (dst / "prepare_failures.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in listed] == ["x.jpeg"] and "unreadable" in listed[0]
    reasons = dict(pd.read_csv(dst / "ungradable.csv")[["path", "reason"]].to_numpy())
    assert reasons[str(tmp_path / "raw" / "black.jpeg")].startswith("too dark")
    assert sorted(p.stem for p in (dst / "images").iterdir()) == sorted(set(photos) - {"c_grey"})


def test_prepare_photo_returns_the_reason_instead_of_writing(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "black.png")
    assert prepare_photo(tmp_path / "black.png", tmp_path / "out.jpeg", 64, False)[0] == "ungradable"
    assert not (tmp_path / "out.jpeg").exists()
    fundus_photo().save(tmp_path / "eye.png")
    status, reason, score = prepare_photo(tmp_path / "eye.png", tmp_path / "out.jpeg", 64, True)
    assert (status, reason) == ("written", "") and 0 < score <= 1
    with Image.open(tmp_path / "out.jpeg") as written:
        assert is_eye_crop(written)


def test_an_interrupted_write_leaves_nothing_that_the_next_run_skips(tmp_path, monkeypatch):
    write_photos(tmp_path / "raw")
    dst = tmp_path / "prepared"
    real_save = Image.Image.save

    def save_half_then_die(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        fp.truncate(fp.tell() // 2)  # the bytes written so far when the power went
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_die)
    assert main([str(tmp_path / "raw"), str(dst), "--size", "64", "--workers", "1"]) == 130  # as Ctrl-C ends
    assert not list((dst / "images").iterdir())  # the temporary file went with the exception
    # a SIGKILL runs no cleanup: the half-written temporary file stays until the next run removes it
    (dst / "images" / ".a_jpeg.jpeg.999999.tmp").write_bytes(b"\xff\xd8 half a jpeg")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main([str(tmp_path / "raw"), str(dst), "--size", "64", "--workers", "1"]) == 0
    for path in (dst / "images").iterdir():
        with Image.open(path) as img:
            img.load()  # raises on a truncated JPEG
    assert len(list((dst / "images").iterdir())) == 5  # the greyscale photo is ungradable


def test_cli_as_a_script_on_several_processes(tmp_path, repo_root):
    photos = write_photos(tmp_path / "raw")
    script = repo_root / "data" / "prepare.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "raw"), str(tmp_path / "out"),
                             "--size", "64", "--workers", "2"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{len(photos) - 1} written" in result.stdout
    assert sorted(p.stem for p in (tmp_path / "out" / "images").iterdir()) == sorted(set(photos) - {"c_grey"})


@pytest.mark.parametrize("columns", [("image", "level"), ("id_code", "diagnosis")])
def test_labels_become_a_patient_split_lab_layout(tmp_path, capsys, columns):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = [f"{patient}_{side}" for patient in range(10, 22) for side in ("left", "right")]
    for seed, name in enumerate(names):
        fundus_photo(seed=seed).resize((150, 100)).save(raw / f"{name}.jpeg")
    Image.new("RGB", (150, 100)).save(raw / "30_left.jpeg")  # ungradable: too dark
    grades = {name: i % 5 for i, name in enumerate(names + ["30_left", "31_right"])}  # 31: no photo
    table = tmp_path / "labels.csv"
    pd.DataFrame({columns[0]: list(grades), columns[1]: list(grades.values())}).to_csv(table, index=False)
    dst = tmp_path / "prepared"
    code = main([str(raw), str(dst), "--size", "64", "--workers", "1", "--labels", str(table),
                 "--test-fraction", "0.25", "--seed", "1"])
    assert code == 0  # 30_left is ungradable, not a failure
    assert "dropped 2 of 26 rows: 1 with no photo in SRC_DIR, 1 whose photo is ungradable or failed" in \
        capsys.readouterr().out
    split = {}
    for part in ("train", "test"):
        img_lines = (dst / f"{part}_img.csv").read_text().splitlines()
        label_lines = (dst / f"{part}_label.csv").read_text().splitlines()
        assert len(img_lines) == len(label_lines) > 0
        assert all(grades[n] == int(g) and g == str(int(g)) for n, g in zip(img_lines, label_lines))
        split[part] = img_lines
    assert sorted(split["train"] + split["test"]) == sorted(names)
    assert not {patient_id(n) for n in split["train"]} & {patient_id(n) for n in split["test"]}
    assert "10_left" in split["train"] + split["test"]  # the first row is data, not a header
    # the lab layout's own reader (someone else's code) takes what was written
    data = load_fundus_data(dst)
    assert data.layout == "lab" and len(data.train) == len(split["train"]) and len(data.test) == len(split["test"])


@pytest.mark.parametrize("mistake", ["missing_src", "empty_src", "bad_size", "bad_table", "missing_table"])
def test_user_mistakes_exit_2_with_one_sentence(tmp_path, capsys, mistake):
    raw = tmp_path / "raw"
    raw.mkdir()
    if mistake != "empty_src":
        fundus_photo().save(raw / "eye.png")
    (tmp_path / "bad.csv").write_text("file,grade\neye,1\n")
    argv = {"missing_src": [str(tmp_path / "nowhere"), str(tmp_path / "out")],
            "empty_src": [str(raw), str(tmp_path / "out")],
            "bad_size": [str(raw), str(tmp_path / "out"), "--size", "0"],
            "bad_table": [str(raw), str(tmp_path / "out"), "--labels", str(tmp_path / "bad.csv")],
            "missing_table": [str(raw), str(tmp_path / "out"), "--labels", str(tmp_path / "none.csv")]}[mistake]
    named = {"missing_src": "nowhere", "empty_src": str(raw), "bad_size": "--size",
             "bad_table": "bad.csv", "missing_table": "none.csv"}[mistake]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_min_quality_moves_the_operating_point_of_prepare(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    eye = fundus_photo(seed=1)
    eye.filter(ImageFilter.GaussianBlur(3.5)).save(tmp_path / "raw" / "soft.png")  # scores near 0.6
    score = prepare_photo(tmp_path / "raw" / "soft.png", tmp_path / "probe.jpeg", 64, False, min_quality=0)[2]
    assert 0.02 < score < 0.98  # room for the operating point either side
    strict, lenient = tmp_path / "strict", tmp_path / "lenient"
    assert main([str(tmp_path / "raw"), str(strict), "--size", "64", "--workers", "1",
                 "--min-quality", f"{score + 0.01:.6f}"]) == 0
    listed = pd.read_csv(strict / "ungradable.csv")
    assert list(listed.columns) == ["path", "reason", "quality"]
    assert listed["quality"].iloc[0] == pytest.approx(score, abs=1e-4)
    assert not (strict / "images" / "soft.jpeg").exists()
    assert main([str(tmp_path / "raw"), str(lenient), "--size", "64", "--workers", "1",
                 "--min-quality", f"{score - 0.01:.6f}"]) == 0
    assert (lenient / "images" / "soft.jpeg").is_file() and not (lenient / "ungradable.csv").exists()
