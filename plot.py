"""Figures and a summary table from the training and evaluation logs.

    python plot.py [LOGDIR] [--out DIR]

reads LOGDIR/<run>.csv + <run>.json (train.py) and LOGDIR/*_eval.json (evaluate.py), and writes into
DIR, per architecture, the lab's accuracy comparison, loss and kappa curves; one confusion matrix per
evaluation; and summary.md, the results table.
"""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # training machines have no display; must come before pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from runtime import (AUC_COLUMN, GRADE_NAMES, LOG_COLUMNS, Parser, UserError, atomic_write,  # noqa: E402
                     check_output, check_output_file, exit_on_user_error, write_text_atomic)

ARCH_ORDER = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
DPI = 150
RC = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10}
# (split, pretrained) -> colour, line style, marker. The lab's figure marks the w/o-pretraining lines;
# colours differ too, so every line stays apart even in greyscale print or with markers thinned out.
LINE_STYLE = {
    ("train", True): ("tab:blue", "-", None), ("test", True): ("tab:orange", "-", None),
    ("val", True): ("tab:purple", ":", None), ("train", False): ("tab:green", "-", "o"),
    ("test", False): ("tab:red", "-", "s"), ("val", False): ("tab:brown", ":", "^"),
}
VAL_FOOTNOTE = ("Runs marked * held out a validation split: their best epoch is the one with the best "
                "validation accuracy (or kappa, with --select kappa), and the test accuracy shown is the one at "
                "that epoch.")
OTHER_FOOTNOTE = ("Rows under the runs' own are one evaluation each (evaluate.py), on the split in the split "
                  "column (all: every gradable image of the dataset), with the checkpoint's epoch under epochs.")
ON_FOOTNOTE = ("Rows 'RUN on DATASET' evaluate the run's checkpoint on another dataset (other names or grades than "
               "the run's splits; a moved copy of its own data is not another dataset): accuracy, kappa and macro "
               "F1 there, not on the run's test split.")
EXPORTED_FOOTNOTE = ("Rows 'RUN (ONNX ...)' evaluate the file export.py made of the run's checkpoint, run in "
                     "onnxruntime. Cost: milliseconds per image at batch 1 / 32 where the evaluation ran (random input after a "
                     "warm-up; the checkpoint's row times PyTorch), parameters, and the size of the file evaluated.")


def display_name(arch: str) -> str:
    return "ResNet" + arch[len("resnet"):] if arch.lower().startswith("resnet") else arch


def recipe(record: dict) -> str:
    """What a run or evaluation trained: its objective, and whether it is the two-eye model (a run's JSON or an
    evaluation's; records from before objectives are ce)."""
    objective = record.get("objective") or (record.get("config") or {}).get("loss") or "ce"
    return f"{objective}, two-eye" if record.get("two_eye") else objective


def group_of(arch: str, what: str) -> str:
    """The figures a run is drawn in: <arch> for the lab's recipe (ce, one eye), else <arch>_<recipe> without the
    lab's objective: resnet18_mse, resnet18_two_eye (ce), resnet18_ordinal_two_eye."""
    parts = what.split(", ")
    return "_".join([arch, *(p.replace("-", "_") for p in parts[parts[0] == "ce":])])


def group_title(group: str, runs: list[dict]) -> str:
    mine = next(r for r in runs if r["group"] == group)
    return display_name(mine["arch"]) + ("" if mine["recipe"] == "ce" else f", {mine['recipe']}")


def _arch_order(arch: str):
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), arch)


def _one_line(err: Exception) -> str:
    # pandas' parser messages end in newlines; the user gets exactly one line
    return " ".join(str(err).split())


# ---------------------------------------------------------------- reading the logs

