"""Clinical evaluation: known answers worked by hand, scikit-learn as the oracle, and every number of the
metrics JSON recomputed from the predictions files alone."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score, roc_curve

import dataloader
import evaluate
import metrics
import objectives
import plot
import train


CE = objectives.OBJECTIVES["ce"]


# --------------------------------------------------------------------------- known answers
def one_hot_probs(scores_at_least_2):
    """Probabilities whose referable score (p2+p3+p4) is the given value: the rest sits on grade 0."""
    s = np.asarray(scores_at_least_2, float)
    return np.column_stack([1 - s, np.zeros_like(s), s, np.zeros_like(s), np.zeros_like(s)])


def test_auc_and_rates_worked_by_hand():
    # positives score 0.9 and 0.6, negatives 0.7, 0.2, 0.1: of the 6 pairs a positive outscores a negative in 5
    grades = np.array([2, 3, 0, 1, 0])
    probs = one_hot_probs([0.9, 0.6, 0.7, 0.2, 0.1])
    probs[1] = [0.4, 0, 0, 0.6, 0]  # grade 3 carries its score
    m = metrics.screening_metrics(grades, probs.argmax(1), probs[:, 2:].sum(1), 2, None, None)
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["auc"] == pytest.approx(roc_auc_score(grades >= 2, probs[:, 2:].sum(1)))
    # argmax calls: 0.9 -> grade 2 (TP), 0.6 -> grade 3 (TP), 0.7 -> grade 2 (FP), 0.2 and 0.1 -> grade 0 (TN)
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == pytest.approx((1, 2 / 3, 2 / 3, 1))
    assert (m["positives"], m["negatives"]) == (2, 3)


def test_operating_points_meet_their_targets_at_the_extreme_threshold():
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.3
    score = np.clip(rng.normal(np.where(positive, 0.7, 0.3), 0.15), 0, 1)
    chosen, unset = metrics.operating_thresholds(positive, score, "val")
    assert unset == {}
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    sensitivity = lambda t: (score[positive] >= t).mean()  # noqa: E731
    specificity = lambda t: (score[~positive] < t).mean()  # noqa: E731
    t = chosen["high_sensitivity"]
    assert sensitivity(t) >= 0.975 and all(sensitivity(u) < 0.975 for u in thresholds if u > t)
    t = chosen["high_specificity"]
    assert specificity(t) >= 0.98 and all(specificity(u) < 0.98 for u in thresholds if u < t)
    assert metrics.operating_thresholds(np.ones(60, bool), np.ones(60), "val")[0] == {}


def test_operating_points_never_cross():
    # a split that separates the classes meets both targets on a whole interval of thresholds: the highest
    # threshold with 97.5 % sensitivity lies above the lowest with 98 % specificity, and the two used to be
    # reported crossed (the demo with --tta: high-sensitivity 0.96, high-specificity 0.61)
    rng = np.random.default_rng(3)
    positive = np.repeat([True, False], [100, 100])
    score = np.where(positive, rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.4, 200))
    chosen, unset = metrics.operating_thresholds(positive, score, "val")
    assert unset == {} and chosen["high_sensitivity"] <= chosen["high_specificity"]
    for t in chosen.values():  # each still meets both targets on the split it was chosen on
        assert (score[positive] >= t).mean() >= 0.975 and (score[~positive] < t).mean() >= 0.98


@pytest.mark.parametrize("positives, negatives, missing", [(39, 200, "high_sensitivity"),
                                                           (200, 49, "high_specificity"),
                                                           (5, 5, "both")])
def test_a_split_too_small_for_a_target_chooses_no_point_and_says_so(positives, negatives, missing):
    rng = np.random.default_rng(4)
    positive = np.repeat([True, False], [positives, negatives])
    score = np.clip(rng.normal(np.where(positive, 0.7, 0.3), 0.2), 0, 1)
    chosen, unset = metrics.operating_thresholds(positive, score, "val")
    names = {"high_sensitivity", "high_specificity"} if missing == "both" else {missing}
    assert set(unset) == names and not names & set(chosen) and len(chosen) == 2 - len(names)
    if "high_sensitivity" in names:
        assert f"the val split has {positives} positive cases" in unset["high_sensitivity"]
        assert "at least 40" in unset["high_sensitivity"]
    if "high_specificity" in names:
        assert f"the val split has {negatives} negative cases" in unset["high_specificity"]
        assert "at least 50" in unset["high_specificity"]
    grades = np.where(positive, 2, 0)
    numbers = CE.numbers(one_hot_probs(score))
    m = metrics.clinical_metrics(grades, numbers, [str(i) for i in range(len(score))],
                                 (grades, numbers, "val"))["referable"]
    assert m["operating_points_unset"] == unset and set(m["operating_points"] or {}) == set(chosen)


def test_ece_worked_by_hand():
    # four images, top-class confidences 0.95, 0.95, 0.55, 0.55: bins (0.9, 0.967] and (0.533, 0.6]
    probs = np.array([[0.95, 0.05, 0, 0, 0], [0.95, 0.05, 0, 0, 0], [0.55, 0.45, 0, 0, 0], [0.45, 0.55, 0, 0, 0]])
    grades = np.array([0, 1, 0, 0])  # right, wrong | right, wrong
    result = metrics.calibration(grades, probs)
    # each bin: half the images, accuracy 0.5: 0.5 * |0.5 - 0.95| + 0.5 * |0.5 - 0.55| = 0.25
    assert result["ece"] == pytest.approx(0.25)
    assert len(result["bins"]) == 15 and sum(b["count"] for b in result["bins"]) == 4
    assert result["bins"][14]["count"] == 2 and result["bins"][14]["accuracy"] == 0.5


def test_quadratic_kappa_equals_sklearn_with_and_without_weights():
    rng = np.random.default_rng(1)
    grades, preds = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    preds[:200] = grades[:200]
    weight = rng.integers(0, 4, 300).astype(float)
    assert metrics.quadratic_kappa(grades, preds) == pytest.approx(cohen_kappa_score(grades, preds, weights="quadratic"))
    assert metrics.quadratic_kappa(grades, preds, weight) == pytest.approx(
        cohen_kappa_score(grades, preds, weights="quadratic", sample_weight=weight))


def test_tuned_thresholds_find_the_cut_the_argmax_misses():
    # grade 2 eyes with an expected grade of 1.3: the default cut at 1.5 calls them grade 1
    grades = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    expected = np.array([0.1, 0.2, 0.8, 0.9, 1.3, 1.35, 2.7, 2.8, 3.6, 3.7])
    assert metrics.quadratic_kappa(grades, metrics.cut(expected, [0.5, 1.5, 2.5, 3.5])) < 1
    thresholds = metrics.tune_thresholds(grades, expected)
    assert metrics.quadratic_kappa(grades, metrics.cut(expected, thresholds)) == pytest.approx(1.0)
    assert 0.9 <= thresholds[1] < 1.3 and thresholds == sorted(thresholds)
    assert metrics.tune_thresholds(grades, expected) == thresholds  # deterministic


def test_bootstrap_resamples_patients_not_images():
    # two patients of 50 images each, one always right and one always wrong: drawing patients gives an
    # accuracy of 0, 0.5 or 1; drawing images would give a narrow interval around 0.5
    names = [f"1_left_{i}" for i in range(50)] + [f"2_left_{i}" for i in range(50)]
    patients = ["1"] * 50 + ["2"] * 50
    grades = np.zeros(100, int)
    probs = np.zeros((100, 5))
    probs[:50, 0] = 1
    probs[50:, 1] = 1
    ci = metrics.bootstrap_intervals(patients, grades, probs.argmax(1), probs[:, 2:].sum(1))
    assert ci["accuracy"] == [0.0, 1.0]
    assert metrics.bootstrap_intervals(names, grades, probs.argmax(1), probs[:, 2:].sum(1))["accuracy"][1] < 0.7
    assert metrics.bootstrap_intervals(patients, grades, probs.argmax(1), probs[:, 2:].sum(1)) == ci  # fixed seed


# --------------------------------------------------------------------------- a run, evaluated
@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    import synthetic

    out = tmp_path_factory.mktemp("clinical")
    root = synthetic.generate_demo(out / "demo", n_train=96, n_test=48, size=32, seed=5, quiet=True)
    train.main(["--data-root", str(root), "--batch-size", "16", "--workers", "0", "--epochs", "3",
                "--optimizer", "adamw", "--val-fraction", "0.3", "--checkpoint-dir", str(out / "checkpoints"),
                "--log-dir", str(out / "logs"), "--quiet"])
    ckpt = out / "checkpoints" / "resnet18_scratch" / "best.pt"  # plot.py shows evaluations of best.pt only
    evaluate.main([str(ckpt), "--workers", "0", "--quiet", "--figure-dir", str(out / "figures")])
    return out, root, ckpt


def test_every_number_follows_from_the_predictions_files(val_run):
    out, root, _ = val_run
    result = json.loads((out / "logs" / "resnet18_scratch_eval.json").read_text())
    test = pd.read_csv(result["predictions"], dtype={"image": str})
    val = pd.read_csv(result["reference_predictions"], dtype={"image": str})
    fundus = dataloader.load_fundus_data(root, val_fraction=0.3)
    assert list(test.columns) == ["image", "grade", "pred", "score", "p0", "p1", "p2", "p3", "p4",
                                  "checkpoint", "weights_digest", "split", "dataset"]
    assert test["image"].tolist() == fundus.test.names and val["image"].tolist() == fundus.val.names
    probs, grades = test[[f"p{g}" for g in range(5)]].to_numpy(), test["grade"].to_numpy()
    assert (test["pred"] == probs.argmax(1)).all()
    np.testing.assert_allclose(test["score"], probs @ np.arange(5), atol=2e-6)
    assert result["accuracy"] == pytest.approx((test["pred"] == grades).mean())
    assert result["kappa"] == pytest.approx(cohen_kappa_score(grades, test["pred"], weights="quadratic"))
    for task, grade in (("referable", 2), ("vision_threatening", 3)):
        positive, score = grades >= grade, probs[:, grade:].sum(1)
        m = result[task]
        assert m["auc"] == pytest.approx(roc_auc_score(positive, score))
        fpr, tpr, _ = roc_curve(positive, score)
        assert m["roc"]["fpr"] == pytest.approx(fpr, abs=1e-5) and m["roc"]["tpr"] == pytest.approx(tpr, abs=1e-5)
        called = probs.argmax(1) >= grade
        assert m["sensitivity"] == pytest.approx((called & positive).sum() / positive.sum())
        assert m["specificity"] == pytest.approx((~called & ~positive).sum() / (~positive).sum())
        # the operating points: thresholds chosen on the validation file, rates measured on the test file
        ref_positive = val["grade"].to_numpy() >= grade
        ref_score = val[[f"p{g}" for g in range(grade, 5)]].to_numpy().sum(1)
        assert m["chosen_on"] == "val"
        chosen, unset = metrics.operating_thresholds(ref_positive, ref_score, "val")
        assert m["operating_points_unset"] == unset and set(m["operating_points"] or {}) == set(chosen)
        for point, values in (m["operating_points"] or {}).items():
            assert values["threshold"] == pytest.approx(chosen[point])
            assert values["sensitivity"] == pytest.approx((score[positive] >= values["threshold"]).mean())
            assert values["specificity"] == pytest.approx((score[~positive] < values["threshold"]).mean())
    expected_val = val[[f"p{g}" for g in range(5)]].to_numpy() @ np.arange(5)
    assert result["thresholds_from"] == "val"
    assert result["thresholds"] == pytest.approx(metrics.tune_thresholds(val["grade"].to_numpy(), expected_val))
    tuned = (probs @ np.arange(5))[:, None] > np.asarray(result["thresholds"])[None, :]
    assert result["kappa_tuned"] == pytest.approx(cohen_kappa_score(grades, tuned.sum(1), weights="quadratic"))
    confidence, right = probs.max(1), probs.argmax(1) == grades
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum((bins == b).mean() * abs(right[bins == b].mean() - confidence[bins == b].mean())
              for b in range(15) if (bins == b).any())
    assert result["ece"] == pytest.approx(ece)
    patients = [dataloader.patient_id(n) for n in test["image"]]
    again = metrics.bootstrap_intervals(patients, grades, probs.argmax(1), probs[:, 2:].sum(1))
    for name in ("accuracy", "kappa", "referable_auc"):
        assert result["ci95"][name] == pytest.approx(again[name])
    assert result["ci95"]["accuracy"][0] <= result["accuracy"] <= result["ci95"]["accuracy"][1]


def test_the_validation_split_is_reported_with_thresholds_from_train(val_run):
    out, _, ckpt = val_run
    evaluate.main([str(ckpt), "--split", "val", "--workers", "0", "--quiet", "--figure-dir", str(out / "figures")])
    result = json.loads((out / "logs" / "resnet18_scratch_val_eval.json").read_text())
    assert result["split"] == "val" and result["thresholds_from"] == "train"
    assert result["referable"]["chosen_on"] in ("train", None)
    assert result["predictions"].endswith("resnet18_scratch_val_predictions.csv")
    assert result["reference_predictions"].endswith("resnet18_scratch_train_predictions.csv")
    assert (out / "logs" / "resnet18_scratch_eval.json").is_file()  # the test split's evaluation is still there


def test_the_training_log_holds_the_referable_auc(val_run):
    out, _, _ = val_run
    log = pd.read_csv(out / "logs" / "resnet18_scratch.csv")
    assert log.columns[-1] == "test_referable_auc"
    result = json.loads((out / "logs" / "resnet18_scratch_eval.json").read_text())
    best = json.loads((out / "logs" / "resnet18_scratch.json").read_text())["best_epoch"]
    assert log["test_referable_auc"].iloc[best - 1] == pytest.approx(result["referable"]["auc"], abs=1e-5)


def test_plot_draws_roc_and_reliability_and_the_summary_columns(val_run, tmp_path):
    out, _, _ = val_run
    plot.main([str(out / "logs"), "--out", str(tmp_path / "figures")])
    for name in ("roc_resnet18_scratch", "reliability_resnet18_scratch", "kappa_resnet18"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000
    result = json.loads((out / "logs" / "resnet18_scratch_eval.json").read_text())
    fig = plot.roc_figure(result, "")
    labels = [text for ax in fig.axes for text in ax.get_legend_handles_labels()[1]]
    assert f"ROC, AUC {result['referable']['auc']:.3f}" in labels[0]
    chosen = len(result["referable"]["operating_points"] or {})
    assert sum("point (chosen on val)" in label for label in labels) == chosen
    plot.plt.close(fig)
    summary = (tmp_path / "figures" / "summary.md").read_text()
    assert "| referable AUC | referable sens / spec (%) | patient referable AUC | tuned kappa |" in summary
    assert f"| {result['referable']['auc']:.3f} |" in summary and f"| {result['kappa_tuned']:.3f} |" in summary
