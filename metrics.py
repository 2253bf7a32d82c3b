"""The numbers a DR grader is judged by, from its predicted grades, scores and probabilities alone (what
objectives.Objective.numbers makes of any objective's outputs).

- the lab's: accuracy, quadratic weighted kappa (the Kaggle 2015 metric), macro F1, the per-grade table
  and the confusion matrix (scikit-learn);
- screening, as clinics decide: referable DR (grade >= 2) and vision-threatening DR (grade >= 3) as yes/no,
  ROC AUC of the objective's screening score, sensitivity/specificity/PPV/NPV of the predicted grade, and two
  operating points (Gulshan et al., JAMA 2016: sensitivity >= 97.5 %, specificity >= 98 %) whose score
  thresholds are chosen on another split; and by patient, a patient referred when either eye is;
- the Kaggle winners' decoding: the continuous grade cut by four thresholds tuned for kappa on another split;
- trust: expected calibration error (Guo et al. 2017; objectives with probabilities) and 95 % bootstrap
  intervals resampling patients.

evaluate.py computes them (and writes the predictions they follow from), train.py logs the referable AUC
each epoch, plot.py draws what the JSON holds. Nothing here touches a model.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (accuracy_score, cohen_kappa_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)

from runtime import NUM_GRADES

GRADES = list(range(NUM_GRADES))
# The two yes/no questions of screening: referable DR (moderate or worse), vision-threatening DR (severe or
# worse); the score of each is the probability mass at or above its grade.
SCREENING = {"referable": 2, "vision_threatening": 3}
# Gulshan et al. 2016's operating points on EyePACS-1: a high-sensitivity one (97.5 % sensitivity, 93.4 %
# specificity) and a high-specificity one (90.3 % / 98.1 %).
TARGET_SENSITIVITY, TARGET_SPECIFICITY = 0.975, 0.98
# A target is reachable on a split only if the split can miss one case and still meet it: with fewer than
# 1 / (1 - 0.975) = 40 positive cases the only sensitivity >= 97.5 % is 100 %, and the point chosen is the
# lowest positive score, not a 97.5 % point (the demo's val split, 8 referable eyes, chose one that gave
# 83.6 % on the test split). Likewise 1 / (1 - 0.98) = 50 negative cases for the specificity target.
MIN_POSITIVES, MIN_NEGATIVES = round(1 / (1 - TARGET_SENSITIVITY)), round(1 / (1 - TARGET_SPECIFICITY))
ECE_BINS = 15  # Guo et al. 2017
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


# --------------------------------------------------------------------------- the lab's numbers
def grading_metrics(grades, preds) -> dict:
    """Accuracy, quadratic weighted kappa, macro F1, per-grade precision/recall/F1/support and the confusion
    matrix over the five grades, all from scikit-learn."""
    grades, preds = np.asarray(grades), np.asarray(preds)
    precision, recall, f1, support = precision_recall_fscore_support(grades, preds, labels=GRADES, zero_division=0)
    with warnings.catch_warnings():
        # a split (or a batch of predictions) holding one grade leaves kappa undefined: reported as 0, and
        # train.py says once in words which split holds one grade, instead of a warning every epoch
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = cohen_kappa_score(grades, preds, weights="quadratic", labels=GRADES)
    return {
        "accuracy": float(accuracy_score(grades, preds)),
        "kappa": 0.0 if np.isnan(kappa) else float(kappa),
        "macro_f1": float(f1_score(grades, preds, labels=GRADES, average="macro", zero_division=0)),
        "per_class": {str(g): {"precision": float(precision[g]), "recall": float(recall[g]), "f1": float(f1[g]),
                               "support": int(support[g])} for g in GRADES},
        "confusion_matrix": confusion_matrix(grades, preds, labels=GRADES).tolist(),
    }


def quadratic_kappa(grades: np.ndarray, preds: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Cohen's kappa with quadratic weights over the five grades, optionally with a weight per image (the
    bootstrap's counts): scikit-learn's formula on a confusion matrix made with np.bincount, fast enough
    to run thousands of times (threshold tuning, the bootstrap). 0 where kappa is undefined."""
    observed = np.bincount(grades * NUM_GRADES + preds, weights=weight,
                           minlength=NUM_GRADES * NUM_GRADES).reshape(NUM_GRADES, NUM_GRADES).astype(float)
    total = observed.sum()
    if total == 0:
        return 0.0
    expected = np.outer(observed.sum(1), observed.sum(0)) / total
    k = np.arange(NUM_GRADES)
    penalty = (k[:, None] - k[None, :]) ** 2
    denominator = (penalty * expected).sum()
    return float(1 - (penalty * observed).sum() / denominator) if denominator > 0 else 0.0


