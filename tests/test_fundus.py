"""fundus.py on photographs with the flaws of real ones: the camera's field found within a few percent of the
drawn circle, its mask keeping a dark sector, and the gradability check's verdict and reason on fundi, on
what is no fundus (two real photographs among them) and on degraded copies."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from sklearn.datasets import load_sample_images

import fundus
import synthetic
from photo_kit import exudates, field_mask, fundus_photo, haemorrhage, jpeg_copy, outer_eye, png16, skin_close_up

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


@pytest.mark.parametrize("index", [0, 1])
def test_the_two_real_photographs_sklearn_ships_are_not_fundus_photos(index):
    photo = Image.fromarray(load_sample_images().images[index])  # china.jpg (a temple), flower.jpg (a dahlia)
    quality = fundus.assess(photo)
    assert not quality.gradable and quality.reason.startswith(fundus.NOT_FUNDUS), quality.reason
    assert quality.score == 0.0


@pytest.mark.parametrize("make,expected", [
    (lambda p: Image.fromarray((np.asarray(p, np.float32) * 0.1).astype(np.uint8)), "too dark"),
    (lambda p: Image.new("RGB", p.size, (255, 255, 255)), "overexposed"),
    (lambda p: blurred(p), "out of focus"),
    (lambda p: p.convert("L").convert("RGB"), "not a colour photo"),
    (lambda p: ruler_through_the_camera(), "not a colour photo"),
    (lambda p: person_in_a_dark_room(), "not a fundus photo"),
    (lambda p: Image.new("RGB", p.size), "too dark"),
    (lambda p: Image.new("RGB", p.size, (200, 90, 30)), "out of focus"),  # flat orange: nothing in focus
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


# --------------------------------------------------------------------------- the check as a measured classifier
def tinted(colour, exposure=1.0):
    return jpeg_copy(fundus_photo(w=600, h=400, cx=300, cy=200, r=185, colour=colour, exposure=exposure,
                                  seed=3), 85)


EVERY_KIND = {"round": lambda: drawn("round_on_black")[0], "dim": lambda: drawn("dim_vignetted_timestamp")[0],
              "blurred": lambda: blurred(drawn("round_on_black")[0]), "temple": lambda: Image.fromarray(
                  load_sample_images().images[0]), "black": lambda: Image.new("RGB", (300, 200)),
              "ruler": ruler_through_the_camera}


@pytest.mark.parametrize("name", EVERY_KIND)
def test_every_photo_gets_a_score_in_0_1_and_the_operating_point_moves_the_verdict(name):
    photo = EVERY_KIND[name]()
    quality = fundus.assess(photo)
    assert 0.0 <= quality.score <= 1.0
    assert quality.gradable == (quality.score >= fundus.quality_model()["min_quality"])
    assert fundus.assess(photo, min_quality=0.0).gradable  # 0 refuses nothing
    assert not fundus.assess(photo, min_quality=1.01).gradable  # above 1 refuses everything


@pytest.mark.parametrize("colour,exposure", [
    ((95, 45, 14), 1.0),  # dim brown
    ((230, 120, 40), 0.35),  # underexposed orange
    ((240, 190, 160), 1.0),  # pale
    ((170, 130, 140), 1.0),  # bluish, as many EyePACS photos are
    ((170, 160, 40), 1.0),  # greenish-yellow, as DrimDB's camera makes them
])
def test_a_dim_pale_or_tinted_fundus_is_a_gradable_fundus(colour, exposure):
    quality = fundus.assess(tinted(colour, exposure))
    assert not quality.reason.startswith(fundus.NOT_FUNDUS), quality.reason
    assert quality.gradable, quality.reason


def test_a_large_haemorrhage_is_not_blur():
    # a blot haemorrhage covering a quarter of the field: the vessels elsewhere are as sharp as ever
    eye = fundus_photo(w=600, h=400, cx=300, cy=200, r=185, seed=3)
    bleeding = jpeg_copy(haemorrhage(eye, 250, 200, 110), 85)
    quality = fundus.assess(bleeding)
    assert quality.gradable, quality.reason
    assert quality.score > 0.5
    out_of_focus = fundus.assess(blurred(bleeding))
    assert not out_of_focus.gradable and out_of_focus.reason.startswith("out of focus"), out_of_focus.reason


def test_the_verdict_and_score_do_not_depend_on_the_resolution(tmp_path):
    # one eye drawn at 1,500 px, and the same photo at 760 and 350 px, and as a 12 MP camera JPEG
    big = fundus_photo(w=1500, h=1125, cx=750, cy=562, r=540, seed=3, noise=2.0)
    copies = {side: jpeg_copy(big.resize((side, round(side * 0.75)), Image.LANCZOS), 90) for side in (350, 760, 1500)}
    big.resize((4000, 3000), Image.BICUBIC).save(tmp_path / "camera.jpeg", quality=92)
    photos = {**{str(k): v for k, v in copies.items()}, "12 MP": None}
    scores = {}
    for name, photo in photos.items():
        quality = fundus.assess(photo) if photo is not None else fundus.load_photo(tmp_path / "camera.jpeg", 512)[1]
        scores[name] = (quality.gradable, quality.score)
    assert len({gradable for gradable, _ in scores.values()}) == 1, scores
    values = [score for _, score in scores.values()]
    assert max(values) - min(values) <= 0.05, scores
    # the same for a blurred eye, whose score lies near the operating point
    soft = big.filter(ImageFilter.GaussianBlur(0.006 * 1500))
    soft_scores = [fundus.assess(jpeg_copy(soft.resize((side, round(side * 0.75)), Image.LANCZOS), 90)).score
                   for side in (350, 760, 1500)]
    assert max(soft_scores) - min(soft_scores) <= 0.05, soft_scores


@pytest.mark.parametrize("side", [353, 760])
def test_a_fundus_that_fills_its_frame_is_judged_on_its_retina(side):
    # no black anywhere: the field's circle reaches past every corner of the frame
    h = round(side * 0.75)
    photo = jpeg_copy(fundus_photo(w=side, h=h, cx=side / 2, cy=h / 2, r=0.68 * side, seed=3), 85)
    assert np.asarray(photo).max(axis=2)[[0, 0, -1, -1], [0, -1, 0, -1]].min() > 40  # the corners are retina
    quality = fundus.assess(photo)
    assert quality.gradable, quality.reason
    blurry = fundus.assess(blurred(photo, 0.03))
    assert not blurry.gradable and blurry.reason.startswith("out of focus"), blurry.reason


def test_a_dim_16_bit_photo_stays_dim_and_is_judged_like_its_8_bit_twin(tmp_path):
    eight = np.asarray(tinted((230, 120, 40), exposure=0.35))
    png16(tmp_path / "rgb16.png", eight.astype(np.uint16) * 257)  # 16 bits, no sBIT
    png16(tmp_path / "grey16.png", eight[..., 0].astype(np.uint16) * 257)
    png16(tmp_path / "rgb12.png", eight.astype(np.uint16) * 16, significant_bits=12)  # 12 bits in 16
    png16(tmp_path / "rgb12_bare.png", eight.astype(np.uint16) * 16)  # no sBIT, every value under 4,096
    png16(tmp_path / "grey12.png", eight[..., 0].astype(np.uint16) * 16)  # the same, greyscale
    # a transparent border (alpha 0) over white: composited onto black, as an 8-bit RGBA PNG is
    rgba = np.dstack([eight.astype(np.uint16) * 257, np.full(eight.shape[:2], 65535, np.uint16)])
    rgba[:, :20] = (65535, 65535, 65535, 0)
    png16(tmp_path / "rgba16.png", rgba)
    expected_rgba = eight.copy()
    expected_rgba[:, :20] = 0
    # scaled by its bits, not by its peak, and every value kept: Pillow keeps the high byte of a 16-bit colour
    # PNG, so 12 significant bits came back in 16 grey levels, and without an sBIT chunk 16 times too dark
    for name, expected in (("rgb16.png", eight), ("grey16.png", eight[..., 0]), ("rgb12.png", eight),
                           ("rgb12_bare.png", eight), ("grey12.png", eight[..., 0]), ("rgba16.png", expected_rgba)):
        decoded = np.asarray(fundus.decode(tmp_path / name), np.float32)
        if expected.ndim == 2:
            decoded = decoded[..., 0]
        assert np.abs(decoded - expected).max() <= 1, name
    twin = fundus.assess(Image.fromarray(eight))
    for name in ("rgb16.png", "rgb12.png", "rgb12_bare.png"):
        sixteen = fundus.assess(fundus.decode(tmp_path / name))
        assert sixteen.gradable == twin.gradable and abs(sixteen.score - twin.score) < 0.02, name


def test_an_open_eye_through_the_camera_is_not_a_fundus_photo_but_lesions_are_a_fundus():
    # DrimDB's outliers: an outer eye in the camera's field passed every earlier check (a colour photo, in
    # focus, a lit field of the right size). Its blue share jumps where sclera meets iris and skin; blood
    # (a blot haemorrhage over a quarter of the field) and exudates leave the retina's as it was
    eye = fundus_photo(w=600, h=400, cx=300, cy=200, r=185, seed=3)
    photos = {"eye": jpeg_copy(eye, 85), "bleeding": jpeg_copy(haemorrhage(eye, 250, 200, 110), 85),
              "exudates": jpeg_copy(exudates(eye, 240, 210, 60), 85), "outer eye": outer_eye()}
    quality = {name: fundus.assess(photo) for name, photo in photos.items()}
    edges = {name: q.measures["chroma_edges"] for name, q in quality.items()}
    for name in ("eye", "bleeding", "exudates"):
        assert quality[name].gradable, (name, quality[name].reason)
        assert edges[name] < 1.5 * edges["eye"] + 0.002, edges
    assert not quality["outer eye"].gradable and quality["outer eye"].reason.startswith(fundus.NOT_FUNDUS), \
        quality["outer eye"].reason
    assert edges["outer eye"] > 3 * max(edges[name] for name in ("eye", "bleeding", "exudates")), edges


def test_skin_under_the_flash_is_not_a_fundus_photo_for_its_glints():
    # DrimDB's skin close-ups passed the colour edges and the colour part (one material, one colour): the
    # flash's glints on moist skin are what a retina never shows. Every drawn glint is counted, and the same
    # skin without them is not called "not a fundus photo" for any glint
    for glints in (20, 60):
        quality = fundus.assess(skin_close_up(glints=glints, seed=glints))
        assert quality.measures["specular_dots"] == glints
        assert not quality.gradable and quality.reason.startswith(f"{fundus.NOT_FUNDUS}: it shows {glints} specular")
    bare = fundus.assess(skin_close_up(glints=0))
    assert bare.measures["specular_dots"] == 0 and "specular" not in bare.reason


def dots_and_lines(kind: str, colour=(255, 250, 245), width: int = 2, blur: float = 0.7, seed: int = 0):
    """A QUALITY_SIDE square of orange with 36 white spots (3 px) or 36 line segments (12 px, at random angles,
    as a vessel's light reflex is), one per 30 px cell, as specular_dots reads it."""
    rng, side = np.random.default_rng(seed), fundus.QUALITY_SIDE
    img = Image.new("RGB", (side, side), (200, 110, 60))
    pen = ImageDraw.Draw(img)
    for x in range(40, 220, 30):
        for y in range(40, 220, 30):
            if kind == "dots":
                pen.ellipse([x - 1, y - 1, x + 1, y + 1], fill=colour)
            else:
                a = rng.uniform(0, np.pi)
                pen.line([(x - 6 * np.cos(a), y - 6 * np.sin(a)), (x + 6 * np.cos(a), y + 6 * np.sin(a))],
                         fill=colour, width=width)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(blur))), np.ones((side, side), bool)


