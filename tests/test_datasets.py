"""The public DR datasets as published: small copies with the exact file names, column headers and
folder names of each (made here from the synthetic demo images, pasted into raw camera-like frames of
several sizes), read for counts, grades, splits and exclusions; external validation and the data card."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataloader
import evaluate
import objectives
import fundus
import layouts
import plot
import train
from runtime import UserError

EYE = 48  # the demo images' side; eye finding is reliable from here up (at 32 px it misses some)
N_PHOTOS = 40


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory):
    """(raw photos, grades): N_PHOTOS synthetic eyes pasted into black frames of three sizes, as camera
    photos are (the eye smaller than the frame and off its centre)."""
    import synthetic

    root = synthetic.generate_demo(tmp_path_factory.mktemp("demo") / "demo", n_train=N_PHOTOS - 10, n_test=10,
                                   size=EYE, seed=1, workers=1, quiet=True)
    names = layouts.read_column(root / "train_img.csv") + layouts.read_column(root / "test_img.csv")
    grades = [int(g) for split in ("train", "test") for g in layouts.read_column(root / f"{split}_label.csv")]
    photos = []
    for i, name in enumerate(names):
        frame = Image.new("RGB", (EYE + 16 + 6 * (i % 3), EYE + 6 + 2 * (i % 3)))
        frame.paste(Image.open(root / "images" / f"{name}.jpeg"), (4 + 3 * (i % 3), 3))
        photos.append(frame)
    return photos, np.array(grades)


def save(photo: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo.save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else photo.save(path)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the published copies
def make_eyepacs(root: Path, demo, with_test: bool = True) -> dict:
    """trainLabels.csv + train/, and Kaggle's later retinopathy_solution.csv (Usage) + test/."""
    photos, grades = demo
    rows = {"train": [], "test": []}
    for i in range(N_PHOTOS):
        split = "train" if i < 28 else "test"
        name = f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}"
        save(photos[i], root / split / f"{name}.jpeg")
        rows[split].append((name, int(grades[i]), "Public" if i % 3 == 0 else "Private"))
    write_csv(root / "trainLabels.csv", "image,level\n" + "".join(f"{n},{g}\n" for n, g, _ in rows["train"]))
    if with_test:
        write_csv(root / "retinopathy_solution.csv",
                  "image,level,Usage\n" + "".join(f"{n},{g},{u}\n" for n, g, u in rows["test"]))
    else:
        for path in (root / "test").iterdir():
            path.unlink()
        (root / "test").rmdir()
    return {name: (g, split) for split in rows for name, g, _ in rows[split]}


def make_aptos(root: Path, demo) -> dict:
    """train.csv (id_code,diagnosis) + train_images/*.png; test.csv (no grades) + test_images/."""
    photos, grades = demo
    ids = [f"{(i * 7919 + 0x1f3a) * 2654435761 % 16 ** 12:012x}" for i in range(N_PHOTOS)]
    for i in range(30):
        save(photos[i], root / "train_images" / f"{ids[i]}.png")
    for i in range(30, N_PHOTOS):
        save(photos[i], root / "test_images" / f"{ids[i]}.png")
    write_csv(root / "train.csv", "id_code,diagnosis\n" + "".join(f"{ids[i]},{grades[i]}\n" for i in range(30)))
    write_csv(root / "test.csv", "id_code\n" + "".join(f"{ids[i]}\n" for i in range(30, N_PHOTOS)))
    write_csv(root / "sample_submission.csv", "id_code,diagnosis\n" + "".join(f"{ids[i]},0\n" for i in range(30, 40)))
    return {ids[i]: (int(grades[i]), "train") for i in range(30)}


MESSIDOR_UNGRADABLE = (5, 17)


def make_messidor(root: Path, demo) -> dict:
    """messidor_data.csv with image ids that carry their extension, two photos not gradable, and the
    photos one folder deeper than a plain unzip (as Kaggle's upload nests them)."""
    photos, grades = demo
    exts = [".png", ".JPG", ".jpg"]
    lines, expected = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"], {}
    for i in range(30):
        name = f"20051020_{43000 + i}_0100_PP{exts[i % 3]}" if i % 2 else f"IM00{2000 + i}{exts[i % 3]}"
        save(photos[i], root / "messidor-2" / "preprocess" / name)
        if i in MESSIDOR_UNGRADABLE:
            lines.append(f"{name},,,0")
        else:
            lines.append(f"{name},{grades[i]},{i % 2},1")
            expected[Path(name).stem] = (int(grades[i]), "train")
    write_csv(root / "messidor_data.csv", "\n".join(lines) + "\n")
    return expected