def visible(folder, pattern: str) -> list[Path]:
    """The files matching pattern, sorted, without hidden ones (a writer's temporary files, macOS's ._ files)."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith("."))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({_one_line(err)}); rerun the script that wrote it "
                        "or move the file out of the log folder.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not the object train.py or "
                        "evaluate.py writes; move it out of the log folder.")
    return data


def _read_history(csv_path: Path) -> pd.DataFrame:
    try:
        history = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{csv_path} is not a readable CSV ({_one_line(err)}); rerun the training "
                        "or move the run's files out of the log folder.") from None
    missing = [c for c in LOG_COLUMNS if c not in history.columns]
    if missing:
        raise UserError(f"{csv_path} lacks the column(s) {', '.join(missing)}, so it is not a "
                        "per-epoch log from train.py.")
    if history.empty:  # a header and no rows: the run has not finished an epoch (its columns read as text)
        return history
    cut = history[list(LOG_COLUMNS)].isna().any(axis=1)
    if cut.any():  # a row with empty cells (a file cut mid-row, a copy that stopped) is not an epoch
        lines = ", ".join(str(i + 2) for i in history.index[cut][:3])
        print(f"plot.py: {csv_path}: line {lines} lacks cells, not counted as an epoch")
        history = history[~cut]
        if history.empty:
            return history
    text = [c for c in history.columns if not pd.api.types.is_numeric_dtype(history[c])]
    if text:
        raise UserError(f"{csv_path} holds non-numbers in the column(s) {', '.join(text)}.")
    # a resumed run may log an epoch twice (crash after the row, resume from an older checkpoint);
    # the later row belongs to the weights that carried on
    history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
    return history.reset_index(drop=True)


def load_runs(logdir) -> list[dict]:
    """One dict per <run>.json with its CSV: name, arch, pretrained, json, history, path, mtime."""
    logdir = Path(logdir)
    if logdir.exists() and not logdir.is_dir():
        raise UserError(f"LOGDIR {logdir} is a file, expected a folder: the one train.py wrote <run>.csv and "
                        "<run>.json into (its --log-dir, default logs).")
    if not logdir.is_dir():
        raise UserError(f"log folder {logdir} does not exist; pass the folder train.py wrote "
                        "<run>.csv and <run>.json into (its --log-dir, default logs).")
    runs, skipped = [], []
    for json_path in visible(logdir, "*.json"):
        if json_path.name.endswith("_eval.json"):
            continue
        try:  # a JSON that is no run log (another tool's, a broken copy) is passed over, as unfinished runs are
            info = _read_json(json_path)
            absent = [key for key in ("arch", "pretrained") if key not in info]
            csv_path = json_path.with_suffix(".csv")
            if absent or not csv_path.is_file():
                what = f"has no '{absent[0]}' field" if absent else f"has no {csv_path.name} beside it"
                raise UserError(f"{json_path} {what}, so it is not a complete run log from train.py; "
                                "move it out of the log folder.")
        except UserError as err:
            skipped.append(str(err))
            print(f"plot.py: skipping {json_path.name}: {err}")
            continue
        history = _read_history(csv_path)
        if history.empty:
            print(f"plot.py: skipping {json_path.stem}: {csv_path} holds no finished epoch yet.")
            continue
        arch, what = str(info["arch"]).lower(), recipe(info)
        runs.append({"name": str(info.get("run_name") or json_path.stem), "arch": arch, "recipe": what,
                     "group": group_of(arch, what), "pretrained": bool(info["pretrained"]), "json": info,
                     "history": history, "path": json_path,
                     "mtime": max(json_path.stat().st_mtime, csv_path.stat().st_mtime)})
    if not runs:
        raise UserError(f"{logdir} holds no run logs (<run>.json with <run>.csv beside it); train a "
                        "model first or pass the folder train.py wrote its logs into."
                        + (f" Skipped: {skipped[0]}" if skipped else ""))
    return runs


def load_evals(logdir) -> list[dict]:
    """One dict per *_eval.json: name (stem without _eval), path, data, matrix (counts, float array)."""
    evals = []
    for path in visible(logdir, "*_eval.json"):
        try:
            data = _read_json(path)
        except UserError as err:
            print(f"plot.py: skipping {path.name}: {err}")
            continue
        try:
            matrix = np.asarray(data["confusion_matrix"], dtype=float)
        except (KeyError, TypeError, ValueError):
            matrix = np.empty(0)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
            raise UserError(f"{path} has no square 'confusion_matrix' of counts; rerun evaluate.py.")
        evals.append({"name": path.stem[:-len("_eval")], "path": path, "data": data, "matrix": matrix})
    return evals


def measured(record: dict) -> str:
    """What an evaluation (or a set of Grad-CAMs) measured, in words: its epoch and the start of its digest."""
    digest = record.get("weights_digest")
    return f"epoch {record.get('epoch', '?')}" + (f", weights {str(digest)[:12]}" if digest else "")


def matches_best(record: dict, run: dict) -> bool:
    """Whether an evaluation measured the run's best.pt: the weights digest train.py logged for its best epoch
    (runs logged before digests: the best epoch's number)."""
    best = run["json"].get("best_weights_digest")
    if best:
        return record.get("weights_digest") == best
    return record.get("epoch", run["json"].get("best_epoch")) == run["json"].get("best_epoch")


def current(records: list[dict], runs: list[dict], what: str) -> list[dict]:
    """The evaluations (or Grad-CAM sets) that measured their run's best.pt, or that belong to no run in the
    log folder; a stale one (an older checkpoint of the run, or a run since replaced with --overwrite) is left
    out with one line, so that no summary row joins one checkpoint's numbers to another's."""
    by_name = {run["name"]: run for run in runs}
    kept = []
    for record in records:
        run = by_name.get(record["data"].get("run_name"))
        if record["data"].get("claimed_weights_digest"):
            print(unverified_export(record, run))
            continue
        if run is None or matches_best(record["data"], run):
            kept.append(record)
            continue
        info = run["json"]
        best = {"epoch": info.get("best_epoch"), "weights_digest": info.get("best_weights_digest")}
        checkpoint = Path(info.get("checkpoint_dir") or Path("checkpoints") / run["name"]) / "best.pt"
        print(f"plot.py: skipping {record['path']}: stale {what}, it measured {measured(record['data'])}, not run "
              f"{run['name']}'s best.pt ({measured(best)}); run evaluate.py {checkpoint} again")
    return kept


def unverified_export(record: dict, run: dict | None) -> str:
    """Why an evaluation of an exported file is not the run's export: its graph's weights are not those export.py
    wrote (evaluate.py found another digest, or none recorded), whatever checkpoint its metadata claims."""
    data = record["data"]
    name = data.get("run_name", record["name"])
    checkpoint = (Path(run["json"].get("checkpoint_dir") or Path("checkpoints") / name) if run
                  else Path("checkpoints") / name) / "best.pt"
    return (f"plot.py: skipping {record['path']}: it evaluated {data.get('checkpoint')}, an exported file whose "
            f"weights (digest {str(data.get('weights_digest'))[:12]}) are not those export.py wrote of run "
            f"{name}'s checkpoint (claimed {str(data.get('claimed_weights_digest'))[:12]}); export "
            f"{checkpoint} again and evaluate that file")


def load_cams(logdir) -> list[dict]:
    """One dict per *_cams.npz: name (stem without _cams), path, data (its run and weights, for current())."""
    sheets = []
    for path in visible(logdir, "*_cams.npz"):
        try:
            with np.load(path) as npz:
                data = {k: npz[k] for k in npz.files}
        except (EOFError, zipfile.BadZipFile):  # empty, or cut before the zip's directory
            print(f"plot.py: skipping {path}: it is cut short (an evaluate.py stopped while writing it, before "
                  "outputs were written whole); run evaluate.py --cam-per-grade again to redraw its sheet")
            continue
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path}: {_one_line(err)}") from None
        named = {key: str(data.pop(key)) for key in ("run_name", "weights_digest") if key in data}
        sheets.append({"name": path.stem.removesuffix("_cams"), "path": path, "sheet": data,
                       "data": {"run_name": named.get("run_name", path.stem.removesuffix("_cams")), **named}})
    return sheets


