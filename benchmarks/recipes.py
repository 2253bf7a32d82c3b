"""Objectives and the two-eye stage side by side, on one dataset: the same data, split, architecture, epochs and
seeds for every recipe, each single-eye run followed by the two-eye stage on its best.pt.

    python benchmarks/recipes.py DATA_ROOT [--seeds 0 1 2] [--epochs 12] [--image-size 128] [--out F.json]

Every number comes from the repo's own commands (train.py, evaluate.py on best.pt, the test split) run in a
work folder; the table gives per recipe the mean over seeds and each seed's 95 % patient-bootstrap interval
(evaluate.py's), and the differences that decide between recipes as paired patient-bootstrap intervals: the
same resampled patients for both models of a seed, averaged over seeds (so the interval holds the test
split's noise, and the seeds' spread enters through their average). A difference whose interval holds 0 is
no difference. Runs already finished in the work folder are reused, so an interrupted benchmark goes on.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import layouts  # noqa: E402
import metrics  # noqa: E402
from runtime import UserError, exit_on_user_error, input_folder, write_text_atomic  # noqa: E402

METRICS = {"kappa": "kappa", "accuracy": "accuracy", "referable AUC": "referable_auc",
           "patient referable AUC": "patient_referable_auc"}
RESAMPLES = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_root", help="a dataset folder train.py reads (lab layout, EyePACS, ...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=["ce", "mse", "ordinal"])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--two-eye-epochs", type=int, default=30)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=None, help="work folder (default: /tmp/recipes_<data folder name>)")
    p.add_argument("--out", default=None, help="JSON of every figure (default: <work>/recipes.json)")
    return p


def run(command: list[str]) -> None:
    """A repo command; its own one-sentence error stops the benchmark with it."""
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"recipes.py: {' '.join(command[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")


def train_and_evaluate(args, work: Path, name: str, flags: list[str]) -> dict:
    """train.py with `flags` as run `name`, then evaluate.py on its best.pt; the evaluation's JSON (reused when
    the run already finished in the work folder)."""
    result = work / "logs" / f"{name}_eval.json"
    if not result.is_file():
        common = ["--run-name", name, "--checkpoint-dir", str(work / "checkpoints"), "--log-dir", str(work / "logs"),
                  "--workers", str(args.workers), "--quiet", "--resume", "auto"]
        run(["train.py", *flags, *common])
        run(["evaluate.py", str(work / "checkpoints" / name / "best.pt"), "--workers", str(args.workers), "--quiet",
             "--figure-dir", str(work / "figures")])
    return json.loads(result.read_text())


def single_eye_flags(args, loss: str, seed: int) -> list[str]:
    return ["--data-root", args.data_root, "--model", args.model, "--loss", loss, "--seed", str(seed),
            "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--optimizer", "adamw", "--lr", str(args.lr), "--val-fraction", str(args.val_fraction),
            "--select", "kappa"]


def figures(result: dict) -> dict:
    """The four figures of an evaluation, each with its patient-bootstrap interval."""
    patient = result["patient_referable"]
    values = {"kappa": result["kappa"], "accuracy": result["accuracy"], "referable_auc": result["referable"]["auc"],
              "patient_referable_auc": patient["auc"] if patient["applies"] else None}
    return {key: {"value": value, "ci95": result["ci95"].get(key)} for key, value in values.items()}


# --------------------------------------------------------------------------- paired differences
def predictions(result: dict) -> pd.DataFrame:
    return pd.read_csv(result["predictions"], dtype={"image": str})


def paired_difference(pairs: list[tuple[dict, dict]], seed: int = 0) -> dict:
    """The mean over seeds of (b - a) in kappa, accuracy and referable AUC, and its 95 % interval from resampling
    the test split's patients (the same draw for every seed's two models: they graded the same photos)."""
    frames = [(predictions(a), predictions(b)) for a, b in pairs]
    images = frames[0][0]["image"]
    patients = np.unique([layouts.patient_of(n) for n in images], return_inverse=True)[1]
    for a, b in frames:
        if not (a["image"].equals(images) and b["image"].equals(images)):
            raise UserError("recipes.py: the runs compared were evaluated on different test images")
    grades = frames[0][0]["grade"].to_numpy()
    referable = grades >= metrics.SCREENING["referable"]

    def score(frame: pd.DataFrame, weight: np.ndarray) -> np.ndarray:
        pred = frame["pred"].to_numpy()
        risk = (frame[[f"p{g}" for g in range(2, 5)]].sum(axis=1) if frame["p2"].notna().all() else frame["score"]).to_numpy()
        from sklearn.metrics import roc_auc_score

        return np.array([metrics.quadratic_kappa(grades, pred, weight), (weight * (pred == grades)).sum() / weight.sum(),
                         roc_auc_score(referable, risk, sample_weight=weight)])

    n = patients.max() + 1
    rng = np.random.default_rng(seed)
    observed = np.mean([score(b, np.ones(len(grades))) - score(a, np.ones(len(grades))) for a, b in frames], axis=0)
    draws = []
    for _ in range(RESAMPLES):
        weight = np.bincount(rng.integers(0, n, n), minlength=n)[patients].astype(float)
        if referable[weight > 0].all() or not referable[weight > 0].any():
            continue
        draws.append(np.mean([score(b, weight) - score(a, weight) for a, b in frames], axis=0))
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {name: {"difference": float(observed[i]), "ci95": [float(low[i]), float(high[i])]}
            for i, name in enumerate(("kappa", "accuracy", "referable_auc"))}


# --------------------------------------------------------------------------- the table
def cell(values: list[dict]) -> str:
    """Mean over seeds, then each seed's value [interval]."""
    numbers = [v["value"] for v in values if v["value"] is not None]
    if not numbers:
        return "-"
    seeds = "; ".join(f"{v['value']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" if v["ci95"] else f"{v['value']:.3f}"
                      for v in values if v["value"] is not None)
    return f"**{np.mean(numbers):.3f}** ({seeds})"


