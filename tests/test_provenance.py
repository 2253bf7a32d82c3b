"""Every number tied to its model and split (issue 22, family 2): an evaluation records the weights and the
data it measured, plot.py joins only an evaluation of the run's best.pt to the run's row, --overwrite takes
the old run's evaluations with it, two splits never share a file, and "external" means other data."""
import json
import shutil

import pytest
import torch

import evaluate
import plot
import synthetic
import train
from runtime import weights_digest


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("provenance")
    demo = synthetic.generate_demo(ws / "demo", n_train=48, n_test=16, size=32, seed=0, quiet=True)
    other = synthetic.generate_demo(ws / "other" / "clinic", n_train=24, n_test=8, size=32, seed=7, quiet=True)
    return {"ws": ws, "demo": demo, "other": other}


def run_args(ws, name, *extra):
    return ["--data-root", str(ws["demo"]), "--batch-size", "8", "--workers", "0", "--quiet", "--epochs", "1",
            "--run-name", name, "--checkpoint-dir", str(ws["ws"] / "checkpoints"), "--log-dir",
            str(ws["ws"] / "logs"), *extra]


def evaluate_args(ws, ckpt, *extra):
    return [str(ckpt), "--workers", "0", "--quiet", "--figure-dir", str(ws["ws"] / "figures"), *extra]


def read(path):
    return json.loads(path.read_text())


def test_an_evaluation_records_the_weights_and_data_it_measured(ws):
    train.main(run_args(ws, "r0"))
    best = ws["ws"] / "checkpoints" / "r0" / "best.pt"
    evaluate.main(evaluate_args(ws, best, "--cam-per-grade", "1"))
    result = read(ws["ws"] / "logs" / "r0_eval.json")
    checkpoint = torch.load(best, weights_only=True)
    assert result["weights_digest"] == weights_digest(checkpoint["model"]) == checkpoint["best_weights_digest"]
    assert read(ws["ws"] / "logs" / "r0.json")["best_weights_digest"] == result["weights_digest"]
    assert result["epoch"] == checkpoint["epoch"] and result["split"] == "test"
    assert result["data_digest"] == checkpoint["data"]["splits"]["test"]["digest"]


def test_overwrite_removes_the_old_runs_evaluations_and_cams_and_nothing_else(ws):
    logs = ws["ws"] / "logs"
    train.main(run_args(ws, "r1"))
    train.main(run_args(ws, "r1_b"))  # a run whose name starts with the other's: its files must stay
    for name in ("r1", "r1_b"):
        evaluate.main(evaluate_args(ws, ws["ws"] / "checkpoints" / name / "best.pt", "--cam-per-grade", "1"))
        evaluate.main(evaluate_args(ws, ws["ws"] / "checkpoints" / name / "best.pt", "--split", "train"))
    old = {p.name for p in logs.iterdir() if p.name.startswith("r1_") and not p.name.startswith("r1_b")}
    assert {"r1_eval.json", "r1_cams.npz", "r1_predictions.csv", "r1_train_eval.json"} <= old
    kept = {p: p.read_bytes() for p in logs.iterdir() if p.name.startswith("r1_b")}
    train.main(run_args(ws, "r1", "--overwrite", "--seed", "1"))
    assert not [name for name in old if (logs / name).exists()]
    assert {p: p.read_bytes() for p in logs.iterdir() if p.name.startswith("r1_b")} == kept