def pick_latest(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The most recently modified run per (arch and recipe, pretrained), and the older runs it hides."""
    newest = {}
    for run in sorted(runs, key=lambda r: r["mtime"]):
        newest[(run["group"], run["pretrained"])] = run
    kept = list(newest.values())
    skipped = [r for r in runs if all(r is not k for k in kept)]
    return kept, skipped


def majority_share(arch: str, evals: list[dict]) -> float | None:
    """The accuracy of always answering the commonest grade, from an evaluation of this arch."""
    mine = [e for e in evals if str(e["data"].get("arch", "")).lower() == arch and not e["data"].get("evaluated_on")]
    # the curves show test accuracy, so the test split's class mix is the fair reference
    mine.sort(key=lambda e: e["data"].get("split", "test") != "test")
    if not mine or mine[0]["matrix"].sum() <= 0:
        return None
    counts = mine[0]["matrix"]
    return float(counts.sum(axis=1).max() / counts.sum())


# ---------------------------------------------------------------- figures

def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=DPI, format=path.suffix[1:])
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive; a long log folder would pile them up
    return path


def _draw(ax, run: dict, split: str, column: str, scale: float = 1.0, what: str = "") -> None:
    history = run["history"]
    if column not in history or history[column].isna().all():
        return
    colour, style, marker = LINE_STYLE[(split, run["pretrained"])]
    setting = "with pretraining" if run["pretrained"] else "w/o pretraining"
    # a marker on each of 100+ epochs turns the line into a smear; about 15 per line stay readable
    ax.plot(history["epoch"], history[column] * scale, color=colour, linestyle="--" if what else style,
            linewidth=1.8, marker=marker, markersize=5, markevery=max(1, len(history) // 15),
            label=f"{split.capitalize()}{' ' + what if what else ''}({setting})")


def _finish(fig, ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("Epochs")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.35)
    ax.legend()
    fig.tight_layout()


def _pair(group: str, runs: list[dict]) -> list[dict]:
    kept, _ = pick_latest([r for r in runs if r["group"] == group])
    return sorted(kept, key=lambda r: not r["pretrained"])


def comparison_figure(group: str, runs: list[dict], majority: float | None = None):
    """The lab's figure: train/test accuracy (%) per epoch, with and w/o pretraining (one figure per
    architecture and recipe)."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(8, 5))
        for run in _pair(group, runs):
            for split in ("train", "test", "val"):
                _draw(ax, run, split, f"{split}_acc", scale=100)
        if majority is not None:
            ax.axhline(100 * majority, color="0.35", linestyle="--", linewidth=1.3,
                       label=f"Majority grade ({100 * majority:.1f}%)")
        _finish(fig, ax, f"Result Comparison({group_title(group, runs)})", "Accuracy(%)")
    return fig