def test_specular_dots_counts_white_dots_not_lines_nor_yellow_dots():
    # the oracle is the drawing: 36 white dots are 36 glints; 36 white lines (a vessel's reflex) and 36
    # yellow dots (exudates) are none, or nearly: a line 2-3 px wide drawn on pixels is not a dot at any angle
    assert fundus.specular_dots(*dots_and_lines("dots")) == 36
    assert fundus.specular_dots(*dots_and_lines("dots", colour=(250, 225, 120))) == 0
    for width in (2, 3):
        for seed in range(3):
            assert fundus.specular_dots(*dots_and_lines("lines", width=width, seed=seed)) <= 3, (width, seed)


def test_a_photo_that_may_be_a_fundus_is_judged_on_its_quality_alone():
    # a photo whose colour edges lie under the fundus limit is judged as a fundus, on its quality alone: the
    # score is P(gradable), whatever that reading; past the limit it is no fundus photo, whatever its quality
    measures = fundus.assess(drawn("round_on_black")[0]).measures
    model = json.loads(json.dumps(fundus.quality_model()))
    reading = measures[model["fundus"]["measure"]]
    model["fundus"]["limit"] = 1.01 * reading
    gradable, reason, score = fundus.verdict(measures, model=model)
    assert gradable, reason
    assert score == pytest.approx(fundus.probability(model["gradable"], measures))
    model["fundus"]["limit"] = 0.99 * reading
    gradable, reason, score = fundus.verdict(measures, model=model)
    assert not gradable and reason.startswith(fundus.NOT_FUNDUS) and score == 0.0, reason


