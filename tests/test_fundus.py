"""fundus.py on photographs with the flaws of real ones: the camera's field found within a few percent of the
drawn circle, its mask keeping a dark sector, and the gradability check's verdict and reason on fundi, on
what is no fundus (two real photographs among them) and on degraded copies."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from sklearn.datasets import load_sample_images

import fundus
import synthetic
from photo_kit import field_mask, fundus_photo, jpeg_copy

W43, H43 = 337, 253  # a 4:3 camera photo as small as the public DeepDRiD / DrimDB examples
# name -> (photo arguments, the drawn circle (cx, cy, r))
FIELDS = {
    "round_on_black": (dict(w=600, h=400, cx=300, cy=200, r=185), None),
    "eyepacs_clipped_top_bottom": (dict(w=600, h=400, cx=310, cy=200, r=235), None),
    "fills_4_3_rounded_corners": (dict(w=W43, h=H43, cx=W43 / 2, cy=H43 / 2, r=0.6 * W43), None),
    "fills_4_3_just_rounded": (dict(w=W43, h=H43, cx=W43 / 2, cy=H43 / 2, r=0.615 * W43), None),
    "dim_vignetted_timestamp": (dict(w=W43, h=H43, cx=W43 / 2, cy=H43 / 2, r=0.615 * W43, colour=(95, 45, 14),
                                     vignette=0.8, timestamp="br"), None),
    "timestamp_in_every_corner_but_one": (dict(w=600, h=400, cx=300, cy=200, r=185, timestamp="tl"), None),
    "dark_sector_at_the_rim": (dict(w=600, h=400, cx=300, cy=200, r=185, dark_sector=(200, 260)), None),
    "low_exposure": (dict(w=600, h=400, cx=300, cy=200, r=185, exposure=0.35), None),
    "off_centre_small": (dict(w=640, h=480, cx=280, cy=250, r=170), None),
}


def drawn(name):
    kwargs, _ = FIELDS[name]
    photo = jpeg_copy(fundus_photo(**kwargs, seed=3), 70)  # JPEG noise on every one
    return photo, (kwargs["cx"], kwargs["cy"], kwargs["r"])


@pytest.mark.parametrize("name", FIELDS)
def test_the_field_is_found_within_two_percent_of_the_drawn_circle(name):
    photo, (cx, cy, r) = drawn(name)
    field = fundus.find_field(photo)
    assert field.r == pytest.approx(r, rel=0.02)
    assert abs(field.cx - cx) < 0.02 * r and abs(field.cy - cy) < 0.02 * r


def test_the_dim_photo_of_the_trial_is_cropped_whole():
    # the trial's failure: a dim, vignetted photo filling a 4:3 frame, a timestamp in a corner; the eye was
    # found with radius 75 on a 253 px photo (the older finder, fed this drawn copy, said 167 for 207)
    photo, (cx, cy, r) = drawn("dim_vignetted_timestamp")
    crop = np.asarray(fundus.crop_eye(photo, 256)).max(axis=2)
    yy, xx = np.mgrid[:256, :256] + 0.5
    inside = np.hypot(xx - 128, yy - 128) < 0.93 * 128
    scale = 128 / r  # crop pixels per photo pixel; the frame cut the field on all four sides
    in_frame = (np.abs(yy - 128) < (H43 / 2) * scale - 2) & (np.abs(xx - 128) < (W43 / 2) * scale - 2)
    assert np.percentile(crop[inside & in_frame], 1) > 10  # the rim, dim as it is, lies inside the crop


def test_an_octagonal_field_lies_between_its_inner_and_outer_circle():
    photo = jpeg_copy(fundus_photo(W43, H43, W43 / 2, H43 / 2, 200, shape="octagon", timestamp="tl"), 70)
    field = fundus.find_field(photo)
    assert 200 * np.cos(np.pi / 8) * 0.99 <= field.r <= 200 * 1.01


def test_the_field_mask_keeps_a_dark_sector_and_the_frames_cut(tmp_path):
    photo, (cx, cy, r) = drawn("dark_sector_at_the_rim")
    mask = fundus.eye_region(photo)
    truth = field_mask(600, 400, cx, cy, r)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97
    yy, xx = np.mgrid[:400, :600] + 0.5
    angle = np.degrees(np.arctan2(yy - cy, xx - cx)) % 360
    sector = truth & (angle > 210) & (angle < 250) & (np.hypot(xx - cx, yy - cy) > 0.75 * r)
    assert mask[sector].mean() > 0.97  # the convex hull of the lit part cut this off with a chord
    # through --ben-graham: the sector is normalised, not blanked
    crop = fundus.crop_eye(photo, 256)
    graham = np.asarray(fundus.ben_graham(crop, 128)).max(axis=2)
    yy, xx = np.mgrid[:256, :256] + 0.5
    angle = np.degrees(np.arctan2(yy - 128, xx - 128)) % 360
    band = (angle > 215) & (angle < 245) & (np.hypot(xx - 128, yy - 128) > 0.72 * 128) & \
        (np.hypot(xx - 128, yy - 128) < 0.85 * 128)
    assert (graham[band] > 0).mean() > 0.95


def test_a_clipped_field_mask_follows_the_frame():
    photo, (cx, cy, r) = drawn("eyepacs_clipped_top_bottom")
    mask = fundus.eye_region(photo)
    truth = field_mask(600, 400, cx, cy, r)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97


# --------------------------------------------------------------------------- gradability
def ruler_through_the_camera():
    img = Image.new("RGB", (640, 480))
    draw = ImageDraw.Draw(img)
    draw.ellipse([110, 30, 530, 450], fill=(205, 200, 190))
    draw.rectangle([150, 200, 490, 280], fill=(245, 240, 225))
    for x in range(150, 490, 10):
        draw.line([x, 200, x, 225 if x % 50 else 240], fill=(20, 20, 20), width=2)
    return img.filter(ImageFilter.GaussianBlur(1))


def person_in_a_dark_room():
    rng = np.random.default_rng(1)
    img = Image.fromarray(np.clip(rng.normal(12, 4, (480, 640, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([250, 300, 390, 480], fill=(60, 50, 70))
    draw.ellipse([270, 110, 370, 250], fill=(200, 150, 120))
    draw.ellipse([262, 90, 378, 170], fill=(40, 30, 25))
    return img.filter(ImageFilter.GaussianBlur(2))


def blurred(img, fraction=0.02):
    """A heavy defocus (sigma 2 % of the width), then sensor noise and JPEG as a camera adds them."""
    out = np.asarray(img.filter(ImageFilter.GaussianBlur(fraction * img.width)), np.float32)
    out += np.random.default_rng(0).normal(0, 4, out.shape)
    return jpeg_copy(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), 80)


@pytest.mark.parametrize("name", FIELDS)
def test_every_drawn_fundus_is_gradable(name):
    photo, _ = drawn(name)
    quality = fundus.assess(photo)
    assert quality.gradable, quality.reason


@pytest.mark.parametrize("index,expected", [(0, "no round camera field"), (1, "no round camera field")])
def test_the_two_real_photographs_sklearn_ships_are_ungradable(index, expected):
    photo = Image.fromarray(load_sample_images().images[index])  # china.jpg (a temple), flower.jpg (a dahlia)
    quality = fundus.assess(photo)
    assert not quality.gradable and quality.reason.startswith(expected), quality.reason


@pytest.mark.parametrize("make,expected", [
    (lambda p: Image.fromarray((np.asarray(p, np.float32) * 0.1).astype(np.uint8)), "too dark"),
    (lambda p: Image.new("RGB", p.size, (255, 255, 255)), "overexposed"),
    (lambda p: blurred(p), "out of focus"),
    (lambda p: p.convert("L").convert("RGB"), "not a colour fundus photo"),
    (lambda p: ruler_through_the_camera(), "not a colour fundus photo"),
    (lambda p: person_in_a_dark_room(), "no round camera field"),
    (lambda p: Image.new("RGB", p.size), "too dark"),
])
def test_degraded_copies_and_other_pictures_are_ungradable_with_the_right_reason(make, expected):
    photo, _ = drawn("round_on_black")
    quality = fundus.assess(make(photo))
    assert not quality.gradable and quality.reason.startswith(expected), quality.reason


def test_every_image_of_the_demo_set_is_gradable(tmp_path):
    root = synthetic.generate_demo(tmp_path / "demo", quiet=True)  # the set make demo trains on, all 1,500
    rejected = []
    for path in sorted((root / "images").iterdir()):
        with Image.open(path) as img:
            quality = fundus.assess(img)
        if not quality.gradable:
            rejected.append((path.name, quality.reason))
    assert not rejected, rejected[:5]


def test_a_camera_jpeg_decodes_at_a_reduced_scale_and_never_below_the_crop(tmp_path):
    photo = fundus_photo(640, 480, 320, 240, 220)  # an eye spanning 92 % of the height
    photo.resize((4000, 3000)).save(tmp_path / "camera.jpeg", quality=90)  # 12 MP
    decoded, quality = fundus.load_photo(tmp_path / "camera.jpeg", 512)
    assert decoded.size == (1000, 750) and quality.gradable  # 1/4 of the file, the eye still 688 px across
    assert quality.field.r == pytest.approx(220 * 1000 / 640, rel=0.02)
    # a smaller eye (under half the height) is decoded larger again, so that the crop is still a downsample
    small = Image.new("RGB", (4000, 3000))
    small.paste(photo.resize((2000, 1500)), (1000, 750))
    small.save(tmp_path / "small_eye.jpeg", quality=90)
    decoded, quality = fundus.load_photo(tmp_path / "small_eye.jpeg", 512)
    assert 2 * quality.field.r >= 512 and decoded.size == (2000, 1500)