def plot_comparison(group: str, runs: list[dict], out_dir, evals: list[dict] = ()) -> Path:
    arch = next(r["arch"] for r in runs if r["group"] == group)
    fig = comparison_figure(group, runs, majority_share(arch, list(evals)))
    return _save(fig, Path(out_dir) / f"comparison_{group}.png")


def curves_figure(group: str, runs: list[dict], metric: str):
    """Loss (train, test, val) or quadratic weighted kappa (test, val) per epoch; beside the kappa, dashed,
    the test split's referable-DR AUC (both read on 0..1)."""
    splits, ylabel, title = {"loss": (("train", "test", "val"), "Loss", "Loss"),
                             "kappa": (("test", "val"), "Quadratic weighted kappa | referable AUC (dashed)",
                                       "Kappa and referable AUC")}[metric]
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(8, 5))
        for run in _pair(group, runs):
            for split in splits:
                _draw(ax, run, split, f"{split}_{metric}")
            if metric == "kappa":
                _draw(ax, run, "test", AUC_COLUMN, what="referable AUC")
        if metric == "kappa":
            lowest = min(run["history"].filter(like="_kappa").min().min() for run in _pair(group, runs))
            # a fixed 0..1 axis makes runs comparable across figures; below 0 the model is worse than chance
            if not lowest < 0:
                ax.set_ylim(0, 1)
        _finish(fig, ax, f"{title}({group_title(group, runs)})", ylabel)
    return fig


