"""Fit the gradability check (fundus.QUALITY_MODEL) on public labelled photographs and measure it held out.

    python benchmarks/quality_check.py --drimdb DRIMDB_DIR --eyepacs EYEPACS_DIR [--rahim RAHIM_DIR]
        [--write quality_model.json]

DRIMDB_DIR holds Good/, Bad/, Outlier/ (DrimDB, Sevik et al. 2014); EYEPACS_DIR holds train/<id>_<eye>.jpeg,
trainLabels.csv (image,level) and eyeq_quality.csv (image,quality: EyeQ, Fu et al. 2019; 0 good, 1 usable,
2 reject). Fitted on fundus.quality_measures: the fundus limit (a margin over the highest colour-edge reading
of any fundus photo; outliers are not read) and the gradable part (a logistic regression, DrimDB good and EyeQ
good or usable against DrimDB bad and EyeQ reject). Printed: refusal rates out of fold (5 folds, grouped by
patient, everything chosen on the training folds only), cross-set (fitted on one set, measured on the other),
the ROC AUC of the score, the refusal rate by DR grade on all EyePACS photos, milliseconds per photo, and
how many gradable photos the check still passes shrunk to a short side of 16 to 128 px (fundus.MIN_SIDE).
RAHIM_DIR (the Kaggle layout: train/, trainLabels.csv) is measured only, by the model fitted on every DrimDB and
EyePACS photo: refusals, by DR grade, and those called not a fundus photo. --write fits on everything and
writes the model with this provenance. Deterministic: lbfgs from zeros, fixed folds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fundus  # noqa: E402
from runtime import Parser, UserError, atomic_write, check_output_file, exit_on_user_error  # noqa: E402

# The measures each part reads: few, and each one a ratio or a share (no pixel counts, no camera's colour),
# so that a model fitted on two cameras carries to others. log(value + offset) keeps zeros finite.
GRADABLE_MEASURES = {"sharpness": 0.01, "contrast": 0.05, "white": 0.01}
# The operating point, chosen on the photos fitted (never the ones measured): the highest score threshold
# that refuses at most this share of the gradable photos there that no fixed limit refused (a refused fundus
# photo costs more than a passed bad one: 0 puts it at the lowest score of any; 0.02 refused 7 of the 40 EyePACS
# eyes of grades 3-4 held out, 0 refuses 5).
REFUSE_GOOD = 0.0
# "Not a fundus photo" where the colour edges (fundus.chroma_edges) exceed this many times the highest of any
# fundus photo fitted, good or bad: one measure and a limit fitted on fundus photos alone, so a set without
# outliers fits it too. The highest reading differs by camera (DrimDB 0.0094, EyePACS 0.0098), and a fundus
# photo called no fundus is the worst wrong reason there is; DrimDB's outliers read 1.1-3.7 times it.
NOT_FUNDUS_MEASURE, NOT_FUNDUS_MARGIN = "chroma_edges", 1.5
FOLDS, SEED = 5, 0
# The set of --rahim: photos of a camera and population nothing was fitted or chosen on (but see BENCHMARKS.md:
# its three photos called no fundus by an earlier version are why the colour regression went), measured only.
UNSEEN = "rahim"


# --------------------------------------------------------------------------- the photos and their measures
def kaggle_photos(folder: Path, name: str, quality: dict) -> list[dict]:
    """The rows of a set in the Kaggle layout (train/<patient>_<eye>.jpeg, trainLabels.csv), labelled by
    `quality` (EyeQ's 0 good, 1 usable, 2 reject; "none" where it has no label)."""
    grades = pd.read_csv(folder / "trainLabels.csv").set_index("image")["level"].to_dict()
    return [{"path": p, "set": name, "patient": p.stem.split("_")[0], "grade": int(grades[p.stem]),
             "label": {0: "good", 1: "usable", 2: "reject"}.get(quality.get(p.stem), "none")}
            for p in fundus.image_files(folder / "train")]


def photos(drimdb: Path, eyepacs: Path, unseen: Path | None = None) -> pd.DataFrame:
    """One row per photo: path, set, patient, label (good, bad, outlier, usable, reject, none) and DR grade;
    unseen (set UNSEEN): a set measured, never fitted."""
    rows = [{"path": p, "set": "drimdb", "patient": p.stem, "label": {"Good": "good", "Bad": "bad",
                                                                          "Outlier": "outlier"}[c], "grade": -1}
            for c in ("Good", "Bad", "Outlier") for p in fundus.image_files(drimdb / c)]
    eyeq = pd.read_csv(eyepacs / "eyeq_quality.csv").set_index("image")["quality"].to_dict()
    rows += kaggle_photos(eyepacs, "eyepacs", eyeq)
    if unseen is not None:
        rows += kaggle_photos(unseen, UNSEEN, {})
    return pd.DataFrame(rows)


def measures_table(table: pd.DataFrame, cache: Path | None) -> pd.DataFrame:
    """Every photo's measures (and the time the check took), read from cache when it holds them."""
    if cache is not None and cache.is_file():
        cached = pd.read_csv(cache)
        if list(cached["path"]) == [str(p) for p in table["path"]]:
            return table.join(cached.drop(columns="path"))
    rows = []
    for path in table["path"]:
        with Image.open(path) as img:
            img.load()
            photo = fundus.to_rgb(img)
        field = fundus.judged_field(photo)
        start = time.perf_counter()  # the check's own cost: the field is found for the crop anyway
        rows.append({**fundus.quality_measures(photo, field), "ms": 1e3 * (time.perf_counter() - start)})
    found = pd.DataFrame(rows)
    if cache is not None:
        with atomic_write(cache, "w") as f:
            found.assign(path=[str(p) for p in table["path"]]).to_csv(f, index=False)
    return table.join(found)


# --------------------------------------------------------------------------- fitting
def fit_part(table: pd.DataFrame, measures: dict, positive: np.ndarray) -> dict:
    """A logistic regression on log(measure + offset), standardised, classes weighted equally; as the JSON
    fundus.probability reads (gradable_mean: the gradable class's mean input, for weakest_measure)."""
    x = np.log(table[list(measures)].to_numpy(float) + np.array(list(measures.values())))
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.clip((x - mean) / scale, -fundus.MAX_Z, fundus.MAX_Z)
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(z, positive)
    return {"measures": list(measures), "offsets": list(measures.values()), "mean": mean.tolist(),
            "scale": scale.tolist(), "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]),
            "gradable_mean": z[positive].mean(0).tolist()}


def fit_fundus(table: pd.DataFrame) -> dict:
    """The limit over which a photo is called not a fundus photo (see NOT_FUNDUS_MARGIN), from the fundus
    photos of `table` (outliers are not needed, nor read)."""
    highest = float(table.loc[table["label"] != "outlier", NOT_FUNDUS_MEASURE].max())
    return {"measure": NOT_FUNDUS_MEASURE, "limit": NOT_FUNDUS_MARGIN * highest, "highest_fundus": highest}


def fit(table: pd.DataFrame) -> dict:
    """The fundus limit, the gradable part and the operating point, from the photos of `table` (see
    NOT_FUNDUS_MARGIN, REFUSE_GOOD); outliers are not needed."""
    model = {"fundus": fit_fundus(table)}
    rated = table[table["label"].isin(["good", "usable", "bad", "reject"])]
    gradable = rated["label"].isin(["good", "usable"]).to_numpy()
    model["gradable"] = fit_part(rated, GRADABLE_MEASURES, gradable)
    scores = np.array([fundus.verdict(m, 0.0, model)[2] for m in rated.to_dict("records")])
    model["min_quality"] = float(np.quantile(scores[gradable & (scores > 0)], REFUSE_GOOD))
    return model


def verdicts(model: dict, table: pd.DataFrame) -> pd.DataFrame:
    """Score, refused and reason of every photo under `model`."""
    out = [fundus.verdict(m, model=model) for m in table.to_dict("records")]
    return pd.DataFrame({"score": [o[2] for o in out], "refused": [not o[0] for o in out],
                         "reason": [o[1].split(":")[0] for o in out]}, index=table.index)


def out_of_fold(table: pd.DataFrame) -> pd.DataFrame:
    """Every photo's verdict by a model fitted on the folds without its patient."""
    strata = table["set"] + table["label"]
    parts = []
    for train, test in StratifiedGroupKFold(FOLDS, shuffle=True, random_state=SEED).split(table, strata,
                                                                                           table["patient"]):
        parts.append(verdicts(fit(table.iloc[train]), table.iloc[test]))
    return pd.concat(parts).loc[table.index]


def cross_set(table: pd.DataFrame, fit_on: str) -> pd.DataFrame:
    """Verdicts on the other set by a model fitted on `fit_on` alone."""
    return verdicts(fit(table[table["set"] == fit_on]), table[table["set"] != fit_on])


# --------------------------------------------------------------------------- figures
def refused(rows: pd.DataFrame) -> str:
    n, k = len(rows), int(rows["refused"].sum())
    return f"{k} of {n} ({k / n:.0%})" if n else "-"


def figures(table: pd.DataFrame, result: pd.DataFrame) -> dict:
    """The issue's targets as measured on `result` (verdicts of the photos in it)."""
    t = table.loc[result.index].join(result)
    sub = lambda s, label: t[(t["set"] == s) & (t["label"] == label)]  # noqa: E731
    out = {}
    for s, label in (("drimdb", "outlier"), ("drimdb", "bad"), ("drimdb", "good"), ("eyepacs", "good"),
                     ("eyepacs", "usable"), ("eyepacs", "reject")):
        if len(sub(s, label)):
            out[f"{s} {label}"] = refused(sub(s, label))
    fundi = t[t["label"] != "outlier"]
    out["fundus photos called not a fundus photo"] = int((fundi["reason"] == fundus.NOT_FUNDUS).sum())
    outliers = sub("drimdb", "outlier")
    if len(outliers):
        out["outliers called not a fundus photo"] = int((outliers["reason"] == fundus.NOT_FUNDUS).sum())
    # the fixed limit's room (fundus.MAX_DOTS): what the fundus photos come to, and what the outliers refused by it
    out["most specular glints on a fundus photo"] = int(fundi["specular_dots"].max())
    if len(outliers):
        out[f"outliers with more than {fundus.MAX_DOTS} specular glints"] = \
            int((outliers["specular_dots"] > fundus.MAX_DOTS).sum())
    for s, positive, negative in (("drimdb", ["good"], ["bad", "outlier"]), ("eyepacs", ["good"], ["reject"])):
        rows = t[(t["set"] == s) & t["label"].isin(positive + negative)]
        if rows["label"].isin(positive).any() and rows["label"].isin(negative).any():
            out[f"AUC {s} {'+'.join(positive)} vs {'+'.join(negative)}"] = round(float(
                roc_auc_score(rows["label"].isin(positive), rows["score"])), 3)
    eyepacs = t[t["set"] == "eyepacs"]
    for name, grades in (("0-1", (0, 1)), ("2", (2,)), ("3-4", (3, 4))):
        rows = eyepacs[eyepacs["grade"].isin(grades)]
        if len(rows):
            out[f"eyepacs all, DR grade {name}"] = refused(rows)
    reasons = t[t["refused"]].groupby(["set", "label", "reason"]).size()
    out["reasons"] = {f"{s} {label}: {r}": int(n) for (s, label, r), n in reasons.items()}
    return out


def unseen_figures(model: dict, rows: pd.DataFrame) -> dict:
    """What the model fitted on every DrimDB and EyePACS photo does to a set it never saw: refusals, those
    called not a fundus photo, refusals by DR grade, the reasons, and the not-fundus measures' room."""
    t = rows.join(verdicts(model, rows))
    out = {"refused": refused(t), "called not a fundus photo": int((t["reason"] == fundus.NOT_FUNDUS).sum())}
    for grade, by_grade in t.groupby("grade"):
        out[f"DR grade {grade}"] = refused(by_grade)
    out["reasons"] = {reason: int(n) for reason, n in t[t["refused"]].groupby("reason").size().items()}
    out["most specular glints"] = int(t["specular_dots"].max())
    out["highest colour edges, of the limit"] = round(float(t[model["fundus"]["measure"]].max()
                                                            / model["fundus"]["limit"]), 2)
    return out


# The short sides (px) the gradable photos are shrunk to for fundus.MIN_SIDE, the smallest photo the check judges.
SMALL_SIDES = (16, 32, 48, 64, 96, 128)


def small_sides(model: dict, rows: pd.DataFrame) -> dict:
    """How many of `rows` (photos the check passes at their own size) it still passes, by the fitted verdict
    alone (fundus.assess refuses anything under fundus.MIN_SIDE as too small before it), shrunk to each of
    SMALL_SIDES on the short side (Lanczos, as a camera's small export is), and why the others failed."""
    passed = {side: 0 for side in SMALL_SIDES}
    reasons = {side: {} for side in SMALL_SIDES}
    for path in rows["path"]:
        with Image.open(path) as img:
            img.load()
            photo = fundus.to_rgb(img)
        for side in SMALL_SIDES:
            k = side / min(photo.size)
            small = photo.resize((max(1, round(photo.width * k)), max(1, round(photo.height * k))), Image.LANCZOS)
            ok, reason, _ = fundus.verdict(fundus.quality_measures(small, fundus.judged_field(small)), model=model)
            passed[side] += ok
            if not ok:
                key = reason.split(":")[0]
                reasons[side][key] = reasons[side].get(key, 0) + 1
    return {f"{side} px": f"{passed[side]} of {len(rows)}" + (f" {reasons[side]}" if reasons[side] else "")
            for side in SMALL_SIDES}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drimdb", type=Path, required=True, help="DrimDB folder with Good/, Bad/, Outlier/")
    p.add_argument("--eyepacs", type=Path, required=True,
                   help="folder with train/, trainLabels.csv and eyeq_quality.csv")
    p.add_argument("--rahim", type=Path, default=None, metavar="DIR",
                   help="also measure (never fit) a set in the Kaggle layout, train/ and trainLabels.csv: "
                        "rahim_pairs (Rahim 2025), or your own camera's graded photos (default none)")
    p.add_argument("--cache", type=Path, default=None,
                   help="CSV of measures to reuse between runs; delete it when fundus.py's measures change "
                        "(default none)")
    p.add_argument("--write", type=Path, default=None, metavar="JSON",
                   help="fit on every photo and write the model there (default: measure only)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON (default none)")
    return p.parse_args(argv)


def describe(table: pd.DataFrame) -> str:
    """The photos fitted, in words, counted."""
    count = table.groupby(["set", "label"]).size().to_dict()
    drimdb = "/".join(str(count.get(("drimdb", label), 0)) for label in ("good", "bad", "outlier"))
    eyepacs = int((table["set"] == "eyepacs").sum())
    eyeq = sum(count.get(("eyepacs", label), 0) for label in ("good", "usable", "reject"))
    return (f"DrimDB Good/Bad/Outlier (Sevik et al. 2014; {drimdb} photos), EyePACS Kaggle train sample "
            f"({eyepacs} photos) with EyeQ quality labels (Fu et al. 2019) for {eyeq}")


MODEL_KIND = "a gradability model of benchmarks/quality_check.py"
FIGURES_KIND = "the figures of benchmarks/quality_check.py"
CACHE_KIND = "a measures cache of benchmarks/quality_check.py"


def check_inputs(args: argparse.Namespace) -> None:
    """One sentence naming the flag and what is missing, before any photo is read; and no output over a file
    of another kind (runtime.check_output_file)."""
    for flag, folder, needs in (("--drimdb", args.drimdb, ("Good/", "Bad/", "Outlier/")),
                                ("--eyepacs", args.eyepacs, ("train/", "trainLabels.csv", "eyeq_quality.csv")),
                                ("--rahim", args.rahim, ("train/", "trainLabels.csv"))):
        if folder is None:
            continue
        if not folder.is_dir():
            raise UserError(f"{flag} {folder} is not a folder")
        missing = [name for name in needs if not (folder / name.rstrip("/")).exists()]
        if missing:
            raise UserError(f"{flag} {folder} has no {', '.join(missing)} (it needs {', '.join(needs)})")
    read = [args.eyepacs / "trainLabels.csv", args.eyepacs / "eyeq_quality.csv"]
    read += [args.rahim / "trainLabels.csv"] if args.rahim is not None else []
    for flag, path, kind in (("--write", args.write, MODEL_KIND), ("--json", args.json, FIGURES_KIND),
                             ("--cache", args.cache, CACHE_KIND)):
        if path is not None:
            check_output_file(flag, path, kind, read)


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    check_inputs(args)
    every = measures_table(photos(args.drimdb, args.eyepacs, args.rahim), args.cache)
    table = every[every["set"] != UNSEEN]
    result = {"photos": len(table), "held_out": figures(table, out_of_fold(table)),
              "fit_drimdb_measured_eyepacs": figures(table, cross_set(table, "drimdb")),
              "fit_eyepacs_measured_drimdb": figures(table, cross_set(table, "eyepacs")),
              "ms_per_photo_median": round(float(table["ms"].median()), 2),
              "ms_per_photo_p95": round(float(table["ms"].quantile(0.95)), 2)}
    model = fit(table)
    unseen = every[every["set"] == UNSEEN]
    if args.rahim is not None:
        result["fit_all_measured_rahim"] = unseen_figures(model, unseen)
    # the gradable photos, shrunk: fitted on (DrimDB good, EyeQ good or usable), and those of --rahim the
    # check passes at their own size (never fitted on)
    gradable = table[table["label"].isin(["good", "usable"])]
    result["gradable photos shrunk, passed"] = small_sides(model, gradable)
    if len(unseen):
        result["rahim photos passed at their size, shrunk, passed"] = small_sides(
            model, unseen[~verdicts(model, unseen)["refused"]])
    print(json.dumps(result, indent=1))
    if args.json:
        with atomic_write(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    if args.write:  # the same file with or without --rahim: nothing of that set enters it
        model["provenance"] = {
            "script": "benchmarks/quality_check.py --drimdb DIR --eyepacs DIR --write quality_model.json",
            "data": describe(table),
            "held_out": result["held_out"],
            "cross_set": {k: result[k] for k in ("fit_drimdb_measured_eyepacs", "fit_eyepacs_measured_drimdb")}}
        with atomic_write(args.write, "w") as f:
            f.write(json.dumps(model, indent=1) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
