"""Bad input, one table: every case exits 2 with one line that names the flag, file or row, prints no
traceback, and leaves every checkpoint and log already there byte for byte as it was."""
import json
import shutil
import os

import pytest
import torch
from PIL import Image

import evaluate
import plot
import synthetic
import train
from advice_kit import foreign_flags
from data import prepare


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace as a user has it after a first run: a trained checkpoint, its logs and an evaluation,
    plus the wrong files people pass by mistake."""
    ws = tmp_path_factory.mktemp("ws")
    demo = synthetic.generate_demo(ws / "demo", n_train=24, n_test=8, size=32, seed=0, quiet=True)
    common = ["--data-root", str(demo), "--batch-size", "8", "--workers", "0", "--quiet",
              "--checkpoint-dir", str(ws / "checkpoints"), "--log-dir", str(ws / "logs")]
    train.main([*common, "--epochs", "1"])
    ckpt = ws / "checkpoints" / "resnet18_scratch" / "last.pt"
    evaluate.main([str(ckpt), "--workers", "0", "--quiet", "--figure-dir", str(ws / "figures")])
    (ws / "notes.txt").write_text("a checkpoint? no: notes\n")
    (ws / "table.csv").write_text("image,level\n1_left,0\n")
    (ws / "header.csv").write_text("image,level\n")
    (ws / "nomatch.csv").write_text("image,level\n999_left,2\n")
    (ws / "run.json").write_text(json.dumps({"epoch": 1}))
    (ws / "empty.pt").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(ws / "photo.png")
    (ws / "a_folder").mkdir()
    (ws / "empty_folder").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ws / "foreign.pt")
    mislabelled = torch.load(ckpt, weights_only=True)
    mislabelled["arch"] = mislabelled["config"]["model"] = "resnet34"
    torch.save(mislabelled, ws / "mislabelled.pt")
    (ws / "raw").mkdir()
    Image.new("RGB", (60, 40), (150, 60, 20)).save(ws / "raw" / "10_left.jpeg")
    (ws / "photos").mkdir()  # a folder of the user's photos, one named as evaluate.py names a figure
    Image.new("RGB", (8, 8), (200, 40, 40)).save(ws / "photos" / "confusion_resnet18_scratch.png")
    (ws / "labdir").mkdir()  # a dataset of the user's own in the lab layout, and a table named as prepare.py's
    (ws / "labdir" / "train_img.csv").write_text("1_left\n")
    (ws / "listdir").mkdir()
    (ws / "listdir" / "ungradable.csv").write_text("image,note\n1_left,blurred\n")
    leak = ws / "leak"  # the user's own copy of the data, one training photo listed in the test table too
    shutil.copytree(demo, leak)
    (leak / "SYNTHETIC_DEMO.txt").unlink(missing_ok=True)
    for kind in ("img", "label"):
        train_lines = (leak / f"train_{kind}.csv").read_text().splitlines()
        test_lines = (leak / f"test_{kind}.csv").read_text().splitlines()
        (leak / f"test_{kind}.csv").write_text("\n".join([train_lines[0], *test_lines[1:]]) + "\n")
    (ws / "bad_logs").mkdir()
    (ws / "bad_logs" / "r.json").write_text('{"arch": "resnet18", oops')
    return {"ws": ws, "ckpt": ckpt, "common": common}


T, E, P, R = train.main, evaluate.main, plot.main, prepare.main
# (script, arguments with {ws} and {ckpt} filled in, what the one line must say). {T} is train.py's common
# arguments: the workspace's data, checkpoint and log folders.
CASES = [
    (T, "{T} --model resnet19", "argument --model: invalid choice: 'resnet19'"),
    (T, "{T} --epochs 0", "--epochs must be at least 1"),
    (T, "{T} --batch-size 0", "--batch-size must be at least 1"),
    (T, "{T} --lr 0", "--lr must be positive"),
    (T, "{T} --lr nan", "--lr must be a finite number, not nan"),
    (T, "{T} --warmup-epochs inf", "--warmup-epochs must be a finite number, not inf"),
    (T, "{T} --momentum -1", "--momentum must not be negative"),
    (T, "{T} --nesterov --optimizer adamw", "--nesterov is a kind of SGD momentum; it cannot go with --optimizer adamw"),
    (T, "{T} --nesterov --momentum 0", "--nesterov needs a momentum: --momentum 0 leaves none"),
    (T, "{T} --label-smoothing 1.5", "--label-smoothing must lie in [0, 1)"),
    (T, "{T} --val-fraction 1", "--val-fraction must lie in [0, 1)"),
    (T, "{T} --test-fraction 0", "--test-fraction 0 would hold out no patient, leaving no test split"),
    (T, "{T} --image-size 16", "--image-size must be at least 32"),
    (T, "{T} --workers -1", "--workers must not be negative"),
    (T, "{T} --grad-accum-steps 0", "--grad-accum-steps must be at least 1"),
    (T, "{T} --run-name a/b", "--run-name 'a/b' must be a plain file name"),
    (T, "{T} --run-name ..", "--run-name '..' must be a plain file name"),
    (T, "{T} --run-name=", "--run-name '' must be a plain file name"),
    (T, "{T} --epochs 1", "already holds a checkpoint of run resnet18_scratch"),
    (T, "--resume {ws}/nowhere.pt", "--resume {ws}/nowhere.pt does not exist"),
    (T, "--resume {ws}/a_folder", "--resume {ws}/a_folder is a folder, expected a file"),
    (T, "--resume {ws}/notes.txt", "--resume {ws}/notes.txt is a text file, not a PyTorch file"),
    (T, "--resume {ws}/table.csv", "--resume {ws}/table.csv is a CSV file, not a PyTorch file"),
    (T, "--resume {ws}/run.json", "--resume {ws}/run.json is a JSON file, not a PyTorch file"),
    (T, "--resume {ws}/photo.png", "--resume {ws}/photo.png is a PNG image, not a PyTorch file"),
    (T, "--resume {ws}/empty.pt", "--resume {ws}/empty.pt is an empty file, not a PyTorch file"),
    (T, "--resume {ws}/foreign.pt", "--resume {ws}/foreign.pt is not a checkpoint of this project"),
    (T, "--resume {ckpt} --lr 0.5", "--lr differs from the checkpoint's (0.001)"),
    (T, "--resume {ws}/mislabelled.pt --epochs 2", "says arch resnet34 but its weights do not fit resnet34"),
    (T, "{T} --overwrite --resume {ckpt}", "--overwrite starts a run afresh; it cannot go with --resume"),
    (T, "{T} --run-name x --checkpoint-dir {ws}/notes.txt", "--checkpoint-dir {ws}/notes.txt is a file, expected a folder"),
    (T, "{T} --run-name x --log-dir {ws}/notes.txt/logs", "--log-dir {ws}/notes.txt/logs cannot be created: {ws}/notes.txt is a file"),
    (T, "{T} --run-name x --data-root {ws}/nowhere", "--data-root {ws}/nowhere does not exist"),
    (T, "{T} --run-name x --data-root {ws}/notes.txt", "--data-root {ws}/notes.txt is a file, expected a folder"),
    (T, "{T} --run-name x --data-root {ws}/empty_folder", "--data-root {ws}/empty_folder holds no dataset"),
    (T, "{T} --run-name x --image-dir {ws}/nowhere", "--image-dir {ws}/nowhere does not exist"),
    (T, "{T} --run-name x --data-root {ws}/leak", "{ws}/leak/images/1_left.jpeg is listed in both the train split "
                                                   "({ws}/leak/train_img.csv) and the test split"),
    (T, "{T} --run-name x --weights {ws}/notes.txt", "--weights {ws}/notes.txt is a text file, not a PyTorch file"),
    (T, "{T} --run-name x --weights {ws}/nowhere.pth", "--weights {ws}/nowhere.pth does not exist"),
    (E, "{ws}/nowhere.pt", "checkpoint {ws}/nowhere.pt does not exist"),
    (E, "{ws}/a_folder", "checkpoint {ws}/a_folder is a folder, expected a file"),
    (E, "{ws}/notes.txt", "checkpoint {ws}/notes.txt is a text file, not a PyTorch file"),
    (E, "{ws}/photo.png", "checkpoint {ws}/photo.png is a PNG image, not a PyTorch file"),
    (E, "{ws}/run.json", "checkpoint {ws}/run.json is a JSON file, not a PyTorch file"),
    (E, "{ws}/foreign.pt", "checkpoint {ws}/foreign.pt is not a checkpoint of this project"),
    (E, "{ckpt} --batch-size 0", "--batch-size must be at least 1"),
    (E, "{ckpt} --workers -1", "--workers must not be negative"),
    (E, "{ckpt} --cam-per-grade -2", "--cam-per-grade must not be negative"),
    (E, "{ckpt} --cam {ws}/cams", "--cam needs --images"),
    (E, "{ckpt} --out {ws}/a_folder", "--out {ws}/a_folder is a folder, expected a file path"),
    (E, "{ckpt} --figure-dir {ws}/notes.txt", "--figure-dir {ws}/notes.txt is a file, expected a folder"),
    (E, "{ckpt} --images {ws}/raw --cam {ws}/notes.txt", "--cam {ws}/notes.txt is a file, expected a folder"),
    (E, "{ckpt} --images {ws}/nowhere.jpeg", "--images {ws}/nowhere.jpeg: no such file"),
    # outputs never replace what the user has: an input of the same call, or a file of another kind
    (E, "{ckpt} --out {ckpt}", "--out {ckpt} is a file this command reads (a checkpoint)"),
    (E, "{ckpt} --predictions {ckpt}", "--predictions {ckpt} is a file this command reads (a checkpoint)"),
    (E, "{ckpt} --out {ws}/logs/resnet18_scratch.csv", "--out {ws}/logs/resnet18_scratch.csv already exists and "
                                                        "is a run's per-epoch log of train.py, not a metrics JSON"),
    (E, "{ckpt} --out {ws}/logs/resnet18_scratch.json", "is a run's summary of train.py, not a metrics JSON"),
    (E, "{ckpt} --predictions {ws}/logs/resnet18_scratch_eval.json", "is a metrics JSON of evaluate.py, not a "
                                                                     "predictions table"),
    (E, "{ckpt} --predictions {ws}/table.csv", "--predictions {ws}/table.csv already exists and is a CSV file"),
    (E, "{ckpt} --out {ws}/photo.png", "--out {ws}/photo.png already exists and is a PNG image"),
    (E, "{ckpt} --figure-dir {ws}/photos", "{ws}/photos/confusion_resnet18_scratch.png already exists and is a PNG "
                                           "image, not a figure drawn by matplotlib"),
    (E, "{ckpt} --images {ws}/raw --out {ws}/raw/10_left.jpeg", "--out {ws}/raw/10_left.jpeg is a file this command "
                                                                "reads (a JPEG image)"),
    (E, "{ckpt} --images {ws}/raw --out {ws}/photo.png", "--out {ws}/photo.png already exists and is a PNG image, "
                                                         "not a table of grades"),
    (E, "{ckpt} --images {ws}/raw --out {ws}/logs/resnet18_scratch_predictions.csv", "is a predictions table of "
                                                                                     "evaluate.py, not a table of grades"),
    (P, "{ws}/logs --out {ws}/photos", "{ws}/photos/confusion_resnet18_scratch.png already exists and is a PNG image"),
    (T, "{T} --run-name table --log-dir {ws}", "{ws}/table.csv is a CSV file, not a run's per-epoch log of train.py"),
    (E, "{ckpt} --split val", "--split val: the run held out no validation part"),
    (E, "{ckpt} --data-root {ws}/nowhere", "--data-root {ws}/nowhere does not exist"),
    (E, "{ws}/mislabelled.pt", "says arch resnet34 but its weights do not fit resnet34"),
    (P, "{ws}/nowhere", "log folder {ws}/nowhere does not exist"),
    (P, "{ws}/notes.txt", "LOGDIR {ws}/notes.txt is a file, expected a folder"),
    (P, "{ws}/logs --out {ws}/notes.txt", "--out {ws}/notes.txt is a file, expected a folder"),
    (P, "{ws}/bad_logs", "{ws}/bad_logs/r.json is not valid JSON"),
    (P, "{ws}/empty_folder", "{ws}/empty_folder holds no run logs"),
    (R, "{ws}/nowhere {ws}/out", "SRC_DIR {ws}/nowhere does not exist"),
    (R, "{ws}/notes.txt {ws}/out", "SRC_DIR {ws}/notes.txt is a file, expected a folder"),
    (R, "{ws}/empty_folder {ws}/out", "SRC_DIR {ws}/empty_folder holds no"),
    (R, "{ws}/raw {ws}/out --size 8", "--size 8 is too small"),
    (R, "{ws}/raw {ws}/out --quality 0", "--quality 0 must lie between 1 and 100"),
    (R, "{ws}/raw {ws}/out --workers 0", "--workers 0 must be at least 1"),
    (R, "{ws}/raw {ws}/out --labels {ws}/nowhere.csv", "--labels {ws}/nowhere.csv does not exist"),
    (R, "{ws}/raw {ws}/out --labels {ws}/a_folder", "--labels {ws}/a_folder is a folder, expected a file"),
    (R, "{ws}/raw {ws}/out --labels {ws}/header.csv", "{ws}/header.csv has a header but no rows"),
    (R, "{ws}/raw {ws}/out --labels {ws}/nomatch.csv", "--labels {ws}/nomatch.csv"),
    (R, "{ws}/raw {ws}/out --labels {ws}/notes.txt", "{ws}/notes.txt has columns"),
    # issue 22: sentences that were tracebacks or wrong
    (T, "{T} --run-name x --batch-size 1", "--batch-size 1 cannot train: BatchNorm"),
    (T, "{T} --run-name x --val-fraction 0.99", "--val-fraction 0.99 of the 12 patients"),
    (T, "{T} --run-name x --test-fraction 1.5", "--test-fraction 1.5 must lie between 0 and 1"),
    (E, "{ckpt} --images {ws}/empty_folder", "--images {ws}/empty_folder: no files there"),
    (R, "{ws}/raw {ws}/raw", "DST_DIR {ws}/raw is SRC_DIR"),
    (R, "{ws}/raw {ws}/labdir --labels {ws}/table.csv", "DST_DIR {ws}/labdir/train_img.csv already exists and is a "
                                                        "text file, not a lab-layout table of data/prepare.py"),
    (R, "{ws}/raw {ws}/listdir", "DST_DIR {ws}/listdir/ungradable.csv already exists and is a CSV file, not a list "
                                "of ungradable photos"),
    (R, "{ws}/raw {ws}/notes.txt", "DST_DIR {ws}/notes.txt is a file, expected a folder"),
    (R, "{ws}/raw {ws}/notes.txt/out", "DST_DIR {ws}/notes.txt/out cannot be created: {ws}/notes.txt is a file"),
    (R, "{ws}/raw {ws}/out --labels {ws}/table.csv --test-fraction 0", "--test-fraction 0 would hold out no patient"),
]


def test_the_corpus_is_large_and_covers_every_script():
    assert len(CASES) >= 40
    assert {script for script, _, _ in CASES} == {T, E, P, R}


def snapshot(ws):
    """Every file and folder of the workspace (checkpoints, logs, photos and tables alike), and what lies in
    the working directory, where the default output folders (figures/, logs/) would appear."""
    return ({p: p.read_bytes() if p.is_file() else None for p in sorted(ws.rglob("*"))},
            sorted(os.listdir(os.getcwd())))


@pytest.mark.parametrize("script,arguments,expected", CASES, ids=[f"{s.__module__}:{a}" for s, a, _ in CASES])
def test_bad_input_is_one_sentence_exit_2_and_nothing_lost(ws, capsys, script, arguments, expected):
    fill = {"ws": ws["ws"], "ckpt": ws["ckpt"], "T": " ".join(ws["common"])}
    argv = arguments.format(**fill).split(" ")
    before = snapshot(ws["ws"])
    with pytest.raises(SystemExit) as exit_info:
        script(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected.format(**fill) in err, err
    assert not foreign_flags(script, err), f"names flags {script.__module__} does not have: {err}"
    assert snapshot(ws["ws"]) == before
    assert not (ws["ws"] / "out").exists()  # prepare.py made no DST_DIR


def test_the_data_cards_list_never_replaces_a_table(ws, capsys):
    import dataloader

    table = ws["ws"] / "table.csv"
    before = table.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        dataloader.main(["--data-root", str(ws["ws"] / "demo"), "--excluded-csv", str(table)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"--excluded-csv {table} already exists and is a CSV file, not a list of left-out photos" in err
    assert table.read_bytes() == before