def table(results: dict) -> str:
    lines = ["| recipe | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for recipe, runs in results.items():
        lines.append(f"| {recipe} | " + " | ".join(cell([r[key] for r in runs]) for key in METRICS.values()) + " |")
    return "\n".join(lines)


def difference_table(differences: dict) -> str:
    lines = ["| comparison | kappa | accuracy | referable AUC |", "|---|---|---|---|"]
    for name, d in differences.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{d[k]['difference']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]"
            + ("" if d[k]["ci95"][0] > 0 or d[k]["ci95"][1] < 0 else " (no gap)")
            for k in ("kappa", "accuracy", "referable_auc")) + " |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    data = input_folder("DATA_ROOT", args.data_root)
    args.data_root = str(data.absolute())
    work = Path(args.work or f"/tmp/recipes_{data.name}")
    results, evaluations = {}, {}
    for loss in args.losses:
        for seed in args.seeds:
            name = f"{loss}_s{seed}"
            single = train_and_evaluate(args, work, name, single_eye_flags(args, loss, seed))
            best = work / "checkpoints" / name / "best.pt"
            double = train_and_evaluate(args, work, f"{name}_two_eye",
                                        ["--two-eye", str(best), "--seed", str(seed), "--epochs",
                                         str(args.two_eye_epochs), "--select", "kappa"])
            evaluations.setdefault(loss, []).append(single)
            evaluations.setdefault(f"{loss}, two-eye", []).append(double)
            print(f"{name}: kappa {single['kappa']:.3f}, two-eye {double['kappa']:.3f}", flush=True)
    results = {recipe: [figures(r) for r in runs] for recipe, runs in evaluations.items()}
    differences = {}
    for loss in args.losses:
        differences[f"{loss}: two-eye - single-eye"] = paired_difference(
            list(zip(evaluations[loss], evaluations[f"{loss}, two-eye"])))
    for loss in args.losses[1:]:
        differences[f"{loss} - {args.losses[0]} (single-eye)"] = paired_difference(
            list(zip(evaluations[args.losses[0]], evaluations[loss])))
    pairs = evaluations[args.losses[0]][0].get("patient_referable", {})
    header = (f"{data.name}: {args.model} from scratch at {args.image_size} px, {args.epochs} epochs (two-eye stage "
              f"{args.two_eye_epochs}), AdamW lr {args.lr}, best epoch by validation kappa, seeds "
              f"{', '.join(map(str, args.seeds))}; test split {evaluations[args.losses[0]][0]['num_images']} photos of "
              f"{pairs.get('patients')} patients ({pairs.get('with_both_eyes')} with both eyes)")
    text = "\n\n".join([header, table(results), difference_table(differences)])
    print(text)
    out = Path(args.out) if args.out else work / "recipes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps({"config": vars(args), "header": header, "results": results,
                                       "differences": differences, "table": text}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