def plot_curves(group: str, runs: list[dict], out_dir) -> list[Path]:
    return [_save(curves_figure(group, runs, metric), Path(out_dir) / f"{metric}_{group}.png")
            for metric in ("loss", "kappa")]


def normalize_rows(matrix) -> np.ndarray:
    counts = np.asarray(matrix, dtype=float)
    support = counts.sum(axis=1, keepdims=True)
    # a grade absent from the split has nothing to divide by: 0.00 as sklearn shows it, not NaN
    return np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)


def confusion_figure(matrix, title="Normalized confusion matrix", normalize=True, caption=None):
    """The lab's confusion matrix (rows true grade, columns predicted); returns (figure, values drawn)."""
    shown = normalize_rows(matrix) if normalize else np.asarray(matrix, dtype=float)
    if shown.ndim != 2 or shown.shape[0] != shown.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {shown.shape}")
    k = len(shown)
    vmax = 1.0 if normalize else max(shown.max(), 1.0)
    labels = [f"{g}\n{GRADE_NAMES[g]}" for g in range(k)] if k == len(GRADE_NAMES) else list(range(k))
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(7, 6))
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k), labels)
        ax.set_yticks(range(k), labels)
        for i, j in np.ndindex(shown.shape):
            ax.text(j, i, f"{shown[i, j]:.2f}" if normalize else f"{shown[i, j]:.0f}",
                    ha="center", va="center", fontsize=max(6, min(13, 60 // k)),
                    color="white" if shown[i, j] > vmax / 2 else "black")
        ax.set_title(title)
        ax.set_xlabel("Predicted label")
        ax.set_ylabel("True label")
        if caption:
            fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, color="0.3")
        fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 1))
    return fig, shown


def plot_confusion(matrix, path, title="Normalized confusion matrix", normalize=True, caption=None):
    """Write the confusion matrix of a KxK count matrix to `path` (PNG); returns the values drawn."""
    fig, shown = confusion_figure(matrix, title, normalize, caption)
    _save(fig, path)
    return shown


def _caption(evaluation: dict) -> str:
    data = evaluation["data"]
    facts = [evaluation["name"], f"on {data['evaluated_on']}" if data.get("evaluated_on") else None,
             f"{data['split']} split" if "split" in data else None,
             f"{data['num_images']} images" if "num_images" in data else None,
             "TTA" if data.get("tta") else None]
    return ", ".join(f for f in facts if f)


def plot_evaluation(evaluation: dict, out_dir) -> list[Path]:
    """The confusion matrix of one evaluation, and where its JSON holds them its ROC curves and reliability
    diagram (evaluations written before the clinical metrics have only the matrix)."""
    name, data = evaluation["name"], evaluation["data"]
    paths = [Path(out_dir) / f"confusion_{name}.png"]
    plot_confusion(evaluation["matrix"], paths[0], caption=_caption(evaluation))
    if any((data.get(task) or {}).get("roc") for task in SCREENING_TITLES):
        paths.append(_save(roc_figure(data, _caption(evaluation)), Path(out_dir) / f"roc_{name}.png"))
    if data.get("calibration"):
        paths.append(_save(reliability_figure(data, _caption(evaluation)), Path(out_dir) / f"reliability_{name}.png"))
    return paths


SCREENING_TITLES = {"referable": "Referable DR (grade >= 2)", "vision_threatening": "Vision-threatening DR (grade >= 3)"}
POINT_MARKERS = {"high_sensitivity": ("o", "high-sensitivity point"), "high_specificity": ("s", "high-specificity point")}