def make_messidor_as_downloaded(root: Path, demo, variant: str) -> dict:
    """Messidor-2 as its two published tables come: Google's (image_id with its extension, adjudicated_dr_grade)
    beside ADCIS' camera photos in IMAGES/, or the Kaggle copy most users download (id_code, with or without
    its extension, diagnosis) with its photos as square eye crops in messidor-2/preprocess/, .png and .JPG."""
    photos, grades = demo
    header = {"google": "image_id,adjudicated_dr_grade", "kaggle": "id_code,diagnosis"}[variant]
    lines, expected = [f"{header},adjudicated_dme,adjudicated_gradable"], {}
    for i in range(30):
        stem = f"20051020_{43000 + i}_0100_PP" if i % 2 else f"IM00{2000 + i}"
        ext = (".png", ".JPG")[i % 2] if variant == "kaggle" else (".png", ".JPG", ".jpg")[i % 3]
        if variant == "kaggle":
            left = 4 + 3 * (i % 3)  # the eye of demo_photos' frame: the copy's photos are crops of the eye
            save(photos[i].crop((left, 3, left + EYE, 3 + EYE)), root / "messidor-2" / "preprocess" / f"{stem}{ext}")
        else:
            save(photos[i], root / "IMAGES" / f"{stem}{ext}")
        listed = stem if variant == "kaggle" and i % 3 == 0 else f"{stem}{ext}"  # the copy lists both ways
        if i in MESSIDOR_UNGRADABLE:
            lines.append(f"{listed},,,0")
        else:
            lines.append(f"{listed},{grades[i]},{i % 2},1")
            expected[stem] = int(grades[i])
    write_csv(root / "messidor_data.csv", "\n".join(lines) + "\n")
    return expected


def make_idrid(root: Path, demo) -> dict:
    """B. Disease Grading as unzipped: 1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg
    and 2. Groundtruths/ with the two label tables, stray spaces in the header, empty trailing columns."""
    photos, grades = demo
    base = root / "B. Disease Grading"
    expected = {}
    for split, folder, table, span in (
            ("train", "a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", range(0, 30)),
            ("test", "b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", range(30, N_PHOTOS))):
        trailing = ",,,,," if split == "train" else ""
        lines = [f"Image name,Retinopathy grade,Risk of macular edema {trailing}"]
        for n, i in enumerate(span, 1):
            name = f"IDRiD_{n:03d}"  # the testing set numbers its photos from 001 again
            save(photos[i], base / "1. Original Images" / folder / f"{name}.jpg")
            lines.append(f"{name},{grades[i]},{i % 3}{trailing * (n % 3)}")  # none, as many as the header, or more
            expected[(split, name)] = int(grades[i])
        write_csv(base / "2. Groundtruths" / table, "\r\n".join(lines) + "\r\n")
    return expected


DDR_UNGRADABLE = {"train": 2, "valid": 1, "test": 1}


def make_ddr(root: Path, demo) -> dict:
    """DR_grading/{train,valid,test}.txt (`<file> <grade>`) and folders of the same names; grade 5 is
    ungradable (DDR_UNGRADABLE of them per split)."""
    photos, grades = demo
    base = root / "DR_grading"
    expected = {}
    for split, span in (("train", range(0, 24)), ("valid", range(24, 32)), ("test", range(32, N_PHOTOS))):
        lines = []
        for k, i in enumerate(span):
            name = f"007-{4000 + i:04d}-100.jpg" if i % 2 else f"2017032309{3305 + i:04d}.jpg"
            save(photos[i], base / split / name)
            grade = 5 if k < DDR_UNGRADABLE[split] else int(grades[i])
            lines.append(f"{name} {grade}")
            expected[Path(name).stem] = (grade, split)
        write_csv(base / f"{split}.txt", "\n".join(lines) + "\n")
    return expected


def graded(table) -> dict:
    return dict(zip(table.names, table.grades.tolist()))