def test_plot_leaves_out_an_evaluation_of_another_checkpoint(ws, tmp_path, capsys):
    logs = ws["ws"] / "logs"
    train.main(run_args(ws, "r2"))
    evaluate.main(evaluate_args(ws, ws["ws"] / "checkpoints" / "r2" / "best.pt", "--cam-per-grade", "1"))
    stale = {name: (logs / name).read_bytes() for name in ("r2_eval.json", "r2_cams.npz")}
    train.main(run_args(ws, "r2", "--overwrite", "--seed", "3"))
    for name, data in stale.items():  # the old run's files, put back as a copy from elsewhere would be
        (logs / name).write_bytes(data)
    capsys.readouterr()
    plot.main([str(logs), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"skipping {logs / 'r2_eval.json'}: stale evaluation" in printed
    assert f"skipping {logs / 'r2_cams.npz'}: stale set of Grad-CAMs" in printed
    assert "run evaluate.py" in printed
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| r2 |"))
    history = read(logs / "r2.json")["best"]
    old = json.loads(stale["r2_eval.json"])
    cells = [c.strip() for c in row.strip("|").split("|")]
    # the new run's test kappa from its own log, none of the old checkpoint's numbers
    assert cells[3] == "ce"  # the objective column
    assert cells[8] == f"{history['test_kappa']:.3f}" and cells[9] == "-" and cells[10] == "-"
    assert old["macro_f1"] is not None
    assert not (tmp_path / "confusion_r2.png").exists() and not (tmp_path / "cams_r2.png").exists()


def test_a_moved_copy_of_the_runs_data_is_its_own_and_split_all_there_is_not_external(ws, tmp_path):
    logs = ws["ws"] / "logs"
    train.main(run_args(ws, "r3", "--val-fraction", "0.3"))
    best = ws["ws"] / "checkpoints" / "r3" / "best.pt"
    moved = shutil.copytree(ws["demo"], tmp_path / "moved" / "elsewhere")
    evaluate.main(evaluate_args(ws, best, "--data-root", str(moved)))
    result = read(logs / "r3_eval.json")
    assert result["evaluated_on"] is None and result["referable"]["chosen_on"] == "val"
    assert result["thresholds_from"] == "val"
    assert not list(logs.glob("r3_on_*"))
    evaluate.main(evaluate_args(ws, best, "--split", "all"))
    everything = read(logs / "r3_all_eval.json")
    assert everything["evaluated_on"] is None and everything["split"] == "all"
    assert everything["num_images"] == 64 and everything["thresholds"] is None  # no split left to choose on
    assert read(logs / "r3_eval.json") == result  # the test split's evaluation is still there


def test_two_splits_of_another_dataset_write_two_files(ws):
    logs = ws["ws"] / "logs"
    train.main(run_args(ws, "r4"))
    best = ws["ws"] / "checkpoints" / "r4" / "best.pt"
    evaluate.main(evaluate_args(ws, best, "--data-root", str(ws["other"]), "--split", "test"))
    evaluate.main(evaluate_args(ws, best, "--data-root", str(ws["other"]), "--split", "all"))
    external = sorted(p.name for p in logs.glob("r4_on_*_eval.json"))
    assert len(external) == 2, external
    test, every = (read(logs / name) for name in sorted(external, key=lambda n: "_test_" not in n))
    assert (test["split"], test["num_images"]) == ("test", 8) and (every["split"], every["num_images"]) == ("all", 32)
    assert test["evaluated_on"] == every["evaluated_on"] is not None
    assert test["predictions"] != every["predictions"]
    assert test["data_digest"] != every["data_digest"]


def test_a_training_split_evaluation_gets_a_row_of_its_own(ws, tmp_path):
    logs = tmp_path / "logs"
    train.main(run_args(ws, "r5") + ["--log-dir", str(logs)])  # a log folder of its own: one run, one row
    evaluate.main(evaluate_args(ws, ws["ws"] / "checkpoints" / "r5" / "best.pt", "--split", "train"))
    plot.main([str(logs), "--out", str(tmp_path / "figures")])
    summary = (tmp_path / "figures" / "summary.md").read_text().splitlines()
    train_eval = read(logs / "r5_train_eval.json")
    run_row = [c.strip() for c in next(r for r in summary if r.startswith("| r5 |")).strip("|").split("|")]
    assert run_row[6] == "test" and run_row[9] == "-"  # no training-split number beside the test accuracy
    other = [c.strip() for c in next(r for r in summary if r.startswith("| r5 ") and "train" in r).strip("|").split("|")]
    assert other[6] == "train" and other[8] == f"{train_eval['kappa']:.3f}"


def test_operating_points_in_the_report_never_cross_and_say_when_a_split_is_too_small(ws, capsys):
    best = ws["ws"] / "checkpoints" / "r3" / "best.pt"
    if not best.exists():
        train.main(run_args(ws, "r3", "--val-fraction", "0.3"))
    capsys.readouterr()
    evaluate.main(evaluate_args(ws, best, "--tta"))
    printed = capsys.readouterr().out
    result = read(ws["ws"] / "logs" / "r3_tta_eval.json")
    for task in ("referable", "vision_threatening"):
        m = result[task]
        points = m["operating_points"] or {}
        if len(points) == 2:
            assert points["high_sensitivity"]["threshold"] <= points["high_specificity"]["threshold"]
        for why in m["operating_points_unset"].values():
            assert "the val split has" in why and why in printed
    # the demo's validation split is small: the targets cannot be told apart from 100 % there
    assert result["referable"]["operating_points_unset"]