def roc_figure(data: dict, caption: str):
    """The two screening ROC curves side by side, AUC in the legend, both operating points marked where
    they fall on this split (their thresholds were chosen on another split)."""
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
        for ax, (task, title) in zip(axes, SCREENING_TITLES.items()):
            m = data.get(task) or {}
            ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
            if m.get("roc"):
                ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], color="tab:blue", linewidth=2,
                        label=f"ROC, AUC {m['auc']:.3f} ({m['positives']} positive, {m['negatives']} negative)")
            for point, values in (m.get("operating_points") or {}).items():
                marker, label = POINT_MARKERS[point]
                if values["sensitivity"] is not None and values["specificity"] is not None:
                    ax.plot(1 - values["specificity"], values["sensitivity"], marker=marker, markersize=9,
                            color="tab:red", linestyle="none",
                            label=f"{label} (chosen on {m['chosen_on']}): {values['sensitivity']:.1%} / "
                                  f"{values['specificity']:.1%}")
            ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title, xlabel="1 - specificity", ylabel="Sensitivity")
            ax.grid(True, alpha=0.35)
            ax.legend(loc="lower right", fontsize=8)
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, color="0.3")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def reliability_figure(data: dict, caption: str):
    """Accuracy against mean confidence per confidence bin (a calibrated model lies on the diagonal), bar
    widths the bins', with the share of images per bin below; the ECE in the title."""
    bins = [b for b in data["calibration"] if b["count"]]
    with plt.rc_context(RC):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
        width = bins[0]["upper"] - bins[0]["lower"] if bins else 1 / 15
        top.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
                color="tab:blue", edgecolor="white", label="accuracy in the bin")
        top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:orange",
                 label="(mean confidence, accuracy)")
        top.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy",
                title=f"Reliability, expected calibration error {data['ece']:.3f}")
        top.legend(loc="upper left", fontsize=9)
        total = sum(b["count"] for b in bins) or 1
        bottom.bar([b["lower"] for b in bins], [b["count"] / total for b in bins], width=width, align="edge",
                   color="0.55", edgecolor="white")
        bottom.set(xlabel="Confidence (top-class probability)", ylabel="Share")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.35)
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, color="0.3")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# ---------------------------------------------------------------- summary table

def plot_cam(image, cam, path, title: str, alpha: float = 0.45) -> Path:
    """The photo as the model saw it beside the Grad-CAM heatmap laid over it."""
    with plt.rc_context(RC):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.8))
        left.imshow(image)
        left.set_title("model input")
        right.imshow(image)
        shown = right.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        right.set_title("Grad-CAM, last residual stage")
        fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
        for ax in (left, right):
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
    return _save(fig, path)