# --------------------------------------------------------------------------- each layout as published
def test_eyepacs_uses_the_official_test_split_and_keeps_usage(tmp_path, demo_photos):
    expected = make_eyepacs(tmp_path, demo_photos)
    data = dataloader.load_fundus_data(tmp_path)
    assert data.layout == "eyepacs" and data.dataset == "eyepacs" and data.train.raw_photos
    assert graded(data.train) == {n: g for n, (g, s) in expected.items() if s == "train"}
    assert graded(data.test) == {n: g for n, (g, s) in expected.items() if s == "test"}
    assert data.test.source == str(tmp_path / "retinopathy_solution.csv")
    solution = pd.read_csv(tmp_path / "retinopathy_solution.csv")
    assert data.test.extra["usage"].tolist() == solution["Usage"].tolist()
    assert Path(data.train.paths[0]).parent == tmp_path / "train"
    assert Path(data.test.paths[0]).parent == tmp_path / "test"


def test_eyepacs_without_its_test_folder_draws_a_patient_split(tmp_path, demo_photos):
    make_eyepacs(tmp_path, demo_photos, with_test=False)
    data = dataloader.load_fundus_data(tmp_path, test_fraction=0.25)
    assert data.layout == "eyepacs" and len(data.train) + len(data.test) == 28
    patients = [{dataloader.patient_id(n) for n in t.names} for t in (data.train, data.test)]
    assert not patients[0] & patients[1] and len(patients[1]) == round(0.25 * 14)


def test_aptos_reads_train_csv_and_ignores_the_ungraded_test_csv(tmp_path, demo_photos):
    expected = make_aptos(tmp_path, demo_photos)
    data = dataloader.load_fundus_data(tmp_path, test_fraction=0.2)
    assert data.layout == "aptos" and data.train.raw_photos
    assert {**graded(data.train), **graded(data.test)} == {n: g for n, (g, _) in expected.items()}
    assert (len(data.train), len(data.test)) == (24, 6)  # each photo its own patient
    assert all(Path(p).parent == tmp_path / "train_images" for p in data.train.paths)


def test_messidor2_leaves_out_and_counts_ungradable_photos(tmp_path, demo_photos):
    expected = make_messidor(tmp_path, demo_photos)
    data = dataloader.load_fundus_data(tmp_path)
    assert data.layout == "messidor2" and data.image_dir == tmp_path / "messidor-2" / "preprocess"
    assert {**graded(data.train), **graded(data.test)} == {n: g for n, (g, _) in expected.items()}
    assert data.excluded_counts() == {layouts.NOT_GRADABLE: len(MESSIDOR_UNGRADABLE)}
    assert data.listed["train"].excluded == {layouts.NOT_GRADABLE: 2}
    assert all(Path(p).is_file() for p in data.excluded["path"])  # found, for a gradability check


@pytest.mark.parametrize("variant,folder", [("google", "IMAGES"), ("kaggle", "messidor-2/preprocess")])
def test_messidor2_is_read_in_both_published_variants_as_downloaded(tmp_path, demo_photos, variant, folder, capsys):
    expected = make_messidor_as_downloaded(tmp_path, demo_photos, variant)
    data = dataloader.load_fundus_data(tmp_path)
    assert data.layout == "messidor2" and data.image_dir == tmp_path / folder
    assert {**graded(data.train), **graded(data.test)} == expected
    assert data.excluded_counts() == {layouts.NOT_GRADABLE: len(MESSIDOR_UNGRADABLE)}
    assert all(Path(p).is_file() for p in data.excluded["path"])
    image, grade = dataloader.FundusDataset(data.train, 32)[0]  # decoded as training decodes it
    assert image.shape == (3, 32, 32) and grade == data.train.grades[0]
    dataloader.main(["--data-root", str(tmp_path)])  # the data card of the new user: no refusal
    assert "messidor2: Messidor-2 (adjudicated grades), layout messidor2" in capsys.readouterr().out


def test_idrid_as_unzipped_from_its_parent_or_its_own_folder(tmp_path, demo_photos):
    expected = make_idrid(tmp_path, demo_photos)
    for root in (tmp_path, tmp_path / "B. Disease Grading"):
        data = dataloader.load_fundus_data(root)
        assert data.layout == "idrid"
        assert {("train", n): g for n, g in graded(data.train).items()} | \
               {("test", n): g for n, g in graded(data.test).items()} == expected
        assert (len(data.train), len(data.test)) == (30, 10)
        assert all("b. Testing Set" in p for p in data.test.paths)
    # the testing set's IDRiD_001 is another photo than the training set's: no leak, 40 patients
    card = dataloader.data_card(data)
    assert card_rows(card)["all"]["patients"] == 40 and "0 photos and 0 patients in more than one split" in card


