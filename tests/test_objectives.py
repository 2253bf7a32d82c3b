"""The objectives (objectives.py) against their published definitions, and each one end to end from the command
line: train, resume bit for bit, evaluate (every number recomputed with scikit-learn from the predictions
file), TTA, --images, export equal to the checkpoint, plot."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from sklearn.metrics import cohen_kappa_score, roc_auc_score

import evaluate
import metrics
import objectives
import plot
import runtime
import train

CE, MSE, ORDINAL = (objectives.OBJECTIVES[n] for n in ("ce", "mse", "ordinal"))


# --------------------------------------------------------------------------- the definitions
def test_corn_loss_and_grade_are_the_published_ones():
    coral = pytest.importorskip("coral_pytorch")  # Raschka lab's reference implementation of CORN
    from coral_pytorch.dataset import corn_label_from_logits
    from coral_pytorch.losses import corn_loss

    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 3
    grades = torch.randint(0, 5, (64,))
    assert coral is not None
    assert torch.allclose(ORDINAL.loss(logits, grades), corn_loss(logits, grades, 5), atol=1e-6)
    summary = ORDINAL.summarise(logits)
    assert torch.equal(ORDINAL.grade(summary), corn_label_from_logits(logits))
    # five probabilities of a distribution; P(grade >= k) is the running product of the conditional ones
    assert (summary >= 0).all() and torch.allclose(summary.sum(1), torch.ones(64), atol=1e-6)
    assert torch.allclose(objectives.at_least(summary)[:, 1:], torch.cumprod(torch.sigmoid(logits), 1), atol=1e-6)
    # the expected grade is the sum of P(grade >= k)
    assert torch.allclose(ORDINAL.score(summary), torch.cumprod(torch.sigmoid(logits), 1).sum(1), atol=1e-5)


@pytest.mark.parametrize("objective", [CE, MSE, ORDINAL], ids=lambda o: o.name)
def test_the_loss_recomputed_from_summaries_is_the_training_loss(objective):
    torch.manual_seed(1)
    out = torch.randn(40, objective.outputs) * 2
    grades = torch.randint(0, 5, (40,))
    assert objective.eval_loss(objective.summarise(out), grades) == pytest.approx(float(objective.loss(out, grades)),
                                                                                   rel=1e-5)


def test_ce_is_the_softmax_and_its_expected_grade():
    out = torch.randn(10, 5)
    summary = CE.summarise(out)
    assert torch.allclose(summary, torch.softmax(out, 1))
    assert torch.equal(CE.grade(summary), out.argmax(1))
    assert torch.allclose(CE.score(summary), summary @ torch.arange(5.0))
    assert torch.allclose(CE.screening_score(summary, 2), summary[:, 2:].sum(1))


def test_the_regression_cuts_its_grade_half_way():
    summary = torch.tensor([[-0.7], [0.49], [0.51], [1.5], [2.2], [3.49], [3.51], [9.0]])
    assert MSE.grade(summary).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    assert torch.equal(MSE.screening_score(summary, 2), summary[:, 0])
    assert MSE.numbers(summary.numpy())["probs"] is None


def test_cross_entropy_settings_are_refused_for_the_other_objectives(tiny_demo, tmp_path, capsys):
    for flags, words in ((["--loss", "mse", "--class-weighted"], "--class-weighted weighs cross-entropy's classes"),
                         (["--loss", "ordinal", "--label-smoothing", "0.1"], "--label-smoothing smooths")):
        with pytest.raises(SystemExit) as stopped:
            train.main(["--data-root", str(tiny_demo), "--checkpoint-dir", str(tmp_path / "c"), *flags])
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_patient_screening_refers_a_patient_when_either_eye_is_referable():
    names = ["1_left", "1_right", "2_left", "2_right", "3_left", "4_right"]
    patients = [n.split("_")[0] for n in names]
    grades = np.array([0, 2, 0, 0, 3, 1])
    preds = np.array([0, 1, 2, 0, 3, 0])
    score = np.array([0.1, 0.4, 0.7, 0.2, 0.9, 0.3])
    m = metrics.patient_screening(patients, grades, preds, score)
    # patients 1..4: referable yes, no, yes, no; referred (either eye's grade >= 2) no, yes, yes, no
    assert (m["patients"], m["with_both_eyes"], m["with_one_eye"], m["positives"]) == (4, 2, 2, 2)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.4, 0.7, 0.9, 0.3]))
    alone = metrics.patient_screening([str(i) for i in range(6)], grades, preds, score)
    assert not alone["applies"] and "no patient has both eyes" in alone["why_not"]


# --------------------------------------------------------------------------- end to end
def base(root, out, *extra):
    return ["--data-root", str(root), "--image-size", "32", "--batch-size", "8", "--workers", "0", "--optimizer",
            "adamw", "--val-fraction", "0.3", "--checkpoint-dir", str(out / "checkpoints"), "--log-dir",
            str(out / "logs"), "--quiet", *extra]


@pytest.fixture(scope="module", params=["mse", "ordinal"])
def objective_run(request, tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"objective_{request.param}")
    train.main(base(tiny_demo, out, "--loss", request.param, "--epochs", "2", "--select", "kappa"))
    return request.param, out, out / "checkpoints" / f"resnet18_scratch_{request.param}" / "best.pt"


def test_a_run_resumes_bit_for_bit(objective_run, tiny_demo, tmp_path):
    loss, out, _ = objective_run
    train.main(base(tiny_demo, tmp_path, "--loss", loss, "--epochs", "1", "--select", "kappa"))
    last = tmp_path / "checkpoints" / f"resnet18_scratch_{loss}" / "last.pt"
    train.main(["--resume", str(last), "--epochs", "2", "--quiet"])
    resumed = runtime.load_checkpoint(last)
    whole = runtime.load_checkpoint(out / "checkpoints" / f"resnet18_scratch_{loss}" / "last.pt")
    assert resumed["objective"] == loss and resumed["best_metric_name"] == "val_kappa"
    for key, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


def test_the_checkpoint_loads_into_torchvision_with_its_head_width(objective_run):
    loss, _, best = objective_run
    checkpoint = runtime.load_checkpoint(best)
    assert checkpoint["num_classes"] == objectives.OBJECTIVES[loss].outputs
    torchvision.models.resnet18(num_classes=checkpoint["num_classes"]).load_state_dict(checkpoint["model"])


def test_every_number_follows_from_the_predictions_through_the_objective(objective_run, tmp_path):
    loss, out, best = objective_run
    objective = objectives.OBJECTIVES[loss]
    evaluate.main([str(best), "--workers", "0", "--quiet", "--figure-dir", str(tmp_path)])
    result = json.loads((out / "logs" / f"resnet18_scratch_{loss}_eval.json").read_text())
    test = pd.read_csv(result["predictions"], dtype={"image": str})
    assert result["objective"] == loss and list(test.columns) == evaluate.PREDICTION_COLUMNS
    grades, score = test["grade"].to_numpy(), test["score"].to_numpy()
    if loss == "mse":  # the regression: no probabilities, its score cut at 0.5 .. 3.5, its AUC from the score
        assert test[[f"p{g}" for g in range(5)]].isna().all().all()
        assert (test["pred"] == np.digitize(score, [0.5, 1.5, 2.5, 3.5], right=True)).all()
        referable = score
        assert result["ece"] is None and "not applicable" in result["calibration_note"]
    else:  # CORN: P(grade >= k) over one half, counted
        probs = test[[f"p{g}" for g in range(5)]].to_numpy()
        at_least = probs[:, ::-1].cumsum(1)[:, ::-1]
        assert (test["pred"] == (at_least[:, 1:] > 0.5).sum(1)).all()
        np.testing.assert_allclose(score, probs @ np.arange(5), atol=2e-6)
        referable = probs[:, 2:].sum(1)
        assert result["ece"] is not None
    assert result["kappa"] == pytest.approx(cohen_kappa_score(grades, test["pred"], weights="quadratic",
                                                              labels=range(5)))
    assert result["referable"]["auc"] == pytest.approx(roc_auc_score(grades >= 2, referable))
    # the log's best epoch measured the same weights the same way
    log = pd.read_csv(out / "logs" / f"resnet18_scratch_{loss}.csv")
    epoch = json.loads((out / "logs" / f"resnet18_scratch_{loss}.json").read_text())["best_epoch"]
    assert log["test_kappa"].iloc[epoch - 1] == pytest.approx(result["kappa"], abs=1e-6)
    assert log["test_loss"].iloc[epoch - 1] == pytest.approx(
        objective.eval_loss(torch.as_tensor(test[evaluate.summary_columns(objective)].to_numpy()),
                            torch.as_tensor(grades)), rel=1e-3)


def test_tta_images_export_and_plot_go_through_the_objective(objective_run, tiny_demo, tmp_path):
    pytest.importorskip("onnxruntime")
    import export

    loss, out, best = objective_run
    evaluate.main([str(best), "--workers", "0", "--quiet", "--tta", "--figure-dir", str(tmp_path)])
    tta = json.loads((out / "logs" / f"resnet18_scratch_{loss}_tta_eval.json").read_text())
    assert tta["tta"] and tta["objective"] == loss
    photos = sorted((tiny_demo / "images").glob("*.jpeg"))[:3]
    table = tmp_path / "grades.csv"
    # --force: the tiny demo's 32 px photos are under the smallest the gradability check judges
    evaluate.main([str(best), "--images", *map(str, photos), "--out", str(table), "--workers", "0", "--quiet",
                   "--force"])
    graded = pd.read_csv(table)
    assert list(graded.columns) == evaluate.PHOTO_COLUMNS and graded["score"].notna().all()
    assert graded["confidence"].isna().all() == (loss == "mse")
    onnx_file = tmp_path / "model.onnx"
    export.main([str(best), "--out", str(onnx_file)])
    import deploy

    assert deploy.read_metadata(onnx_file)["objective"] == loss
    evaluate.main([str(onnx_file), "--workers", "0", "--quiet", "--figure-dir", str(tmp_path)])
    exported = json.loads((out / "logs" / f"resnet18_scratch_{loss}_onnx_eval.json").read_text())
    plain = json.loads((out / "logs" / f"resnet18_scratch_{loss}_eval.json").read_text()) if (
        out / "logs" / f"resnet18_scratch_{loss}_eval.json").is_file() else None
    if plain is not None:
        assert exported["kappa"] == pytest.approx(plain["kappa"]) and exported["accuracy"] == plain["accuracy"]
    plot.main([str(out / "logs"), "--out", str(tmp_path / "figures")])
    summary = (tmp_path / "figures" / "summary.md").read_text()
    assert f"| ResNet18 | no | {loss} |" in summary
    assert (tmp_path / "figures" / f"comparison_resnet18_{loss}.png").is_file()
    assert (tmp_path / "figures" / f"reliability_resnet18_scratch_{loss}.png").is_file() == (loss != "mse")
