"""Issue 31, families 2 and 3: one sentence at exit and only true advice in it; bad input named for what it
is. Each test breaks when the code it guards is broken (the report of the branch names the break tried)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from advice_kit import foreign_flags, raised_sentences, script_flags
from PIL import Image

import dataloader
import evaluate
import export
import layouts
import plot
import train
from data import prepare

ROOT = Path(__file__).resolve().parents[1]
# train.py as `python train.py` runs it, with one hook first in the interpreter's exit: how many worker
# processes are still alive there. Left alive, multiprocessing's own exit hook SIGTERMs them and torch's
# SIGCHLD handler may print a RuntimeError under the sentence (1 run in 4 here): the count says it every time.
RUN_TRAIN = """
import atexit, multiprocessing.util, runpy, sys
count = sys.argv.pop(1)
atexit.register(lambda: open(count, "w").write(str(len(multiprocessing.active_children()))))
sys.argv[0] = "train.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_truncated_jpeg_in_training_with_default_workers_is_one_sentence(tiny_demo, tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_demo, demo)
    first = demo / "images" / f"{(demo / 'train_img.csv').read_text().split()[0]}.jpeg"
    first.write_bytes(first.read_bytes()[:int(first.stat().st_size * 0.6)])  # the header reads, the scan is cut
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    alive = tmp_path / "alive"  # the noise came in some runs only; the count of live workers says it in each
    result = subprocess.run(
        [sys.executable, "-c", RUN_TRAIN, str(alive), "--data-root", str(demo), "--epochs", "1", "--batch-size",
         "8", "--quiet", "--checkpoint-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"train.py: error: cannot decode {first} (line 1 of "), result.stderr
    assert alive.read_text() == "0", "loader workers were left for the interpreter's exit to kill"


# --------------------------------------------------------------------------- in-process cases
def one_sentence(capsys, script, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not foreign_flags(script, err), f"names a flag {script.__module__} does not have: {err}"
    return err


def truncate(path: Path, share: float = 0.6) -> Path:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * share)])
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_demo):
    """A one-epoch run on a copy of the tiny demo set, and photos and files people pass by mistake."""
    ws = tmp_path_factory.mktemp("sentences")
    shutil.copytree(tiny_demo, ws / "data")
    train.main(["--data-root", str(ws / "data"), "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "1",
                "--checkpoint-dir", str(ws / "checkpoints"), "--log-dir", str(ws / "logs")])
    return {"ws": ws, "ckpt": ws / "checkpoints" / "resnet18_scratch" / "last.pt"}


@pytest.fixture
def broken_photo(run):
    """The run's first test photo cut short, put back whole after the test."""
    name = (run["ws"] / "data" / "test_img.csv").read_text().split()[0]
    photo = run["ws"] / "data" / "images" / f"{name}.jpeg"
    whole = photo.read_bytes()
    truncate(photo)
    yield photo
    photo.write_bytes(whole)


# --------------------------------------------------------------------------- only true advice
def test_a_bad_photo_in_evaluate_and_export_advises_only_their_own_flags(run, broken_photo, capsys, tmp_path):
    for script, argv in ((evaluate.main, [str(run["ckpt"]), "--split", "all", "--workers", "0", "--quiet",
                                          "--out", str(tmp_path / "m.json"), "--figure-dir", str(tmp_path)]),
                         (export.main, [str(run["ckpt"]), "--out", str(tmp_path / "m.onnx")])):
        err = one_sentence(capsys, script, argv)
        assert f"cannot decode {broken_photo}" in err and "fix the file or put a good copy in its place" in err


def test_the_flag_check_knows_each_scripts_own_flags():
    # the oracle of the check: each script's --help; a flag after another script's name is that script's
    assert foreign_flags(evaluate.main, "x; fix or remove it, or pass --skip-bad-images") == ["--skip-bad-images"]
    assert foreign_flags(train.main, "x; fix or remove it, or pass --skip-bad-images") == []
    assert foreign_flags(evaluate.main, "run train.py --skip-bad-images first; or pass --tta") == []