def cam_sheet_figure(sheet: dict, title: str):
    """Rows: true grades 0-4; each cell an image with its Grad-CAM, titled with the prediction,
    green when right and red when wrong."""
    grades, preds = sheet["grades"], sheet["preds"]
    columns = max(1, max(int((grades == g).sum()) for g in range(len(GRADE_NAMES))))
    with plt.rc_context(RC):
        fig, axes = plt.subplots(len(GRADE_NAMES), columns, figsize=(2.3 * columns + 1.2, 2.4 * len(GRADE_NAMES)),
                                 squeeze=False)
        for g, row in enumerate(axes):
            picks = np.flatnonzero(grades == g)
            for c, ax in enumerate(row):
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(picks):
                    ax.axis("off")
                    continue
                i = picks[c]
                ax.imshow(sheet["images"][i])
                ax.imshow(sheet["cams"][i].astype(np.float32), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                right = preds[i] == g
                colour = "tab:green" if right else "tab:red"
                ax.set_title(f"{'right' if right else 'wrong'}: {preds[i]} ({sheet['confidence'][i]:.0%})",
                             color=colour, fontsize=10)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
            row[0].set_ylabel(f"true {g}\n{GRADE_NAMES[g]}", fontsize=11)
            if not len(picks):
                row[0].axis("on")
                row[0].set_frame_on(False)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_cam_sheet(cams: dict, out_dir) -> Path:
    """The contact sheet of one *_cams.npz (as load_cams read it)."""
    fig = cam_sheet_figure(cams["sheet"], f"Grad-CAM by true grade: {cams['name']} (predicted grade and confidence)")
    return _save(fig, Path(out_dir) / f"cams_{cams['name']}.png")


def best_epoch_row(run: dict) -> tuple[pd.Series, bool]:
    """The CSV row of the best epoch (by the metric that chose it: test or validation accuracy or kappa), and
    whether the validation split chose it."""
    history = run["history"]
    name = run["json"].get("best_metric_name") or "test_acc"
    column = name if name in history else "test_acc"
    return history.loc[history[column].idxmax()], column.startswith("val_")


def is_exported(evaluation: dict) -> bool:
    """An evaluation of an exported file (evaluate.py MODEL.onnx), which gets a row of its own."""
    return evaluation["data"].get("runtime") == "onnxruntime"


def eval_for(run: dict, evals: list[dict]) -> dict | None:
    """The run's plain evaluation of its own test split (no TTA), whose numbers share the run's row with the
    log's best test accuracy: one split in one row. Every other evaluation has a row of its own."""
    mine = [e for e in evals if e["data"].get("run_name", e["name"]) == run["name"] and not e["data"].get("evaluated_on")
            and e["data"].get("split", "test") == "test" and not e["data"].get("tta")
            and not is_exported(e)]
    return mine[0] if mine else None


def _number(value, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(float(value), spec)


def _screening_cells(evaluation: dict) -> list[str]:
    """referable AUC, referable sensitivity/specificity (%) of the predicted grade, the patient-level referable
    AUC (where the split holds patients with both eyes), kappa with tuned thresholds."""
    referable = evaluation.get("referable") or {}
    sens, spec = referable.get("sensitivity"), referable.get("specificity")
    both = "-" if sens is None or spec is None else f"{100 * sens:.1f} / {100 * spec:.1f}"
    patient = evaluation.get("patient_referable") or {}
    return [_number(referable.get("auc"), ".3f"), both,
            _number(patient.get("auc") if patient.get("applies") else None, ".3f"),
            _number(evaluation.get("kappa_tuned"), ".3f")]


def _cost_cells(evaluation: dict) -> list[str]:
    """The cost of a grade: ms per image at batch 1 / 32, parameters (millions), file size (MB)."""
    cost = evaluation.get("cost") or {}
    ms = ("-" if not cost else f"{cost['ms_per_image_batch1']:.1f} / {cost['ms_per_image_batch32']:.1f}")
    return [ms, _number(cost["parameters"] / 1e6 if cost else None, ".1f"), _number(cost.get("file_mb"), ".1f")]


SUMMARY_HEADER = ["| run | model | pretrained | objective | epochs | best epoch | split | accuracy (%) | kappa "
                  "| macro F1 | referable AUC | referable sens / spec (%) | patient referable AUC | tuned kappa "
                  "| images/s | ms per image (batch 1 / 32) | parameters (M) | file (MB) |",
                  "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def summary_table(runs: list[dict], evals: list[dict]) -> str:
    """A row per run (its best epoch on its test split: accuracy from the log, the rest from the evaluation of
    best.pt when there is one), then a row per other evaluation, each on the one split its `split` names."""
    lines, shown, any_by_val = list(SUMMARY_HEADER), [], False
    for run in sorted(runs, key=lambda r: (_arch_order(r["arch"]), r["recipe"], not r["pretrained"], r["name"])):
        row, by_val = best_epoch_row(run)
        any_by_val |= by_val
        evaluation = eval_for(run, evals)
        shown.append(evaluation)
        data = (evaluation or {}).get("data", {})
        speed = run["history"]["images_per_s"].median()
        lines.append(" | ".join([
            f"| {run['name']}", display_name(run["arch"]), "yes" if run["pretrained"] else "no", run["recipe"],
            str(len(run["history"])), str(int(row["epoch"])), "test",
            _number(100 * row["test_acc"], ".2f") + ("*" if by_val else ""),
            _number(data.get("kappa", row["test_kappa"]), ".3f"), _number(data.get("macro_f1"), ".3f"),
            *_screening_cells(data), _number(speed, ".1f"), *_cost_cells(data)]) + " |")
    others = evaluation_rows([e for e in evals if all(e is not s for s in shown)])
    external = any(e["data"].get("evaluated_on") for e in evals)
    exported = any(is_exported(e) for e in evals)
    return "\n".join(lines + others + (["", VAL_FOOTNOTE] if any_by_val else [])
                     + (["", OTHER_FOOTNOTE] if others else []) + (["", ON_FOOTNOTE] if external else [])
                     + (["", EXPORTED_FOOTNOTE] if exported else [])) + "\n"


def evaluation_rows(evals: list[dict]) -> list[str]:
    """A summary row per evaluation that is not a run's own plain test split: `<run> on <dataset>` (evaluate.py
    --split all or --data-root another dataset), `<run> (ONNX fp32)` (an exported file), `<run> (TTA)`, or the
    run's train, val or every split."""
    rows = []
    for evaluation in sorted(evals, key=lambda e: e["name"]):
        data = evaluation["data"]
        accuracy, on = data.get("accuracy"), data.get("evaluated_on")
        exported = f" (ONNX {str(data.get('precision', 'fp32')).split(' ')[0]})" if is_exported(evaluation) else ""
        rows.append(" | ".join([
            f"| {data.get('run_name', evaluation['name'])}{exported}" + (f" on {on}" if on else "")
            + (" (TTA)" if data.get("tta") else ""),
            display_name(str(data.get("arch", "-")).lower()), "yes" if data.get("pretrained") else "no", recipe(data),
            str(data.get("epoch", "-")), "-", str(data.get("split", "test")),
            _number(None if accuracy is None else 100 * accuracy, ".2f"), _number(data.get("kappa"), ".3f"),
            _number(data.get("macro_f1"), ".3f"), *_screening_cells(data), "-", *_cost_cells(data)]) + " |")
    return rows


def write_summary(runs: list[dict], evals: list[dict], out_dir) -> Path:
    path = Path(out_dir) / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, summary_table(runs, evals))
    return path


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description="Accuracy curves, confusion matrices and a summary "
                                     "table from train.py and evaluate.py logs.")
    parser.add_argument("logdir", nargs="?", default="logs",
                        help="folder with <run>.csv, <run>.json and *_eval.json (default: logs)")
    parser.add_argument("--out", default="figures", help="folder for the PNGs and summary.md, "
                        "created if missing (default: figures)")
    return parser.parse_args(argv)


def _output_folder(out, archs, evals: list[dict], cams: list[dict]) -> Path:
    """--out, and every file plot.py will write there checked before any is written: a figure replaces only
    a figure, the summary only a summary (runtime.check_output_file)."""
    out = check_output("--out", out, folder=True)
    figures = [f"{kind}_{group}.png" for group in archs for kind in ("comparison", "loss", "kappa")]
    figures += [f"{kind}_{e['name']}.png" for e in evals for kind in ("confusion", "roc", "reliability")]
    figures += [f"cams_{c['name']}.png" for c in cams]
    for name in figures:
        check_output_file("--out", out / name, "a figure drawn by matplotlib")
    check_output_file("--out", out / "summary.md", "a summary table of plot.py")
    out.mkdir(parents=True, exist_ok=True)
    return out


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    runs = load_runs(args.logdir)
    evals = current(load_evals(args.logdir), runs, "evaluation")
    cams = current(load_cams(args.logdir), runs, "set of Grad-CAMs")
    kept, skipped = pick_latest(runs)
    out = _output_folder(args.out, {r["group"] for r in kept}, evals, cams)
    if skipped:
        print("plot.py: figures show the newest run per model and pretraining; older runs skipped: "
              + ", ".join(r["name"] for r in skipped))
    written = []
    for group in sorted({r["group"] for r in kept}, key=_arch_order):
        written.append(plot_comparison(group, kept, out, evals))
        written += plot_curves(group, kept, out)
    written += [path for e in evals for path in plot_evaluation(e, out)]
    written += [plot_cam_sheet(c, out) for c in cams]
    written.append(write_summary(runs, evals, out))
    print(written[-1].read_text())
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