# --------------------------------------------------------------------------- screening
def rates(positive: np.ndarray, called: np.ndarray) -> dict:
    """Sensitivity, specificity, PPV and NPV of yes/no calls (None where a denominator is 0)."""
    tp, fn = int((called & positive).sum()), int((~called & positive).sum())
    tn, fp = int((~called & ~positive).sum()), int((called & ~positive).sum())
    share = lambda a, b: a / (a + b) if a + b else None  # noqa: E731
    return {"sensitivity": share(tp, fn), "specificity": share(tn, fp), "ppv": share(tp, fp), "npv": share(tn, fn)}


def operating_thresholds(positive: np.ndarray, score: np.ndarray, split: str) -> tuple[dict, dict]:
    """The score thresholds of the two operating points, chosen on these (another split's) images, and for a
    point the split cannot choose, the sentence saying why (too few cases: MIN_POSITIVES, MIN_NEGATIVES).
    high_sensitivity: the highest threshold whose sensitivity reaches TARGET_SENSITIVITY (the best specificity
    there); high_specificity: the lowest whose specificity reaches TARGET_SPECIFICITY (the best sensitivity
    there). Where the split meets both targets at once, these two cross; then each is the other's (both still
    meet both targets there), so that the high-sensitivity point never lies above the high-specificity one.
    A score at or above a threshold is called positive."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    unset = {}
    if n_pos < MIN_POSITIVES:
        unset["high_sensitivity"] = (f"not chosen: the {split} split has {n_pos} positive cases, and a point at "
                                     f"{TARGET_SENSITIVITY:.1%} sensitivity needs at least {MIN_POSITIVES}")
    if n_neg < MIN_NEGATIVES:
        unset["high_specificity"] = (f"not chosen: the {split} split has {n_neg} negative cases, and a point at "
                                     f"{TARGET_SPECIFICITY:.0%} specificity needs at least {MIN_NEGATIVES}")
    if not n_pos or not n_neg:
        return {}, unset
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    # roc_curve's first threshold is +inf, nothing called positive; a JSON number just above any score says so
    # (above 1 for a probability, above the highest regressed grade for a regression)
    thresholds = np.minimum(thresholds, np.nextafter(max(1.0, float(score.max())), np.inf))
    sensitive = float(thresholds[np.flatnonzero(tpr >= TARGET_SENSITIVITY)[0]])
    specific = float(thresholds[np.flatnonzero(1 - fpr >= TARGET_SPECIFICITY)[-1]])
    points = dict(zip(("high_sensitivity", "high_specificity"), sorted((sensitive, specific))))
    return {name: t for name, t in points.items() if name not in unset}, unset


def screening_metrics(grades: np.ndarray, preds: np.ndarray, score: np.ndarray, grade: int, chosen: dict | None,
                      chosen_on: str | None, unset: dict | None = None) -> dict:
    """One screening question (grade or worse?) on these images: AUC of its score and the ROC curve, the
    sensitivity/specificity/PPV/NPV of the predicted grades (`preds`, the objective's), and the operating points
    at thresholds chosen elsewhere (`chosen`, from operating_thresholds on the split named `chosen_on`; `unset`:
    why a point could not be chosen there)."""
    positive = grades >= grade
    out = {"grade_at_least": grade, "positives": int(positive.sum()), "negatives": int((~positive).sum()),
           "auc": None, **rates(positive, preds >= grade), "operating_points": None,
           "operating_points_unset": unset or {}, "chosen_on": chosen_on, "roc": None}
    if positive.any() and not positive.all():
        out["auc"] = float(roc_auc_score(positive, score))
        fpr, tpr, _ = roc_curve(positive, score)
        out["roc"] = {"fpr": np.round(fpr, 5).tolist(), "tpr": np.round(tpr, 5).tolist()}
    if chosen:
        out["operating_points"] = {name: point(positive, score, t) for name, t in chosen.items()}
    return out


def point(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """An operating point: its threshold, and the sensitivity and specificity of calling score >= it."""
    called = rates(positive, score >= threshold)
    return {"threshold": threshold, "sensitivity": called["sensitivity"], "specificity": called["specificity"]}


# --------------------------------------------------------------------------- kappa-tuned grading
def cut(expected: np.ndarray, thresholds) -> np.ndarray:
    """The grade as the number of thresholds the continuous grade (objectives.Objective.score) exceeds."""
    return (expected[:, None] > np.asarray(thresholds)[None, :]).sum(axis=1)


def tune_thresholds(grades: np.ndarray, expected: np.ndarray, passes: int = 8, candidates: int = 200) -> list:
    """Four ascending cut points maximising quadratic kappa on these (another split's) images: coordinate
    ascent from 0.5, 1.5, 2.5, 3.5, each cut in turn set to the best of `candidates` quantiles of the expected
    grade between its neighbours, until a pass changes nothing. Deterministic."""
    thresholds = [0.5, 1.5, 2.5, 3.5]
    best = quadratic_kappa(grades, cut(expected, thresholds))
    grid = np.unique(np.quantile(expected, np.linspace(0, 1, candidates)))
    for _ in range(passes):
        changed = False
        for i in range(4):
            low = thresholds[i - 1] if i else -np.inf
            high = thresholds[i + 1] if i < 3 else np.inf
            for value in grid[(grid > low) & (grid < high)]:
                trial = thresholds[:i] + [float(value)] + thresholds[i + 1:]
                kappa = quadratic_kappa(grades, cut(expected, trial))
                if kappa > best + 1e-12:
                    best, thresholds, changed = kappa, trial, True
        if not changed:
            break
    return thresholds


# --------------------------------------------------------------------------- trust
def calibration(grades: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (Guo et al. 2017): the top-class probability in `bins` equal-width bins,
    the sum over bins of (the bin's share of images) x |its accuracy - its mean confidence|; and the bins
    themselves for a reliability diagram."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == grades
    index = np.minimum((confidence * bins).astype(int), bins - 1)  # (k/bins, (k+1)/bins], 1.0 in the last
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
            ece += members.mean() * abs(accuracy - mean_confidence)
        else:
            accuracy = mean_confidence = None
        table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": int(members.sum()), "accuracy": accuracy,
                      "confidence": mean_confidence})
    return {"ece": float(ece), "bins": table}


def patient_table(patients: list[str], grades: np.ndarray, preds: np.ndarray, score: np.ndarray,
                  grade: int = SCREENING["referable"]) -> dict:
    """Screening by patient: a patient is referred when either eye is (the worst eye decides, as a screening
    programme refers people, not photos). Per patient: positive when any eye's true grade is `grade` or worse,
    called when any eye's predicted grade is, scored by the highest score of the eyes; `index` maps each image
    to its patient, `eyes` counts each patient's images."""
    ids, index = np.unique(np.asarray(patients), return_inverse=True)
    positive = np.zeros(len(ids), bool)
    called = np.zeros(len(ids), bool)
    best = np.full(len(ids), -np.inf)
    np.logical_or.at(positive, index, grades >= grade)
    np.logical_or.at(called, index, preds >= grade)
    np.maximum.at(best, index, score)
    return {"index": index, "positive": positive, "called": called, "score": best,
            "eyes": np.bincount(index, minlength=len(ids))}


def patient_screening(patients: list[str], grades: np.ndarray, preds: np.ndarray, score: np.ndarray) -> dict:
    """Referable DR by patient (patient_table): the counts, AUC of the patient's score and the rates of the
    predicted grades; `applies` False (with the reason) where no patient has two photos in the split, so that
    the figures would only repeat the per-image ones."""
    table = patient_table(patients, grades, preds, score)
    both = int((table["eyes"] >= 2).sum())
    out = {"patients": len(table["eyes"]), "with_both_eyes": both, "with_one_eye": int((table["eyes"] == 1).sum()),
           "positives": int(table["positive"].sum()), "negatives": int((~table["positive"]).sum()), "auc": None,
           **rates(table["positive"], table["called"]), "applies": both > 0, "why_not": None}
    if not both:
        out["why_not"] = "no patient has both eyes in this split (each photo is its own patient here)"
    if table["positive"].any() and not table["positive"].all():
        out["auc"] = float(roc_auc_score(table["positive"], table["score"]))
    return out


def bootstrap_intervals(patients: list[str], grades: np.ndarray, preds: np.ndarray, referable_score: np.ndarray,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """95 % percentile intervals of accuracy, quadratic kappa and referable AUC, and of the patient-level
    referable AUC, sensitivity and specificity, resampling patients with replacement (both eyes of a patient
    go together: they are not independent), `resamples` times from a fixed seed. A patient drawn k times
    weighs k."""
    by_patient = patient_table(patients, grades, preds, referable_score)
    patient, n = by_patient["index"], len(by_patient["eyes"])
    rng = np.random.default_rng(seed)
    referable = grades >= SCREENING["referable"]
    values = {name: [] for name in ("accuracy", "kappa", "referable_auc", "patient_referable_auc",
                                    "patient_sensitivity", "patient_specificity")}
    positive, called = by_patient["positive"], by_patient["called"]
    for _ in range(resamples):
        drawn_patients = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        weight = drawn_patients[patient]
        values["accuracy"].append(float((weight * (preds == grades)).sum() / weight.sum()))
        values["kappa"].append(quadratic_kappa(grades, preds, weight))
        drawn = weight > 0
        if referable[drawn].any() and not referable[drawn].all():
            values["referable_auc"].append(float(roc_auc_score(referable, referable_score, sample_weight=weight)))
        chosen = drawn_patients > 0
        if positive[chosen].any() and not positive[chosen].all():
            values["patient_referable_auc"].append(float(roc_auc_score(positive, by_patient["score"],
                                                                       sample_weight=drawn_patients)))
        for name, group, hit in (("patient_sensitivity", positive, called), ("patient_specificity", ~positive, ~called)):
            total = (drawn_patients * group).sum()
            if total:
                values[name].append(float((drawn_patients * (group & hit)).sum() / total))
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None
            for name, v in values.items()}


# --------------------------------------------------------------------------- all of them
CALIBRATION_NOT_APPLICABLE = ("not applicable: a regression outputs a grade, not probabilities, so there is no "
                              "confidence to calibrate (its score's error is the MSE, logged as the loss)")


def clinical_metrics(grades: np.ndarray, numbers: dict, patients: list[str],
                     reference: tuple[np.ndarray, dict, str] | None) -> dict:
    """Screening (per image, and per patient where the split holds patients with both eyes), kappa-tuned
    grading, calibration and intervals of one split's predictions. `numbers`: objectives.Objective.numbers of
    the split's summaries (grade, score, screening scores, probabilities or None); `reference`: (grades, numbers,
    split name) of the split that operating points and thresholds are chosen on, never the split reported here;
    None leaves them out."""
    out, preds = {}, numbers["grade"]
    for name, grade in SCREENING.items():
        chosen, unset = operating_thresholds(reference[0] >= grade, reference[1]["screening"][grade],
                                             reference[2]) if reference is not None else (None, None)
        out[name] = screening_metrics(grades, preds, numbers["screening"][grade], grade, chosen,
                                      reference[2] if reference else None, unset)
    referable_score = numbers["screening"][SCREENING["referable"]]
    out["patient_referable"] = patient_screening(patients, grades, preds, referable_score)
    if reference is not None:
        thresholds = tune_thresholds(reference[0], reference[1]["score"])
        tuned = cut(numbers["score"], thresholds)
        out.update(thresholds=thresholds, thresholds_from=reference[2],
                   kappa_tuned=quadratic_kappa(grades, tuned), accuracy_tuned=float((tuned == grades).mean()))
    else:
        out.update(thresholds=None, thresholds_from=None, kappa_tuned=None, accuracy_tuned=None)
    if numbers["probs"] is not None:
        calibrated = calibration(grades, numbers["probs"])
        out.update(ece=calibrated["ece"], calibration=calibrated["bins"], calibration_note=None)
    else:
        out.update(ece=None, calibration=None, calibration_note=CALIBRATION_NOT_APPLICABLE)
    out.update(ci95=bootstrap_intervals(patients, grades, preds, referable_score),
               bootstrap={"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                          "patients": len(set(patients))})
    return out