def test_ddr_valid_is_the_validation_split_and_grade_5_is_left_out(tmp_path, demo_photos):
    expected = make_ddr(tmp_path / "DDR-dataset", demo_photos)
    for root in (tmp_path / "DDR-dataset", tmp_path / "DDR-dataset" / "DR_grading"):
        data = dataloader.load_fundus_data(root)
        assert data.layout == "ddr"
        for split, table in (("train", data.train), ("valid", data.val), ("test", data.test)):
            assert graded(table) == {n: g for n, (g, s) in expected.items() if s == split and g != 5}
        left_out = data.excluded
        assert left_out.groupby("split").size().to_dict() == {"train": 2, "val": 1, "test": 1}
        assert set(left_out["reason"]) == {layouts.UNGRADABLE} and all(Path(p).is_file() for p in left_out["path"])
    said = []
    drawn = dataloader.load_fundus_data(tmp_path / "DDR-dataset", val_fraction=0.25, log=said.append)
    assert len(drawn.train) + len(drawn.val) == 22 and not set(drawn.val.names) & set(data.val.names)
    assert "valid.txt is left out" in said[0]


def test_a_checkpoint_record_finds_the_same_published_splits_again(tmp_path, demo_photos):
    make_ddr(tmp_path / "ddr", demo_photos)
    data = dataloader.load_fundus_data(tmp_path / "ddr")
    record = json.loads(json.dumps(data.record()))  # a checkpoint keeps plain data
    assert record["layout"] == "ddr" and record["excluded"] == {layouts.UNGRADABLE: 4} and record["raw_photos"]
    again = dataloader.load_run_data({"layout": "ddr"}, record)
    assert again.val.digest() == data.val.digest() and again.test.digest() == data.test.digest()
    (tmp_path / "ddr" / "train").mkdir()  # the folder now looks like EyePACS too: the run's layout wins
    (tmp_path / "ddr" / "trainLabels.csv").write_text("image,level\n1_left,0\n")
    assert layouts.detect(tmp_path / "ddr")[0].name == "eyepacs"
    assert dataloader.load_run_data({}, record).layout == "ddr"
    test_txt = tmp_path / "ddr" / "DR_grading" / "test.txt"
    test_txt.write_text(test_txt.read_text().splitlines()[-1] + "\n")  # a test split of one photo
    with pytest.raises(UserError, match="does not hold the data the run trained on: its test split"):
        dataloader.load_run_data({"layout": "ddr"}, record)


def test_the_lab_layout_and_a_labels_table_are_read_as_before(tmp_path, tiny_demo):
    data = dataloader.load_fundus_data(tiny_demo)
    assert data.layout == "demo" and not data.train.raw_photos and data.image_dir == tiny_demo / "images"
    (tmp_path / "images").mkdir()
    lines = ["image,level"]
    for i, name in enumerate(data.train.names[:20]):
        (tmp_path / "images" / f"{name}.jpeg").write_bytes(Path(data.train.paths[i]).read_bytes())
        lines.append(f"{name},{data.train.grades[i]}")
    (tmp_path / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    table = dataloader.load_fundus_data(tmp_path)
    assert table.layout == "labels-table" and table.dataset == tmp_path.name and not table.train.raw_photos


def test_a_labels_table_of_raw_photos_is_cropped_to_the_eye(tmp_path, demo_photos):
    # raw camera frames (not square) listed by a plain labels table: each is loaded as its eye's crop
    photos, grades = demo_photos
    lines = ["image,level"]
    for i in range(12):
        save(photos[i], tmp_path / "images" / f"{i}_left.jpeg")
        lines.append(f"{i}_left,{grades[i]}")
    write_csv(tmp_path / "trainLabels.csv", "\n".join(lines) + "\n")
    data = dataloader.load_fundus_data(tmp_path, test_fraction=0.25, log=lambda *_: None)
    assert data.layout == "labels-table" and data.train.raw_photos
    dataset = dataloader.FundusDataset(data.train, 32)
    path = str(data.train.paths[0])
    image, _ = dataset[0]
    expected, cropped = dataloader.load_eye(path, 32)
    assert cropped and np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(dataloader.load_square(path, 32)))


