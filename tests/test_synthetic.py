"""The demo set: deterministic, in the lab layout, with EyePACS's grade mix and lesions that grow with the grade."""
import re

import numpy as np
import pytest
from PIL import Image

import synthetic

SMALL = dict(n_train=40, n_test=20, size=48, seed=3, quiet=True)


def files(root):
    """Every file under root, by relative path, as bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def column(root, name):
    return (root / name).read_text().splitlines()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return synthetic.generate_demo(tmp_path_factory.mktemp("set") / "demo", workers=2, **SMALL)


# --- determinism --------------------------------------------------------------------------------

def test_same_arguments_give_byte_identical_files(demo, tmp_path):
    again = synthetic.generate_demo(tmp_path / "demo", workers=2, **SMALL)
    assert files(again) == files(demo)


def test_worker_count_does_not_change_the_files(demo, tmp_path):
    alone = synthetic.generate_demo(tmp_path / "demo", workers=1, **SMALL)
    assert files(alone) == files(demo)


def test_another_seed_gives_other_images_and_grade_order(demo, tmp_path):
    other = synthetic.generate_demo(tmp_path / "demo", workers=2, **{**SMALL, "seed": 4})
    ours, theirs = files(demo), files(other)
    assert ours.keys() == theirs.keys()  # names depend on the counts only
    images = [path for path in ours if path.startswith("images/")]
    assert all(ours[path] != theirs[path] for path in images)
    assert ours["train_label.csv"] != theirs["train_label.csv"]


# --- lab layout ----------------------------------------------------------------------------------

def test_four_headerless_csvs_of_matching_lengths(demo):
    for split, n in (("train", SMALL["n_train"]), ("test", SMALL["n_test"])):
        names, grades = column(demo, f"{split}_img.csv"), column(demo, f"{split}_label.csv")
        assert len(names) == len(grades) == n
        # A header row would fail these patterns; pandas' default header=0 would drop the first image.
        assert all(re.fullmatch(r"\d+_(left|right)", name) for name in names)
        assert all(grade in {"0", "1", "2", "3", "4"} for grade in grades)


def test_every_listed_image_is_a_square_rgb_jpeg(demo):
    for split in ("train", "test"):
        for name in column(demo, f"{split}_img.csv"):
            with Image.open(demo / "images" / f"{name}.jpeg") as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SMALL["size"], SMALL["size"]))


def test_names_unique_and_no_patient_in_both_splits(demo):
    train, test = column(demo, "train_img.csv"), column(demo, "test_img.csv")
    assert len(set(train + test)) == len(train) + len(test)
    patients = [{name.split("_")[0] for name in split} for split in (train, test)]
    assert not patients[0] & patients[1]
    eyes = [name for name in train if name.startswith(f"{train[0].split('_')[0]}_")]
    assert sorted(eyes) == [f"{train[0].split('_')[0]}_left", f"{train[0].split('_')[0]}_right"]


# --- grade mix -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [
    (1200, [876, 84, 180, 30, 30]),  # the default train split
    (300, [218, 21, 45, 8, 8]),      # the default test split: round(7.5) is 8
    (40, [29, 3, 6, 1, 1]),
    (20, [14, 1, 3, 1, 1]),          # round(0.5) is 0, raised to one image
    (5, [1, 1, 1, 1, 1]),
])
def test_grade_counts_follow_the_rounding_rule(n, expected):
    assert synthetic.grade_counts(n) == expected


def test_each_split_has_exactly_its_grade_counts_shuffled(demo):
    for split, n in (("train", SMALL["n_train"]), ("test", SMALL["n_test"])):
        grades = [int(g) for g in column(demo, f"{split}_label.csv")]
        assert np.bincount(grades, minlength=5).tolist() == synthetic.grade_counts(n)
        assert grades != sorted(grades)


# --- lesions -----------------------------------------------------------------------------------------

def lesion_pixels(grade, seed, size=64):
    """Pixels where the image of `grade` differs from the lesion-free image of the same retina."""
    draw = lambda g: np.asarray(synthetic.draw_fundus(g, size, np.random.default_rng(seed), eye="left"), np.int16)
    healthy, sick = draw(0), draw(grade)
    changed = np.abs(sick - healthy).max(axis=2) > 12
    brighter = (sick - healthy).sum(axis=2) > 60  # exudates and cotton-wool spots are pale
    return changed.sum(), brighter.sum()


def test_lesion_area_grows_with_grade():
    area = np.array([[lesion_pixels(grade, seed)[0] for grade in range(5)] for seed in range(8)])
    assert (area[:, 0] == 0).all() and (area[:, 1:] > 0).all()
    mean = area.mean(axis=0)
    assert (np.diff(mean) > 0).all(), mean


def test_pale_lesions_start_at_grade_two():
    for seed in range(8):
        assert lesion_pixels(1, seed)[1] == 0
        assert all(lesion_pixels(grade, seed)[1] > 0 for grade in (2, 3, 4))


def test_optic_disc_sits_on_the_side_of_the_eye():
    for seed in range(4):
        for eye, side in (("left", slice(0, 32)), ("right", slice(32, 64))):
            brightness = np.asarray(synthetic.draw_fundus(0, 64, np.random.default_rng(seed), eye=eye)).sum(axis=2)
            row, col = np.unravel_index(brightness.argmax(), brightness.shape)
            assert col in range(64)[side], (eye, col)


# --- demo_is_complete, ensure_demo, refusals -----------------------------------------------------------

def test_ensure_demo_generates_once_and_repairs_a_missing_image(tmp_path):
    root = tmp_path / "demo"
    assert not synthetic.demo_is_complete(root)
    assert synthetic.ensure_demo(root, workers=1, **SMALL) is True
    assert synthetic.demo_is_complete(root)
    before = {path: (root / path).stat().st_mtime_ns for path in files(root)}
    assert synthetic.ensure_demo(root, workers=1, **SMALL) is False
    assert {path: (root / path).stat().st_mtime_ns for path in files(root)} == before
    victim = root / "images" / f"{column(root, 'test_img.csv')[-1]}.jpeg"
    victim.unlink()
    assert not synthetic.demo_is_complete(root)
    assert synthetic.ensure_demo(root, workers=1, **SMALL) is True
    assert victim.is_file() and synthetic.demo_is_complete(root)


def test_a_missing_csv_makes_the_set_incomplete(demo, tmp_path):
    copy = synthetic.generate_demo(tmp_path / "demo", workers=1, **SMALL)
    (copy / "test_label.csv").unlink()
    assert not synthetic.demo_is_complete(copy)


@pytest.mark.parametrize("bad", [dict(n_train=4), dict(n_test=4), dict(size=15), dict(seed=-1)])
def test_refuses_too_small_sets(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        synthetic.generate_demo(tmp_path / "demo", workers=1, **{**SMALL, **bad})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "train_img.csv").write_text("10_left\n")
    with pytest.raises(ValueError, match="not a demo set"):
        synthetic.generate_demo(tmp_path, workers=1, **SMALL)
    assert (tmp_path / "train_img.csv").read_text() == "10_left\n"


def test_an_interrupted_run_leaves_the_old_set_and_no_partial_folder(demo, tmp_path, monkeypatch):
    root = synthetic.generate_demo(tmp_path / "demo", workers=1, **SMALL)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "draw_fundus", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_demo(root, workers=1, **{**SMALL, "seed": 9})
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert files(root) == files(demo)


def test_the_same_set_again_keeps_the_files_in_place_and_another_replaces_them(tmp_path):
    root = synthetic.generate_demo(tmp_path / "demo", workers=1, **SMALL)
    image = root / "images" / f"{column(root, 'train_img.csv')[0]}.jpeg"
    inode = image.stat().st_ino
    synthetic.generate_demo(root, workers=1, **SMALL)  # e.g. two torchrun ranks, one after the other
    assert image.stat().st_ino == inode
    synthetic.generate_demo(root, workers=1, **{**SMALL, "seed": 4})
    assert image.stat().st_ino != inode
    assert "seed=4" in (root / synthetic.MARKER).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_command_line_reports_what_it_wrote(tmp_path, capsys):
    synthetic.main(["--root", str(tmp_path / "demo"), "--train", "10", "--test", "5", "--size", "32",
                    "--workers", "1"])
    line = capsys.readouterr().out.strip()
    assert "15 images" in line and str(tmp_path / "demo") in line
    assert "6 / 2 / 3 / 2 / 2" in line  # train 5/1/2/1/1 plus test 1/1/1/1/1
    assert synthetic.demo_is_complete(tmp_path / "demo")


def test_command_line_rejects_a_tiny_set_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--root", str(tmp_path / "demo"), "--train", "3"])
    assert exit_info.value.code == 2
    assert "--train must be an integer >= 5, got 3" in capsys.readouterr().err


def test_a_patients_two_eyes_mostly_share_their_grade_and_the_mix_is_kept():
    # the two-eye stage needs something real to find: as in EyePACS (48 of 55 patients of the shared sample),
    # both eyes share one grade in most patients, and differ by one grade in the rest
    rows = synthetic.plan_split(0, 1200, 1, 0)
    grades = np.array([g for _, g in rows])
    assert np.bincount(grades, minlength=5).tolist() == synthetic.grade_counts(1200)
    assert all(name.startswith(f"{1 + i // 2}_") for i, (name, _) in enumerate(rows))
    pairs = grades.reshape(-1, 2)
    discordant = pairs[:, 0] != pairs[:, 1]
    assert discordant.mean() == pytest.approx(synthetic.DISCORDANT, abs=0.01)
    assert np.abs(pairs[:, 0] - pairs[:, 1]).max() == 1
    assert len({(a, b) for a, b in pairs[discordant].tolist()}) > 2  # either eye the worse, several grades
