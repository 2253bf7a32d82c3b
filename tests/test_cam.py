"""Grading new photographs and Grad-CAM: a known-answer test, and the same grades as the batch path."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

import evaluate
import objectives
import fundus
import plot
import synthetic
import dataloader
import runtime
import train

CELL, GRID = 32, 3  # 96 px images; the last residual stage of a ResNet sees them as 3 x 3 cells


def write_patch_set(root, n_train=160, n_test=20, seed=0):
    """Grade 2 when a bright square fills one of the 3 x 3 cells, grade 0 when there is none: the
    class is decided by the patch alone, so the evidence is known to be there."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    cells = {}
    for split, n in (("train", n_train), ("test", n_test)):
        names, grades = [], []
        for i in range(n):
            image = rng.integers(90, 150, (GRID * CELL, GRID * CELL, 3), dtype=np.uint8)
            grade = 2 if i % 2 == 0 else 0
            if grade:
                r, c = rng.integers(0, GRID, 2)
                image[r * CELL + 4:(r + 1) * CELL - 4, c * CELL + 4:(c + 1) * CELL - 4] = 255
                cells[f"{split}{i}"] = (r, c)
            Image.fromarray(image).save(root / "images" / f"{split}{i}.png")
            names.append(f"{split}{i}")
            grades.append(grade)
        (root / f"{split}_img.csv").write_text("\n".join(names) + "\n")
        (root / f"{split}_label.csv").write_text("\n".join(map(str, grades)) + "\n")
    return cells