def test_an_unreadable_first_photo_of_the_demo_is_named_not_a_traceback(tiny_demo, tmp_path, capsys):
    # train.py reads the demo set's image size from its first photo's header; a header cut short was a traceback
    demo = tmp_path / "demo"
    shutil.copytree(tiny_demo, demo)
    first = demo / "images" / f"{(demo / 'train_img.csv').read_text().split()[0]}.jpeg"
    truncate(first, 0.1)
    err = one_sentence(capsys, train.main, ["--data-root", str(demo), "--workers", "0", "--quiet", "--epochs", "1",
                                            "--checkpoint-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "l")])
    assert f"cannot decode {first} (line 1 of {demo / 'train_img.csv'})" in err, err


# --------------------------------------------------------------------------- warnings in one line
def test_a_photo_over_pils_pixel_limit_is_named_once_in_one_line(run, tmp_path, capsys, monkeypatch):
    # PIL's limit lowered so that 48 px photos pass it (1,000 pixels: warned over it, refused over 2,000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40), (150, 60, 20)).save(tmp_path / name)
    evaluate.main([str(run["ckpt"]), "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--workers", "0",
                   "--quiet"])
    err = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()]  # past the script's name
    assert err == [f"warning: {tmp_path / name} holds 1,600 pixels, over PIL's limit against decompression bombs "
                   "(1,000); it is read anyway (one over 2,000 is refused as unreadable)"
                   for name in ("a.png", "b.png")], err


def test_a_raw_pickle_is_refused_in_one_line_without_torchs_protocol_warning(run, tmp_path, capsys):
    path = tmp_path / "raw.pkl"
    path.write_bytes(__import__("pickle").dumps({"model": {}}, protocol=5))  # torch warns of protocol 5
    for script, argv in ((train.main, ["--resume", str(path)]), (evaluate.main, [str(path)])):
        err = one_sentence(capsys, script, argv)
        assert "a Python pickle that torch.save did not write" in err and "Detected pickle protocol" not in err, err


# --------------------------------------------------------------------------- named for what it is
@pytest.fixture
def odd_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    with __import__("zipfile").ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a.txt", "a zip archive, not torch.save's")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    return tmp_path


@pytest.mark.parametrize("name,expected", [
    ("fifo", "is not a regular file but a FIFO (named pipe)"),
    ("/dev/zero", "is not a regular file but a character device"),
    ("random.pt", ("is no checkpoint at all: its bytes are neither a zip archive (what torch.save writes) nor a "
                   "pickle")),
    ("photos.zip", "is a zip archive, not a PyTorch file"),
    ("arrays.npz", "is a NumPy archive (.npz), not a PyTorch file"),
])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(run, odd_files, capsys, name, expected):
    path = odd_files / name
    for script, argv in ((train.main, ["--resume", str(path)]), (evaluate.main, [str(path)]),
                         (train.main, ["--weights", str(path), "--checkpoint-dir", str(odd_files / "c")])):
        err = one_sentence(capsys, script, argv)
        assert expected in err and "may hold code" not in err, err


def test_a_fifo_or_device_named_as_input_or_output_is_not_a_regular_file(run, odd_files, capsys):
    # reading a FIFO waits for a writer forever (--out on one hung), /dev/zero never ends; neither is "missing"
    photo = odd_files / "a.png"
    Image.new("RGB", (40, 40), (150, 60, 20)).save(photo)
    fifo = odd_files / "fifo"
    cases = [(evaluate.main, [str(run["ckpt"]), "--images", str(fifo)], f"--images {fifo} is not a regular file"),
             (evaluate.main, [str(run["ckpt"]), "--images", "/dev/null"], ("--images /dev/null is not a regular "
                                                                           "file but a character device")),
             (evaluate.main, [str(run["ckpt"]), "--images", str(photo), "--out", str(fifo)],
              f"--out {fifo} is not a regular file but a FIFO"),
             (evaluate.main, [str(run["ckpt"]), "--out", "/dev/null", "--workers", "0"],
              "--out /dev/null is not a regular file but a character device"),
             (prepare.main, [str(odd_files), str(odd_files / "out"), "--labels", str(fifo)],
              f"--labels {fifo} is not a regular file")]
    for script, argv, expected in cases:
        assert expected in one_sentence(capsys, script, argv)


def test_nothing_read_is_a_failure_with_one_rule_in_evaluate_and_prepare(run, tmp_path, capsys):
    # one rule (runtime.nothing_read): photos none of which reads are the input's fault, exit 2, one sentence;
    # the per-file lists are still written, every reason kept
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.jpeg", "b.png"):
        (raw / name).write_bytes(np.random.default_rng(len(name)).bytes(3000))
    out = tmp_path / "grades.csv"
    err = one_sentence(capsys, evaluate.main, [str(run["ckpt"]), "--images", str(raw), "--out", str(out),
                                               "--workers", "0", "--quiet"])
    assert f"none of the 2 files of --images could be read as an image (first: {raw / 'a.jpeg'}: not a readable " \
           "image" in err, err
    assert pd.read_csv(out)["status"].tolist() == ["unreadable", "unreadable"]
    err = one_sentence(capsys, prepare.main, [str(raw), str(tmp_path / "prepared"), "--workers", "1"])
    assert f"none of the 2 files of SRC_DIR {raw} could be read as an image (first: a.jpeg: unreadable" in err, err
    assert len((tmp_path / "prepared" / "prepare_failures.txt").read_text().splitlines()) == 2


def test_a_photo_listed_twice_with_one_grade_is_used_once_and_said(tiny_demo, tmp_path, capsys):
    lab = tmp_path / "lab"
    shutil.copytree(tiny_demo, lab)
    (lab / "SYNTHETIC_DEMO.txt").unlink(missing_ok=True)
    names, grades = ((lab / f"train_{kind}.csv").read_text().split() for kind in ("img", "label"))
    (lab / "train_img.csv").write_text("\n".join(names + names[:3]) + "\n")  # a table joined from two copies
    (lab / "train_label.csv").write_text("\n".join(grades + grades[:3]) + "\n")
    data = dataloader.load_fundus_data(lab)
    assert len(data.train) == len(names) and sorted(data.train.names) == sorted(names)
    assert data.excluded_counts() == {layouts.LISTED_AGAIN: 3}
    dataloader.main(["--data-root", str(lab)])
    card = capsys.readouterr().out
    assert f"left out: 3 {layouts.LISTED_AGAIN} (3 in train)" in card
    assert "duplicates: 3 photos listed twice in a split (3 in train)" in card


def test_the_data_cards_hash_streams_and_reads_only_regular_files(tiny_demo, tmp_path, capsys):
    lab = tmp_path / "lab"
    shutil.copytree(tiny_demo, lab)
    name = (lab / "train_img.csv").read_text().split()[0]
    (lab / "images" / f"{name}.jpeg").unlink()
    (lab / "images" / f"{name}.jpeg").symlink_to("/dev/zero")  # read whole, a MemoryError traceback
    dataloader.main(["--data-root", str(lab), "--hash"])
    card = capsys.readouterr().out
    assert "identical files under different names: 0 groups; not read: 1 listed photos that are no regular file " \
           f"(first: {lab / 'images' / name}.jpeg, a character device)" in card, card


# --------------------------------------------------------------------------- every sentence, read from the source
SCRIPTS = {"train.py": train.main, "evaluate.py": evaluate.main, "export.py": export.main,
           "data/prepare.py": prepare.main, "plot.py": plot.main}
ALL_SCRIPTS = {**SCRIPTS, "dataloader.py": dataloader.main}  # the data card is also the loader train.py uses
SHARED = ("dataloader.py", "layouts.py", "runtime.py", "fundus.py", "twoeye.py", "objectives.py", "metrics.py")


def test_every_sentence_a_script_raises_names_only_its_own_flags():
    # the test above checks the sentences the bad inputs raise; this one every literal sentence in the source:
    # a script's own sentences name only its flags, a shared module's only flags some script has, and the
    # advice on a photo that does not decode (dataloader) only train.py's
    wrong = []
    for name, main in SCRIPTS.items():
        wrong += [f"{name}:{line}: {flags}" for line, text in raised_sentences(ROOT / name)
                  if (flags := foreign_flags(main, text))]
    every = frozenset().union(*(script_flags(main) for main in ALL_SCRIPTS.values()))
    for name in SHARED:
        for line, text in raised_sentences(ROOT / name):
            wrong += [f"{name}:{line}: {flag}" for flag in foreign_flags(train.main, text) if flag not in every]
    assert not wrong, wrong
    assert not foreign_flags(evaluate.main, dataloader.FIX_THE_FILE) and not foreign_flags(export.main,
                                                                                          dataloader.FIX_THE_FILE)
    assert not foreign_flags(train.main, dataloader.TRAINING_ADVICE)
    assert raised_sentences(ROOT / "dataloader.py"), "the scan found no sentence: it reads nothing"
