"""evaluate.py against scikit-learn and against what train.py logged; unsafe checkpoints refused."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, \
    precision_recall_fscore_support

import dataloader
import evaluate
import objectives
import metrics
import runtime
import train


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train.main(["--data-root", str(tiny_demo), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                "--epochs", "2", "--checkpoint-dir", str(out / "checkpoints"), "--log-dir", str(out / "logs"),
                "--quiet"])
    return out


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    grades = rng.choice(5, size=300, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    preds = np.where(rng.random(300) < 0.7, grades, rng.integers(0, 5, 300))
    preds[preds == 3] = 2  # one grade never predicted: zero_division paths
    m = metrics.grading_metrics(grades, preds)
    assert m["accuracy"] == pytest.approx(accuracy_score(grades, preds))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(grades, preds, weights="quadratic"))
    assert m["macro_f1"] == pytest.approx(f1_score(grades, preds, average="macro", zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(grades, preds).tolist()
    p, r, f, s = precision_recall_fscore_support(grades, preds, zero_division=0)
    for g in range(5):
        c = m["per_class"][str(g)]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[g], r[g], f[g], s[g]))


def test_metrics_keep_all_five_grades_when_some_are_absent():
    m = metrics.grading_metrics([0, 0, 1], [0, 1, 1])
    assert np.asarray(m["confusion_matrix"]).shape == (5, 5)
    assert m["per_class"]["4"]["support"] == 0


def test_evaluate_matches_the_last_logged_test_accuracy(trained, capsys):
    out = trained / "eval.json"
    evaluate.main([str(trained / "checkpoints" / "resnet18_scratch" / "last.pt"), "--out", str(out),
                   "--figure-dir", str(trained / "figures"), "--workers", "0", "--quiet"])
    result = json.loads(out.read_text())
    log = pd.read_csv(trained / "logs" / "resnet18_scratch.csv")
    assert result["accuracy"] == pytest.approx(log["test_acc"].iloc[-1], abs=1e-9)
    assert result["kappa"] == pytest.approx(log["test_kappa"].iloc[-1], abs=1e-6)
    assert result["num_images"] == 16 and result["split"] == "test" and result["epoch"] == 2
    for key in ["accuracy", "kappa", "macro_f1", "per_class", "confusion_matrix", "checkpoint", "split", "num_images"]:
        assert key in result
    assert np.asarray(result["confusion_matrix"]).sum() == 16
    assert (trained / "figures" / "confusion_resnet18_scratch.png").stat().st_size > 10_000
    assert "quadratic weighted kappa" in capsys.readouterr().out


def test_tta_writes_its_own_file(trained):
    evaluate.main([str(trained / "checkpoints" / "resnet18_scratch" / "last.pt"), "--tta", "--workers", "0",
                   "--figure-dir", str(trained / "figures"), "--quiet"])
    result = json.loads((trained / "logs" / "resnet18_scratch_tta_eval.json").read_text())
    assert result["tta"] is True and result["num_images"] == 16
    assert (trained / "figures" / "confusion_resnet18_scratch_tta.png").is_file()


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = dataloader.dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert any(torch.equal(v, torch.flip(x, dims=(2,))) for v in views)  # the vertical flip is among them


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def expect_refusal(path, capsys, fragment):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(path), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_checkpoint_with_pickled_code_is_refused_and_the_code_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": "resnet18", "config": {}, "payload": RunsCode(marker)}, path)
    expect_refusal(path, capsys, "refused")
    assert not marker.exists()
    # the same file does run code when unpickled without weights_only: the test's payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_refused(trained, tmp_path, capsys):
    data = (trained / "checkpoints" / "resnet18_scratch" / "last.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    expect_refusal(path, capsys, "truncated or not a PyTorch file")


def test_foreign_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    expect_refusal(path, capsys, "is not a checkpoint of this project")


def test_checkpoint_of_another_architecture_is_refused(trained, tmp_path, capsys):
    checkpoint = torch.load(trained / "checkpoints" / "resnet18_scratch" / "last.pt", weights_only=True)
    checkpoint["arch"] = "resnet50"
    path = tmp_path / "mislabelled.pt"
    torch.save(checkpoint, path)
    expect_refusal(path, capsys, "says arch resnet50 but its weights do not fit")


def test_missing_checkpoint(tmp_path, capsys):
    expect_refusal(tmp_path / "nope.pt", capsys, "does not exist")


def test_tta_averages_the_softmax_of_all_eight_views():
    ce = objectives.OBJECTIVES["ce"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    views = [torch.flip(torch.rot90(x, k, (2, 3)), (3,)) if f else torch.rot90(x, k, (2, 3))
             for k in range(4) for f in (0, 1)]
    expected = torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0)
    ctx = runtime.autocast(torch.device("cpu"), None)
    assert torch.allclose(evaluate.summaries_over_views(model, x, ctx, True, ce), expected, atol=1e-6)
    assert torch.allclose(evaluate.summaries_over_views(model, x, ctx, False, ce), torch.softmax(model(x), 1), atol=1e-6)