def test_a_photo_under_the_smallest_side_is_too_small_not_out_of_focus():
    # issue 31: a 1x1 px photo was refused "out of focus"; it is too small, and the sentence names the smallest
    # the check judges (fundus.MIN_SIDE); at that side the drawn photo is judged on its quality again
    photo = jpeg_copy(fundus_photo(w=600, h=400, cx=300, cy=200, r=185, seed=3), 90)
    # (10, 4000): a sliver whose measures had no patches to read (an IndexError in numpy, a dead loader worker)
    for size in ((1, 1), (60, 40), (144, fundus.MIN_SIDE - 1), (10, 4000)):
        q = fundus.assess(photo.resize(size, Image.LANCZOS))
        assert not q.gradable and q.score == 0.0
        assert q.reason == (f"too small: {size[0]}x{size[1]} px; the check judges photos of at least "
                            f"{fundus.MIN_SIDE} px on the short side"), q.reason
    q = fundus.assess(photo.resize((144, fundus.MIN_SIDE), Image.LANCZOS))
    assert not q.reason.startswith("too small"), q.reason


def test_a_jpeg_padded_with_zeros_is_damaged_and_one_padded_after_its_end_is_whole(tmp_path):
    # issue 31: the first bytes of a photo, then zeros to its size (a broken copy), decoded and was graded
    # gradable; it is unreadable, named damaged, wherever a photo is opened (the check, the training loader)
    import io

    import dataloader
    buf = io.BytesIO()
    fundus_photo(w=600, h=400, cx=300, cy=200, r=185, seed=3).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    for keep in (1000, len(data) // 2, len(data) - fundus.ZERO_TAIL):
        path = tmp_path / f"cut_{keep}.jpeg"
        path.write_bytes(data[:keep] + bytes(len(data) - keep))
        assert fundus.zero_padded(path) >= fundus.ZERO_TAIL
        for load in (lambda: fundus.load_photo(path, 128), lambda: dataloader.load_square(str(path), 128)):
            with pytest.raises(OSError, match="^damaged: its last .* bytes are zeros"):
                load()
    # zeros after the end-of-image marker (a camera padding its file) are no damage, nor is a plain file
    padded = tmp_path / "padded_after_end.jpeg"
    padded.write_bytes(data + bytes(8192))
    plain = tmp_path / "plain.jpeg"
    plain.write_bytes(data)
    for path in (padded, plain):
        assert fundus.zero_padded(path) == 0
        assert fundus.load_photo(path, 128)[1].gradable
        assert dataloader.load_square(str(path), 128).size == (128, 128)
