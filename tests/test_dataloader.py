"""Dataset layouts, bad input, decoding and the device-side transform."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader
import train
from runtime import UserError


def write_image(path, size=(40, 40), mode="RGB", value=120):
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[: size[1] // 2, :, 0] = 250  # top half red: orientation is visible
    Image.fromarray(arr).convert(mode).save(path)


def write_lab(root, train_rows, test_rows, ext=".jpeg"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        (root / f"{split}_img.csv").write_text("".join(f"{n}\n" for n, _ in rows))
        (root / f"{split}_label.csv").write_text("".join(f"{g}\n" for _, g in rows))
        for name, _ in rows:
            write_image(root / "images" / f"{name}{ext}")
    return root


def rows(prefix, n):
    return [(f"{prefix}{i}_{'left' if i % 2 else 'right'}", i % 5) for i in range(n)]


def test_lab_layout_keeps_the_first_row(tmp_path):
    write_lab(tmp_path, rows("a", 7), rows("b", 3))
    fundus = dataloader.load_fundus_data(tmp_path)
    assert (len(fundus.train), len(fundus.test)) == (7, 3)  # pandas' default header would give 6 and 2
    assert fundus.train.names[0] == "a0_right" and fundus.train.grades.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert fundus.layout == "lab" and fundus.image_dir == tmp_path / "images"


def test_image_dir_defaults_to_root_without_images_folder(tmp_path):
    write_lab(tmp_path, rows("a", 5), rows("b", 5))
    for f in (tmp_path / "images").iterdir():
        f.rename(tmp_path / f.name)
    (tmp_path / "images").rmdir()
    assert dataloader.load_fundus_data(tmp_path).image_dir == tmp_path


def eyepacs(tmp_path, patients=60):
    (tmp_path / "images").mkdir()
    lines = ["image,level"]
    for p in range(patients):
        for eye in ("left", "right"):
            lines.append(f"{p}_{eye},{(p + (eye == 'left')) % 5}")
            write_image(tmp_path / "images" / f"{p}_{eye}.jpeg", size=(16, 16))
    (tmp_path / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_labels_table_split_is_grouped_by_patient_and_repeatable(tmp_path):
    eyepacs(tmp_path)
    a = dataloader.load_fundus_data(tmp_path, test_fraction=0.25, split_seed=3)
    b = dataloader.load_fundus_data(tmp_path, test_fraction=0.25, split_seed=3)
    train_patients = {dataloader.patient_id(n) for n in a.train.names}
    test_patients = {dataloader.patient_id(n) for n in a.test.names}
    assert not train_patients & test_patients
    assert len(a.train) + len(a.test) == 120 and len(test_patients) == 15
    assert a.test.names == b.test.names
    assert a.test.names != dataloader.load_fundus_data(tmp_path, test_fraction=0.25, split_seed=4).test.names
    assert a.layout == "labels-table"
    val = dataloader.load_fundus_data(tmp_path, test_fraction=0.25, val_fraction=0.2, split_seed=3)
    val_patients = {dataloader.patient_id(n) for n in val.val.names}
    assert not val_patients & {dataloader.patient_id(n) for n in val.train.names}
    assert not val_patients & test_patients


def test_aptos_table(tmp_path):
    (tmp_path / "train_images").mkdir()
    lines = ["id_code,diagnosis"]
    for i in range(10):
        lines.append(f"id{i:03x},{i % 5}")
        write_image(tmp_path / "train_images" / f"id{i:03x}.png", size=(20, 20))
    (tmp_path / "train.csv").write_text("\n".join(lines))
    fundus = dataloader.load_fundus_data(tmp_path, image_dir=tmp_path / "train_images", test_fraction=0.3)
    assert len(fundus.train) == 7 and len(fundus.test) == 3


@pytest.mark.parametrize("breakage,message", [
    ("drop_csv", "test_label.csv is missing"),
    ("lengths", "lists 3 images but"),
    ("grade_5", "line 2: grade '5' is not an integer 0-4"),
    ("grade_text", "line 2: grade 'two' is not an integer 0-4"),
    ("grade_float", "line 2: grade '2.5' is not an integer 0-4"),
    ("missing_images", "2 of 3 images listed in"),
    ("no_image_dir", "nowhere does not exist"),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, breakage, message):
    root = write_lab(tmp_path / "ds", rows("a", 3), rows("b", 3))
    if breakage == "drop_csv":
        (root / "test_label.csv").unlink()
    elif breakage == "lengths":
        (root / "train_label.csv").write_text("0\n1\n2\n3\n")
    elif breakage.startswith("grade"):
        bad = {"grade_5": "5", "grade_text": "two", "grade_float": "2.5"}[breakage]
        (root / "train_label.csv").write_text(f"0\n{bad}\n1\n")
    elif breakage == "missing_images":
        (root / "images" / "b0_right.jpeg").unlink()
        (root / "images" / "b2_right.jpeg").unlink()
    extra = ["--image-dir", str(tmp_path / "nowhere")] if breakage == "no_image_dir" else []
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-root", str(root), "--epochs", "1", "--workers", "0", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if breakage == "missing_images":
        assert "b0_right, b2_right" in err


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.filterwarnings("ignore:skipped unreadable image")  # expected: the test reads the count printed
def test_undecodable_image_names_path_and_row(tmp_path, capsys, workers):
    root = write_lab(tmp_path / "ds", rows("a", 8), rows("b", 4))
    (root / "images" / "a3_left.jpeg").write_bytes(b"not a jpeg at all")
    args = ["--data-root", str(root), "--epochs", "1", "--workers", str(workers), "--image-size", "32",
            "--batch-size", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "lg")]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"a3_left.jpeg (line 4 of {root / 'train_img.csv'})" in err, err  # the file's line, not a row number
    assert "--skip-bad-images" in err and len(err.splitlines()) == 1, err

    train.main(args + ["--skip-bad-images", "--quiet"])
    assert "skipped unreadable images in epoch 1 (--skip-bad-images): 1 in training" in capsys.readouterr().out
    assert (tmp_path / "ck" / "resnet18_scratch" / "last.pt").is_file()


@pytest.mark.parametrize("mode,ext", [("RGBA", ".png"), ("L", ".png"), ("L", ".jpeg"), ("P", ".png"),
                                      ("RGB", ".jpg")])
def test_other_image_modes_load_as_rgb(tmp_path, mode, ext):
    path = tmp_path / f"x{ext}"
    write_image(path, size=(50, 50), mode=mode)
    table = dataloader.FundusTable(np.array([str(path)]), np.array([2]), "test")
    image, grade = dataloader.FundusDataset(table, 32)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and grade == 2


def test_wide_photo_is_cropped_not_squashed(tmp_path):
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:100, :200]
    arr[(yy - 50) ** 2 + (xx - 100) ** 2 < 45 ** 2] = 200  # a round eye in a wide frame
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = np.asarray(dataloader.load_square(str(tmp_path / "wide.png"), 100))
    bright = img[..., 0] > 100
    height = bright.any(1).sum()
    width = bright.any(0).sum()
    assert abs(height - width) <= 2 and height > 85


def test_large_jpeg_decodes_at_reduced_scale_to_the_right_size(tmp_path):
    write_image(tmp_path / "big.jpeg", size=(512, 512))
    img = dataloader.load_square(str(tmp_path / "big.jpeg"), 64)
    assert img.size == (64, 64) and np.asarray(img)[5, 32, 0] > 200 and np.asarray(img)[60, 32, 0] < 150


def test_eval_transform_is_imagenet_normalisation():
    from torchvision.transforms import Normalize

    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ours = dataloader.BatchTransform(torch.device("cpu"), augment=False)(x)
    theirs = Normalize(dataloader.IMAGENET_MEAN, dataloader.IMAGENET_STD)(x.float() / 255)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_augmentation_keeps_shape_dtype_and_format_and_is_seeded():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    transform = dataloader.BatchTransform(torch.device("cpu"), augment=True, channels_last=True)
    a = transform(x, torch.Generator().manual_seed(1))
    b = transform(x, torch.Generator().manual_seed(1))
    c = transform(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = dataloader.BatchTransform(torch.device("cpu"), augment=False)(x)
    assert not torch.allclose(a, plain)


def test_augmentation_rotates_by_any_angle():
    # a red square off the centre: where its centroid lands gives the rotation. Flips alone would put it
    # in 4 places only (the diagonals); rotation by any angle spreads it over all 16 sectors of the circle
    x = torch.zeros(800, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 4:10, 14:18] = 255
    out = dataloader.BatchTransform(torch.device("cpu"), augment=True, max_scale=0, brightness=0, contrast=0)(
        x, torch.Generator().manual_seed(0))
    red = (out[:, 0] > 0).float()
    yy, xx = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    mass = red.sum((1, 2))
    angle = torch.atan2((red * yy).sum((1, 2)) / mass, (red * xx).sum((1, 2)) / mass)
    sectors = torch.bincount(((angle + math.pi) / (2 * math.pi) * 16).long().clamp(0, 15), minlength=16)
    assert sectors.min() >= 0.5 * 800 / 16, sectors.tolist()


def test_balanced_sampler_draws_grades_evenly_and_repeatably():
    grades = np.array([0] * 730 + [1] * 70 + [2] * 150 + [3] * 25 + [4] * 25)
    sampler = dataloader.BalancedSampler(grades, seed=0)
    sampler.set_epoch(1)
    drawn = np.bincount(grades[list(sampler)], minlength=5)
    assert drawn.min() > 150 and drawn.max() < 250
    assert list(sampler) == list(sampler)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first != list(sampler)
    ranks = [list(dataloader.BalancedSampler(grades, 2, r, seed=0)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 500


def test_shard_sampler_covers_each_image_once():
    shards = [list(dataloader.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_class_counts():
    assert dataloader.class_counts(np.array([0, 0, 2, 4])).tolist() == [2, 0, 1, 0, 1]


def test_default_root_uses_the_demo_set_and_says_so(tmp_path, monkeypatch):
    import synthetic

    monkeypatch.chdir(tmp_path)
    real = synthetic.ensure_demo
    monkeypatch.setattr(synthetic, "ensure_demo",
                        lambda root: real(root, n_train=10, n_test=5, size=32, quiet=True))
    said = []
    fundus = dataloader.load_fundus_data(None, log=said.append)
    assert fundus.layout == "demo" and len(fundus.train) == 10 and fundus.image_size() == 32
    assert said == ["data/ holds no dataset: generated the synthetic demo set in data/demo/"]
    dataloader.load_fundus_data(None, log=said.append)
    assert said[-1] == "data/ holds no dataset: using the synthetic demo set in data/demo/"


def test_patient_split_rejects_bad_fraction():
    with pytest.raises(UserError):
        dataloader.patient_split(["1_left", "2_left"], 1.5, 0)


def test_augmentation_mirrors_half_the_images():
    # red and green squares side by side: a rotation keeps their clockwise order, a mirror reverses it
    x = torch.zeros(400, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 4:12, 4:12] = 255
    x[:, 1, 4:12, 20:28] = 255
    out = dataloader.BatchTransform(torch.device("cpu"), augment=True, max_scale=0, brightness=0, contrast=0)(
        x, torch.Generator().manual_seed(0))
    pixels = out * torch.tensor(dataloader.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(dataloader.IMAGENET_MEAN).view(1, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")

    def centroid(mask):
        w = mask.float().sum((1, 2)).clamp_min(1)
        return (mask * xx).sum((1, 2)) / w, (mask * yy).sum((1, 2)) / w

    rx, ry = centroid((pixels[:, 0] > 0.5) & (pixels[:, 1] < 0.5))
    gx, gy = centroid((pixels[:, 1] > 0.5) & (pixels[:, 0] < 0.5))
    mirrored = ((rx * gy - ry * gx) < 0).float().mean()  # the original's order is clockwise (> 0)
    assert 0.35 < mirrored < 0.65