# --------------------------------------------------------------------------- when nothing matches
def run_train(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--epochs", "1", "--workers", "0", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_folder_in_no_known_layout_names_its_files_and_the_layouts(tmp_path, capsys):
    (tmp_path / "labels.xlsx").write_bytes(b"PK")
    (tmp_path / "photos").mkdir()
    err = run_train(capsys, "--data-root", str(tmp_path))
    assert f"--data-root {tmp_path} holds no dataset" in err and "labels.xlsx, photos/" in err
    for layout in layouts.LAYOUTS:
        assert layout.signature() in err
    assert "DR_grading/train.txt" in err and "trainLabels.csv and train/" in err


def test_a_dataset_unzipped_one_level_deeper_is_named(tmp_path, capsys, demo_photos):
    make_aptos(tmp_path / "aptos2019-blindness-detection", demo_photos)
    err = run_train(capsys, "--data-root", str(tmp_path))
    assert f"pass --data-root {tmp_path / 'aptos2019-blindness-detection'}" in err


def test_photos_elsewhere_name_the_folder_holding_most_and_the_image_dir(tmp_path, capsys, demo_photos):
    make_aptos(tmp_path, demo_photos)
    moved = tmp_path / "resized" / "train_images_512"
    moved.mkdir(parents=True)
    for i, path in enumerate(sorted((tmp_path / "train_images").iterdir())):
        if i:  # one photo is lost on the way
            path.rename(moved / path.name)
    (tmp_path / "train_images").rename(tmp_path / "old")
    err = run_train(capsys, "--data-root", str(tmp_path))
    assert f"{moved} holds 29 of its 30" in err and f"pass --image-dir {moved}" in err
    (tmp_path / "old").rename(tmp_path / "train_images")
    for path in list(moved.iterdir()):  # all of them in one sub-folder: found without a flag
        path.rename(tmp_path / "train_images" / path.name)
    (tmp_path / "train_images").rename(moved.parent / "all")
    assert dataloader.load_fundus_data(tmp_path, layout="aptos").image_dir == moved.parent / "all"


def test_layout_flag_forces_a_layout_and_says_what_it_lacks(tmp_path, capsys, demo_photos):
    make_aptos(tmp_path, demo_photos)
    assert dataloader.load_fundus_data(tmp_path, layout="labels-table").layout == "labels-table"
    err = run_train(capsys, "--data-root", str(tmp_path), "--layout", "ddr")
    assert "--layout ddr" in err and "no train.txt" in err


# --------------------------------------------------------------------------- raw photos to eye crops
def test_raw_photos_are_cropped_to_the_eye_and_crops_keep_the_fast_path(tmp_path, demo_photos):
    photos, _ = demo_photos
    raw = save(photos[1], tmp_path / "raw.png")
    table = dataloader.FundusTable(np.array([str(raw)]), np.array([1]), "t", raw_photos=True)
    seen = dataloader.FundusDataset(table, 64)[0][0].permute(1, 2, 0).numpy()
    assert np.array_equal(seen, np.asarray(fundus.crop_eye(Image.open(raw), 64)))
    plain = dataloader.FundusDataset(dataloader.FundusTable(table.paths, table.grades, "t"), 64)[0][0]
    assert np.array_equal(plain.permute(1, 2, 0).numpy(), np.asarray(dataloader.load_square(str(raw), 64)))
    crop = save(fundus.crop_eye(Image.open(raw), 64), tmp_path / "crop.png")
    table = dataloader.FundusTable(np.array([str(crop)]), np.array([1]), "t", raw_photos=True)
    assert np.array_equal(dataloader.FundusDataset(table, 48)[0][0].permute(1, 2, 0).numpy(),
                          np.asarray(dataloader.load_square(str(crop), 48)))


def test_a_raw_photo_with_no_eye_is_one_sentence(tmp_path):
    black = save(Image.new("RGB", (80, 60)), tmp_path / "black.png")
    table = dataloader.FundusTable(np.array([str(black)]), np.array([0]), "train.csv", raw_photos=True)
    with pytest.raises(UserError, match=r"found no eye in .*black.png \(photo 1 of train.csv\): no eye found"):
        dataloader.FundusDataset(table, 32)[0]


# --------------------------------------------------------------------------- training and external validation
def run_args(root, out, *extra):
    return ["--data-root", str(root), "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--checkpoint-dir", str(out / "checkpoints"), "--log-dir", str(out / "logs"), "--quiet", *extra]


def other_photos(demo):
    """Photos that are not the training photos of ddr_run (mirrored), for its external sets: evaluate.py leaves
    out of an external set the photos the run trained on (tests/test_provenance_outputs.py)."""
    photos, grades = demo
    return [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for photo in photos], grades


@pytest.fixture(scope="module")
def ddr_run(tmp_path_factory, demo_photos):
    """A run trained on DDR as published (its valid split chooses best.pt), and Messidor-2 and EyePACS
    copies to evaluate it on."""
    base = tmp_path_factory.mktemp("external")
    make_ddr(base / "DDR-dataset", demo_photos)
    make_messidor(base / "messidor2", other_photos(demo_photos))
    make_eyepacs(base / "eyepacs", other_photos(demo_photos))
    train.main(run_args(base / "DDR-dataset", base, "--epochs", "1"))
    return base, base / "checkpoints" / "resnet18_scratch" / "best.pt"


@pytest.mark.parametrize("make,layout", [(make_eyepacs, "eyepacs"), (make_aptos, "aptos"),
                                         (make_messidor, "messidor2"), (make_idrid, "idrid")])
def test_each_dataset_trains_as_unzipped(tmp_path, demo_photos, make, layout):
    make(tmp_path / "download", demo_photos)
    train.main(run_args(tmp_path / "download", tmp_path, "--epochs", "1", "--batch-size", "16"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt", weights_only=True)
    assert checkpoint["data"]["layout"] == layout and checkpoint["epoch"] == 1


def test_ddr_trains_as_published_and_chooses_best_pt_on_its_valid_split(ddr_run):
    base, best = ddr_run
    summary = json.loads((base / "logs" / "resnet18_scratch.json").read_text())
    assert summary["best_metric_name"] == "val_acc" and summary["data"]["layout"] == "ddr"
    assert summary["data"]["splits"]["val"]["images"] == 8 - DDR_UNGRADABLE["valid"]
    assert summary["data"]["excluded"] == {layouts.UNGRADABLE: sum(DDR_UNGRADABLE.values())}
    assert summary["config"]["layout"] == "auto" and torch.load(best, weights_only=True)["data"]["raw_photos"]


def test_external_validation_on_every_gradable_image_of_another_dataset(ddr_run, capsys):
    base, best = ddr_run
    evaluate.main([str(best), "--data-root", str(base / "messidor2"), "--split", "all", "--workers", "0",
                   "--quiet", "--figure-dir", str(base / "figures")])
    out = base / "logs" / "resnet18_scratch_on_messidor2_eval.json"
    result = json.loads(out.read_text())
    assert (base / "figures" / "confusion_resnet18_scratch_on_messidor2.png").is_file()
    assert "every gradable image of messidor2: 28 images, left out: 2 not gradable" in capsys.readouterr().out
    written = pd.read_csv(base / "messidor2" / "messidor_data.csv")
    gradable = written[written["adjudicated_gradable"] == 1]
    assert result["evaluated_on"] == "messidor2" and result["split"] == "all" and result["num_images"] == len(gradable)
    assert np.array(result["confusion_matrix"]).sum(1).tolist() == \
        np.bincount(gradable["adjudicated_dr_grade"].astype(int), minlength=5).tolist()
    assert result["excluded"] == {layouts.NOT_GRADABLE: 2}


def test_raw_photos_are_evaluated_as_crops_of_the_eye(ddr_run):
    # the oracle: fundus.crop_eye on each photo, then the model, without the loader
    base, best = ddr_run
    checkpoint = torch.load(best, weights_only=True)
    table = dataloader.load_fundus_data(base / "messidor2").all_images()
    _, probs = evaluate.evaluate_checkpoint(checkpoint, table, torch.device("cpu"), 8, 0, tta=False)
    model, transform, ctx = evaluate.inference_setup(checkpoint, "oracle", torch.device("cpu"))
    crops = torch.stack([torch.from_numpy(np.asarray(fundus.crop_eye(Image.open(p).convert("RGB"), 32)))
                         .permute(2, 0, 1) for p in table.paths])
    expected = evaluate.summaries_over_views(model, transform(crops), ctx, False, objectives.OBJECTIVES["ce"]).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_cam_samples_show_raw_photos_as_the_model_saw_them(ddr_run):
    # a run trained on Ben Graham crops: its contact sheet's raw photos are cropped and normalised too
    base, best = ddr_run
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["data"]["prepare"] = {"ben_graham": True}
    table = dataloader.load_fundus_data(base / "messidor2").all_images()
    samples = evaluate.cam_samples(checkpoint, table, 1, torch.device("cpu"))
    picks = np.concatenate([np.flatnonzero(table.grades == g)[:1] for g in range(5)])
    size = checkpoint["image_size"]
    for path, image in zip(table.paths[picks], samples["images"]):
        crop, cropped = dataloader.load_eye(str(path), size)
        assert cropped and not np.array_equal(image, np.asarray(crop))
        np.testing.assert_array_equal(image, np.asarray(fundus.ben_graham(crop, size / 2)))


def test_split_all_tells_apart_photos_that_share_a_name(ddr_run, tmp_path, demo_photos):
    # IDRiD's testing set numbers its photos from IDRiD_001 again: one row each, each its own patient
    base, best = ddr_run
    expected = make_idrid(tmp_path / "idrid", other_photos(demo_photos))
    evaluate.main([str(best), "--data-root", str(tmp_path / "idrid"), "--split", "all", "--workers", "0", "--quiet",
                   "--figure-dir", str(tmp_path / "figures")])
    predictions = pd.read_csv(base / "logs" / "resnet18_scratch_on_idrid_predictions.csv")
    result = json.loads((base / "logs" / "resnet18_scratch_on_idrid_eval.json").read_text())
    folders = {"train": "a. Training Set", "test": "b. Testing Set"}
    assert sorted(predictions["image"]) == sorted(f"{folders[split]}/{name}" for split, name in expected)
    assert predictions.set_index("image")["grade"].to_dict() == {f"{folders[split]}/{name}": grade
                                                                  for (split, name), grade in expected.items()}
    assert result["bootstrap"]["patients"] == len(expected)


def test_eyepacs_test_split_reports_each_leaderboard(ddr_run):
    base, best = ddr_run
    evaluate.main([str(best), "--data-root", str(base / "eyepacs"), "--split", "test", "--workers", "0", "--quiet",
                   "--figure-dir", str(base / "figures")])
    result = json.loads((base / "logs" / "resnet18_scratch_on_eyepacs_test_eval.json").read_text())  # the split named
    solution = pd.read_csv(base / "eyepacs" / "retinopathy_solution.csv")
    assert result["num_images"] == len(solution) and result["evaluated_on"] == "eyepacs"
    assert {k: v["num_images"] for k, v in result["by_usage"].items()} == solution["Usage"].value_counts().to_dict()
    correct = sum(v["num_images"] * v["accuracy"] for v in result["by_usage"].values())
    assert correct == pytest.approx(result["accuracy"] * len(solution))


def test_plot_shows_an_external_validation_as_its_own_row(ddr_run, tmp_path):
    base, best = ddr_run
    for root, split in ((base / "messidor2", "all"), (base / "eyepacs", "test")):
        evaluate.main([str(best), "--data-root", str(root), "--split", split, "--workers", "0", "--quiet",
                       "--figure-dir", str(base / "figures")])
    plot.main([str(base / "logs"), "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text().splitlines()
    history = pd.read_csv(base / "logs" / "resnet18_scratch.csv")
    best_epoch = json.loads((base / "logs" / "resnet18_scratch.json").read_text())["best_epoch"]
    run_row = next(line for line in summary if line.startswith("| resnet18_scratch |"))
    # the run's own row: its test split's kappa from the log, no evaluation on other data in its place
    assert f"| {history['test_kappa'][best_epoch - 1]:.3f} | - |" in run_row
    for dataset, reported in (("messidor2", "messidor2"), ("eyepacs", "eyepacs_test")):
        result = json.loads((base / "logs" / f"resnet18_scratch_on_{reported}_eval.json").read_text())
        row = next(line for line in summary if line.startswith(f"| resnet18_scratch on {dataset} |"))
        split = "all" if dataset == "messidor2" else "test"
        assert (f"| - | {split} | {100 * result['accuracy']:.2f} | {result['kappa']:.3f} | {result['macro_f1']:.3f} |"
                in row)
        assert (tmp_path / f"confusion_resnet18_scratch_on_{reported}.png").is_file()
    assert any(line.startswith("Rows 'RUN on DATASET'") for line in summary)


# --------------------------------------------------------------------------- the data card
def card_rows(text: str) -> dict:
    """The split rows of the card's table: split -> {column: value}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["images", "patients"])
    header = ["images", "patients", *(f"grade {g}" for g in range(5))]
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        fields = line.split()
        rows[fields[0]] = dict(zip(header, map(int, fields[1:8])))
    return rows


def test_data_card_counts_grades_patients_exclusions_sizes_and_duplicates(tmp_path, capsys, demo_photos):
    expected = make_ddr(tmp_path, demo_photos)
    out = tmp_path / "left_out.csv"
    dataloader.main(["--data-root", str(tmp_path), "--excluded-csv", str(out), "--sample", "100"])
    text = capsys.readouterr().out
    rows = card_rows(text)
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        grades = [g for g, s in expected.values() if s == name and g != 5]
        assert rows[split] == {"images": len(grades), "patients": len(grades),
                               **{f"grade {g}": grades.count(g) for g in range(5)}}
    assert rows["all"]["images"] == sum(g != 5 for g, _ in expected.values())
    assert "left out: 4 ungradable (grade 5) (1 in test, 2 in train, 1 in val)" in text
    sizes = pd.Series([photo.size for photo in demo_photos[0][:N_PHOTOS]])
    graded_sizes = [f"{w}x{h}" for (w, h), (g, _) in zip(sizes, expected.values()) if g != 5]
    for size in set(graded_sizes):
        assert f"{size} ({graded_sizes.count(size)})" in text
    assert "duplicates: 0 photos listed twice in a split, 0 photos and 0 patients in more than one split" in text
    listed = pd.read_csv(out)
    assert len(listed) == 4 and set(listed["reason"]) == {layouts.UNGRADABLE} and listed["path"].map(
        lambda p: Path(p).is_file()).all()


def test_data_card_finds_leaks_and_identical_files(tmp_path, capsys, demo_photos, tiny_demo):
    make_eyepacs(tmp_path, demo_photos)
    solution = tmp_path / "retinopathy_solution.csv"
    solution.write_text(solution.read_text() + "30_left,0,Public\n")  # a new patient, a copy of a training photo
    (tmp_path / "test" / "30_left.jpeg").write_bytes((tmp_path / "train" / "10_left.jpeg").read_bytes())
    dataloader.main(["--data-root", str(tmp_path), "--hash"])
    text = capsys.readouterr().out
    assert "eyepacs: Kaggle EyePACS 2015, layout eyepacs" in text and card_rows(text)["test"]["images"] == 13
    assert "0 photos and 0 patients in more than one split" in text
    assert f"identical files under different names: 1 groups (first: {tmp_path / 'test' / '30_left.jpeg'} = " \
           f"{tmp_path / 'train' / '10_left.jpeg'})" in text
    train_labels = tmp_path / "trainLabels.csv"
    listed = next(line for line in train_labels.read_text().splitlines() if line.startswith("10_left,"))
    train_labels.write_text(train_labels.read_text() + f"29_left,0\n{listed}\n")  # a test patient; a photo twice
    (tmp_path / "train" / "29_left.jpeg").write_bytes((tmp_path / "test" / "29_left.jpeg").read_bytes())
    dataloader.main(["--data-root", str(tmp_path)])
    assert "duplicates: 1 photos listed twice in a split (1 in train), 0 photos and 1 patients in more than " \
           "one split" in capsys.readouterr().out
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "images").symlink_to(tiny_demo / "images")
    for name in ("train_img.csv", "train_label.csv", "test_img.csv", "test_label.csv"):
        text = (tiny_demo / name).read_text()
        (lab / name).write_text(text + text.splitlines()[0] + "\n" if name.startswith("test") else text)
    dataloader.main(["--data-root", str(lab)])  # the test split lists its own first photo twice
    assert "1 photos listed twice in a split (1 in test), 0 photos" in capsys.readouterr().out
    (lab / "test_img.csv").write_text((tiny_demo / "test_img.csv").read_text() + "1_left\n")
    dataloader.main(["--data-root", str(lab)])  # 1_left is a training photo
    assert "0 photos listed twice in a split, 1 photos and 1 patients in more than one split" in capsys.readouterr().out