def test_grad_cam_peaks_inside_the_patch(tmp_path):
    cells = write_patch_set(tmp_path / "patch")
    train.main(["--data-root", str(tmp_path / "patch"), "--image-size", str(GRID * CELL), "--epochs", "4",
                "--optimizer", "adamw", "--lr", "1e-3", "--no-augment", "--batch-size", "16", "--workers", "0",
                "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "logs"), "--quiet"])
    checkpoint = runtime.load_checkpoint(tmp_path / "ck" / "resnet18_scratch" / "last.pt")
    model = evaluate.load_model(checkpoint, "test", torch.device("cpu"))
    names = [n for n in cells if n.startswith("test")][:10]
    # loaded as the training data was: PhotoDataset would crop these non-fundus images to the patch
    table = dataloader.FundusTable(np.array([str(tmp_path / "patch" / "images" / f"{n}.png") for n in names]),
                                      np.full(len(names), 2), "test")
    dataset = dataloader.FundusDataset(table, GRID * CELL)
    images = torch.stack([dataset[i][0] for i in range(len(names))])
    x = dataloader.BatchTransform(torch.device("cpu"), augment=False)(images)
    with torch.no_grad():
        preds = model(x).argmax(1)
    assert (preds == 2).sum() >= 9, preds
    cams = evaluate.grad_cam(model, x, torch.full((len(names),), 2), objectives.OBJECTIVES["ce"])
    assert cams.shape == (len(names), GRID * CELL, GRID * CELL) and cams.max() <= 1 + 1e-6
    hits = 0
    for name, cam in zip(names, cams):
        y, x_ = np.unravel_index(int(cam.argmax()), cam.shape)
        hits += (y // CELL, x_ // CELL) == tuple(int(v) for v in cells[name])
    assert hits >= 8, f"Grad-CAM maximum inside the patch for {hits} of 10 images"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cam_run")
    # photos at 96 px, the smallest the gradability check judges (fundus.MIN_SIDE); the model at 64
    root = synthetic.generate_demo(out / "demo", n_train=48, n_test=20, size=96, seed=3, quiet=True)
    train.main(["--data-root", str(root), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--image-size", "64",
                "--checkpoint-dir", str(out / "ck"), "--log-dir", str(out / "logs"), "--quiet"])
    return out, root, out / "ck" / "resnet18_scratch" / "last.pt"


def test_images_one_by_one_equal_the_batch_evaluation(demo_run, tmp_path):
    out, root, ckpt = demo_run
    checkpoint = runtime.load_checkpoint(ckpt)
    table = dataloader.load_fundus_data(root).test
    _, batch_probs = evaluate.evaluate_checkpoint(checkpoint, table, torch.device("cpu"), 7, 0, tta=False)
    csv = tmp_path / "photos.csv"
    evaluate.main([str(ckpt), "--images", *map(str, table.paths), "--out", str(csv), "--batch-size", "1",
                   "--workers", "0", "--quiet"])
    photos = pd.read_csv(csv)
    assert photos["path"].tolist() == [str(p) for p in table.paths]
    assert photos["grade"].tolist() == batch_probs.argmax(1).tolist()
    np.testing.assert_allclose(photos[[f"p{g}" for g in range(5)]].to_numpy(), batch_probs, atol=1e-5)


def test_raw_photo_is_cropped_to_the_eye_like_prepare(demo_run, tmp_path):
    _, root, _ = demo_run
    crop = Image.open(root / "images" / f"{dataloader.load_fundus_data(root).test.names[0]}.jpeg")
    wide = Image.new("RGB", (160, 100))
    wide.paste(crop.resize((90, 90)), (35, 5))  # the eye smaller, off centre, in a wide black frame
    wide.save(tmp_path / "raw.png")
    seen = evaluate.PhotoDataset([tmp_path / "raw.png"], 64)[0][0].float()
    original = evaluate.PhotoDataset([root / "images" / crop.filename.split("/")[-1]], 64)[0][0].float()
    assert seen.shape == original.shape == (3, 64, 64)
    assert (seen - original).abs().mean() < 12, "the raw photo was not cropped back to the eye"


def test_ben_graham_crops_are_graded_as_they_are_by_a_run_trained_on_them(demo_run, tmp_path):
    _, root, _ = demo_run
    name = dataloader.load_fundus_data(root).test.names[0]
    crop = fundus.crop_eye(Image.open(root / "images" / f"{name}.jpeg").convert("RGB"), 128)
    fundus.ben_graham(crop, 64).save(tmp_path / "graham.jpeg", quality=95)
    ImageOps.grayscale(crop).convert("RGB").save(tmp_path / "grey.jpeg", quality=95)
    paths = [tmp_path / "graham.jpeg", tmp_path / "grey.jpeg"]
    image, _, status, reason, _ = evaluate.PhotoDataset(paths, 64, ben_graham=True)[0]
    assert (status, reason) == (evaluate.GRADED, "")
    assert torch.equal(image, dataloader.to_uint8_chw(dataloader.load_square(str(paths[0]), 64)))
    _, _, status, reason, _ = evaluate.PhotoDataset(paths, 64, ben_graham=False)[0]
    assert status == evaluate.UNGRADABLE and "already Ben Graham-normalised" in reason
    # a greyscale crop is not taken for one: it stays no colour photo for either run
    for graham in (True, False):
        _, _, status, reason, _ = evaluate.PhotoDataset(paths, 64, ben_graham=graham)[1]
        assert status == evaluate.UNGRADABLE and reason.startswith("not a colour photo")


def test_every_file_gets_a_row_and_cams_are_drawn_for_graded_photos_only(demo_run, tmp_path, capsys):
    _, root, ckpt = demo_run
    folder = tmp_path / "photos"
    folder.mkdir()
    names = dataloader.load_fundus_data(root).test.names[:3]
    for n in names:
        (folder / f"{n}.jpeg").write_bytes((root / "images" / f"{n}.jpeg").read_bytes())
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8 not really")
    Image.new("RGB", (160, 120)).save(folder / "black.png")  # a valid PNG with no eye in it
    (tmp_path / "notes.txt").write_text("not an image")
    cams, csv = tmp_path / "cams", tmp_path / "grades.csv"
    evaluate.main([str(ckpt), "--images", str(folder), str(tmp_path / "notes.txt"), "--cam", str(cams),
                   "--out", str(csv), "--workers", "0", "--quiet"])
    out = capsys.readouterr().out
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == ["path", "status", "reason", "quality", "grade", "score", "confidence",
                                   "p0", "p1", "p2", "p3", "p4", "checkpoint", "weights_digest", "quality_check",
                                   "min_quality"]
    status = dict(zip(table["path"], table["status"]))
    assert [status[str(folder / f"{n}.jpeg")] for n in names] == ["graded"] * 3
    assert status[str(folder / "broken.jpeg")] == status[str(tmp_path / "notes.txt")] == "unreadable"
    assert status[str(folder / "black.png")] == "ungradable"
    black = table[table["status"] == "ungradable"].iloc[0]
    assert black["reason"].startswith("too dark") and black["grade"] == "" and black["p0"] == ""
    assert float(black["quality"]) == 0.0 and table["quality"][table["status"] == "unreadable"].tolist() == ["", ""]
    assert all(0 <= float(q) <= 1 for q in table["quality"][table["status"] == "graded"])
    assert "3 graded, 1 ungradable, 2 unreadable" in out
    for n in names:
        assert (cams / f"{n}.jpeg").is_file()
        with Image.open(cams / f"{n}_cam.png") as figure:
            assert figure.size[0] > 600 and len(figure.getcolors(1 << 20) or []) > 100
    assert not (cams / "black_cam.png").exists()


def test_force_grades_an_ungradable_photo_and_keeps_the_reason(demo_run, tmp_path):
    _, root, ckpt = demo_run
    name = dataloader.load_fundus_data(root).test.names[0]
    blurred = tmp_path / "blurred.png"
    Image.open(root / "images" / f"{name}.jpeg").filter(ImageFilter.GaussianBlur(3)).save(blurred)
    csv = tmp_path / "grades.csv"
    evaluate.main([str(ckpt), "--images", str(blurred), "--out", str(csv), "--workers", "0", "--quiet"])
    assert pd.read_csv(csv)["status"].tolist() == ["ungradable"]
    evaluate.main([str(ckpt), "--images", str(blurred), "--out", str(csv), "--workers", "0", "--quiet", "--force"])
    row = pd.read_csv(csv).iloc[0]
    assert row["status"] == "graded" and row["reason"].startswith("out of focus") and 0 <= row["grade"] <= 4
    assert row[[f"p{g}" for g in range(5)]].sum() == pytest.approx(1, abs=1e-4)


def test_missing_image_path_is_a_user_error(demo_run, capsys):
    _, _, ckpt = demo_run
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(ckpt), "--images", "no/such/photo.jpeg"])
    assert exit_info.value.code == 2 and "--images no/such/photo.jpeg: no such file" in capsys.readouterr().err


def test_contact_sheet_from_evaluate_to_plot(demo_run, tmp_path):
    out, _, ckpt = demo_run
    evaluate.main([str(ckpt), "--cam-per-grade", "2", "--workers", "0", "--quiet",
                   "--out", str(out / "logs" / "resnet18_scratch_eval.json"), "--figure-dir", str(tmp_path / "f")])
    with np.load(out / "logs" / "resnet18_scratch_cams.npz") as sheet:
        grades = sheet["grades"]
        assert sheet["cams"].shape[1:] == (64, 64) and sheet["images"].shape[1:] == (64, 64, 3)
    # up to 2 per grade, fewer where the 20 test images hold fewer (the demo mix gives 14/1/3/1/1)
    assert np.bincount(grades, minlength=5).tolist() == [min(2, c) for c in synthetic.grade_counts(20)]
    plot.main([str(out / "logs"), "--out", str(tmp_path / "figures")])
    with Image.open(tmp_path / "figures" / "cams_resnet18_scratch.png") as figure:
        assert figure.size[1] > 1000 and len(figure.getcolors(1 << 20) or []) > 500


def test_min_quality_moves_the_operating_point_of_images(demo_run, tmp_path):
    _, root, ckpt = demo_run
    name = dataloader.load_fundus_data(root).test.names[0]
    soft = tmp_path / "soft.png"  # a mild blur: its score lies between 0 and 1, not at either end
    Image.open(root / "images" / f"{name}.jpeg").filter(ImageFilter.GaussianBlur(1.2)).save(soft)
    csv = tmp_path / "grades.csv"
    evaluate.main([str(ckpt), "--images", str(soft), "--out", str(csv), "--workers", "0", "--quiet"])
    score = pd.read_csv(csv)["quality"].iloc[0]
    assert 0 < score < 1
    for min_quality, status in ((score - 0.01, "graded"), (score + 0.01, "ungradable")):
        evaluate.main([str(ckpt), "--images", str(soft), "--out", str(csv), "--workers", "0", "--quiet",
                       "--min-quality", f"{min_quality:.6f}"])
        row = pd.read_csv(csv).iloc[0]
        assert row["status"] == status and row["quality"] == pytest.approx(score, abs=1e-6)


def test_a_dim_16_bit_photo_grades_like_its_8_bit_twin(demo_run, tmp_path):
    from photo_kit import png16

    _, root, ckpt = demo_run
    name = dataloader.load_fundus_data(root).test.names[0]
    eye = np.asarray(Image.open(root / "images" / f"{name}.jpeg").convert("RGB"), np.float32)
    dim = np.rint(eye * 0.35).astype(np.uint8)  # an underexposed photo: its brightest value far under 255
    Image.fromarray(dim).save(tmp_path / "eight.png")
    png16(tmp_path / "sixteen.png", dim.astype(np.uint16) * 257)  # the same photo from a 16-bit camera
    Image.fromarray(dim[..., 1]).save(tmp_path / "grey8.png")  # and its green channel, as a red-free camera's
    png16(tmp_path / "grey16.png", dim[..., 1].astype(np.uint16) * 257)
    csv = tmp_path / "grades.csv"
    evaluate.main([str(ckpt), "--images", *[str(tmp_path / f) for f in ("eight.png", "sixteen.png", "grey8.png",
                   "grey16.png")], "--out", str(csv), "--workers", "0", "--quiet", "--force"])
    table = pd.read_csv(csv).set_index(pd.read_csv(csv)["path"].map(lambda p: Path(p).stem))
    probs = table[[f"p{g}" for g in range(5)]]
    assert np.abs(probs.loc["sixteen"] - probs.loc["eight"]).max() <= 0.02
    assert np.abs(probs.loc["grey16"] - probs.loc["grey8"]).max() <= 0.02  # scaled by its bits, not its peak
    # the demo model barely tells brightness apart, so also what it is shown: the same pixels, not brighter ones
    for sixteen, eight in (("sixteen", "eight"), ("grey16", "grey8")):
        seen = [evaluate.PhotoDataset([tmp_path / f"{f}.png"], 64, force=True)[0][0].float() for f in (sixteen, eight)]
        assert (seen[0] - seen[1]).abs().mean() < 1.0, sixteen
