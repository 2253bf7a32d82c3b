"""plot.py: figures exist and are not blank, the summary's numbers, the confusion matrix against sklearn."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

import plot

# Per-epoch values of the sample runs; the expected summary numbers are computed from these lists
# in plain Python, not with the pandas code under test.
SAMPLE_RUNS = {
    "resnet18_pretrained": dict(arch="resnet18", pretrained=True, train_acc=[0.70, 0.80, 0.88],
                                test_acc=[0.60, 0.72, 0.70], test_kappa=[0.30, 0.55, 0.50],
                                images_per_s=[300.0, 320.0, 310.0]),
    "resnet18_scratch": dict(arch="resnet18", pretrained=False, train_acc=[0.50, 0.60, 0.65],
                             test_acc=[0.50, 0.55, 0.58], test_kappa=[0.05, 0.12, 0.20],
                             images_per_s=[290.0, 330.0, 305.0]),
    # a validation run: val picks epoch 2, although epoch 3 has the best test accuracy
    "resnet50_scratch": dict(arch="resnet50", pretrained=False, train_acc=[0.45, 0.55, 0.62],
                             test_acc=[0.42, 0.47, 0.53], test_kappa=[-0.02, 0.10, 0.15],
                             images_per_s=[90.0, 95.0, 80.0], val_acc=[0.40, 0.52, 0.45]),
}
# Grade 3 never occurs among the true grades: its row must read 0.00, not NaN.
TRUE_GRADES = [0] * 30 + [1] * 6 + [2] * 10 + [4] * 4
PRED_GRADES = [0] * 25 + [1] * 3 + [2] * 2 + [0, 1, 1, 2, 2, 4] + [0, 2, 2, 2, 2, 2, 2, 3, 3, 1] + [4, 4, 2, 3]
EVALS = {"resnet18_pretrained_eval": dict(tta=False, kappa=0.612, macro_f1=0.481),
         "resnet50_scratch_tta_eval": dict(tta=True, kappa=0.2, macro_f1=0.3)}


def _write_run(logdir, name, spec):
    epochs = len(spec["test_acc"])
    has_val = "val_acc" in spec
    header = "epoch,train_loss,train_acc,test_loss,test_acc,test_kappa,lr,seconds,images_per_s"
    lines = [header + (",val_loss,val_acc,val_kappa" if has_val else "")]
    for i in range(epochs):
        row = [i + 1, 2 * (1 - spec["train_acc"][i]), spec["train_acc"][i],
               2.2 * (1 - spec["test_acc"][i]), spec["test_acc"][i],
               spec["test_kappa"][i], 0.1, 60.0, spec["images_per_s"][i]]
        if has_val:
            row += [2.2 * (1 - spec["val_acc"][i]), spec["val_acc"][i], 0.1 * i]
        lines.append(",".join(str(v) for v in row))
    (logdir / f"{name}.csv").write_text("\n".join(lines) + "\n")
    info = {"run_name": name, "arch": spec["arch"], "pretrained": spec["pretrained"], "config": {},
            "environment": {}, "epochs_done": epochs, "best_epoch": 2, "best_metric": 0.5,
            "best_metric_name": "val_acc" if has_val else "test_acc", "best": {}, "last": {}}
    (logdir / f"{name}.json").write_text(json.dumps(info))


def _write_eval(logdir, stem, spec):
    run_name = stem.replace("_tta_eval", "").replace("_eval", "")
    counts = confusion_matrix(TRUE_GRADES, PRED_GRADES, labels=range(5))
    data = {"run_name": run_name, "arch": run_name.split("_")[0], "pretrained": "pretrained" in run_name,
            "checkpoint": f"checkpoints/{run_name}/best.pt", "split": "test", "num_images": len(TRUE_GRADES),
            "tta": spec["tta"], "accuracy": 0.7, "kappa": spec["kappa"], "macro_f1": spec["macro_f1"],
            "per_class": {}, "confusion_matrix": counts.tolist()}
    (logdir / f"{stem}.json").write_text(json.dumps(data))


@pytest.fixture
def logdir(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    for name, spec in SAMPLE_RUNS.items():
        _write_run(folder, name, spec)
    for stem, spec in EVALS.items():
        _write_eval(folder, stem, spec)
    return folder


def _assert_real_png(path):
    assert path.is_file(), f"{path.name} was not written"
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 600 and image.height > 400
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colours) > 50, f"{path.name} looks blank"


def test_main_writes_every_figure_and_the_summary(logdir, tmp_path, capsys):
    out = tmp_path / "figures"
    plot.main([str(logdir), "--out", str(out)])
    names = ["comparison_resnet18", "comparison_resnet50", "loss_resnet18", "loss_resnet50",
             "kappa_resnet18", "kappa_resnet50", "confusion_resnet18_pretrained",
             "confusion_resnet50_scratch_tta"]
    for name in names:
        _assert_real_png(out / f"{name}.png")
    printed = capsys.readouterr().out
    for name in names:
        assert f"wrote {out / name}.png" in printed
    assert "| resnet18_pretrained |" in printed


def _summary_rows(text):
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return [dict(zip([h.strip() for h in header], [c.strip() for c in row])) for row in body]


def test_summary_reports_best_epoch_from_the_csv(logdir, tmp_path):
    runs, evals = plot.load_runs(logdir), plot.load_evals(logdir)
    text = plot.write_summary(runs, evals, tmp_path).read_text()
    rows = _summary_rows(text)
    assert [r["run"] for r in rows] == ["resnet18_pretrained", "resnet18_scratch", "resnet50_scratch",
                                        "resnet50_scratch (TTA)"]
    # one split and one way of predicting per row: the TTA evaluation is not joined to the log's accuracy
    tta = rows.pop()
    assert (tta["split"], tta["kappa"], tta["macro F1"], tta["accuracy (%)"]) == ("test", "0.200", "0.300", "70.00")
    assert rows[2]["kappa"] == "0.100" and rows[2]["macro F1"] == "-"  # the log's, at the best (val) epoch 2
    for row in rows:
        assert row["split"] == "test"
        spec = SAMPLE_RUNS[row["run"]]
        chooser = spec.get("val_acc", spec["test_acc"])
        best = chooser.index(max(chooser))
        assert row["best epoch"] == str(best + 1)
        assert float(row["accuracy (%)"].rstrip("*")) == pytest.approx(100 * spec["test_acc"][best], abs=0.01)
        assert row["accuracy (%)"].endswith("*") == ("val_acc" in spec)
        assert float(row["images/s"]) == pytest.approx(sorted(spec["images_per_s"])[1], abs=0.5)
        assert row["model"] == {"resnet18": "ResNet18", "resnet50": "ResNet50"}[spec["arch"]]
        assert row["epochs"] == "3"
    by_run = {r["run"]: r for r in rows}
    assert by_run["resnet18_pretrained"]["kappa"] == "0.612"     # from the eval json
    assert by_run["resnet18_pretrained"]["macro F1"] == "0.481"
    assert by_run["resnet18_scratch"]["kappa"] == "0.200"        # from the CSV at the best epoch
    assert by_run["resnet18_scratch"]["macro F1"] == "-"
    assert "validation" in text.split("\n\n", 1)[1]              # the footnote for the val run


def test_confusion_matches_sklearn_normalisation(tmp_path):
    counts = confusion_matrix(TRUE_GRADES, PRED_GRADES, labels=range(5))
    expected = confusion_matrix(TRUE_GRADES, PRED_GRADES, labels=range(5), normalize="true")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero-support row must not warn about dividing by zero
        drawn = plot.plot_confusion(counts.tolist(), tmp_path / "cm.png")
        fig, _ = plot.confusion_figure(counts)
    np.testing.assert_allclose(drawn, expected)
    assert not np.isnan(drawn).any()
    _assert_real_png(tmp_path / "cm.png")
    ax = fig.axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert cells == [f"{v:.2f}" for v in expected.ravel()]
    assert ax.get_title() == "Normalized confusion matrix"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted label", "True label")
    assert ax.images[0].get_cmap().name == "Blues"
    plot.plt.close(fig)


def test_comparison_has_the_lab_labels(logdir):
    runs, evals = plot.load_runs(logdir), plot.load_evals(logdir)
    counts = confusion_matrix(TRUE_GRADES, PRED_GRADES, labels=range(5))
    majority = counts.sum(axis=1).max() / counts.sum()
    fig = plot.comparison_figure("resnet18", runs, plot.majority_share("resnet18", evals))
    ax = fig.axes[0]
    assert ax.get_title() == "Result Comparison(ResNet18)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Epochs", "Accuracy(%)")
    _, labels = ax.get_legend_handles_labels()
    assert labels == ["Train(with pretraining)", "Test(with pretraining)", "Train(w/o pretraining)",
                      "Test(w/o pretraining)", f"Majority grade ({100 * majority:.1f}%)"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["Test(with pretraining)"].get_ydata(),
                               [100 * a for a in SAMPLE_RUNS["resnet18_pretrained"]["test_acc"]])
    assert lines["Train(w/o pretraining)"].get_marker() not in (None, "None", "")
    plot.plt.close(fig)


def test_comparison_draws_with_only_one_of_the_pair(logdir, tmp_path):
    runs = plot.load_runs(logdir)
    fig = plot.comparison_figure("resnet50", runs)
    _, labels = fig.axes[0].get_legend_handles_labels()
    assert labels == ["Train(w/o pretraining)", "Test(w/o pretraining)", "Val(w/o pretraining)"]
    plot.plt.close(fig)
    _assert_real_png(plot.plot_comparison("resnet50", runs, tmp_path))


def test_newest_duplicate_run_is_plotted_and_the_older_named(logdir, tmp_path, capsys):
    _write_run(logdir, "resnet18_pretrained_old", dict(SAMPLE_RUNS["resnet18_pretrained"], test_acc=[0.1] * 3))
    for suffix in (".csv", ".json"):
        os.utime(logdir / f"resnet18_pretrained_old{suffix}", (1_000_000, 1_000_000))
    plot.main([str(logdir), "--out", str(tmp_path / "figures")])
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "resnet18_pretrained_old" in skipped[0]
    fig = plot.comparison_figure("resnet18", plot.load_runs(logdir))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert max(lines["Test(with pretraining)"].get_ydata()) == pytest.approx(72.0)
    plot.plt.close(fig)


@pytest.mark.parametrize("case", ["missing", "empty", "only_evals"])
def test_no_run_logs_is_one_sentence_and_exit_2(tmp_path, capsys, case):
    folder = tmp_path / "nologs"
    if case != "missing":
        folder.mkdir()
    if case == "only_evals":
        _write_eval(folder, "resnet18_pretrained_eval", EVALS["resnet18_pretrained_eval"])
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(folder), "--out", str(tmp_path / "figures")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(folder) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("broken", ["resnet18_scratch.csv", "resnet18_scratch.json", "resnet18_pretrained_eval.json"])
def test_malformed_log_names_the_file(logdir, tmp_path, capsys, broken):
    (logdir / broken).write_text('{"arch": "resnet18", oops' if broken.endswith(".json") else "epoch,loss\n1,2,3,4\n")
    if broken.endswith(".json"):  # a JSON that is no run log is passed over with a line, as unfinished runs are
        plot.main([str(logdir), "--out", str(tmp_path / "figures")])
        assert f"skipping {broken}: {logdir / broken} is not valid JSON" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(logdir), "--out", str(tmp_path / "figures")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(logdir / broken) in err
