"""Evaluate one checkpoint: accuracy, quadratic weighted kappa, macro F1, per-grade table, confusion matrix.

    python evaluate.py checkpoints/resnet50_pretrained/best.pt [--tta]
    python evaluate.py checkpoints/resnet50_pretrained/best.pt --images photos/ --cam cams/

The model is rebuilt from what the checkpoint says (architecture, classes, image size) and the split
is rebuilt from the data and split flags the run trained with, unless --data-root says otherwise.
With --images it grades new photographs instead, preprocessed as the test split was, and --cam shows
where the model looked (Grad-CAM of the last residual stage, through captum).
"""
from __future__ import annotations

import argparse
import dataclasses
import filecmp
import functools
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import dataloader
import deploy
import fundus
import layouts
import metrics
import models
import objectives
import twoeye
from runtime import (GRADE_NAMES, Parser, UserError, atomic_write, autocast, check_output,
                     check_output_file, checkpoint_digest, choose_device, copy_atomic, device_name, exit_on_user_error,
                     input_file, is_pretrained, load_checkpoint, may_replace, memory_format, nothing_read, precision,
                     progress, restore_model, special_file, worker_signals, write_text_atomic)

GRADES = metrics.GRADES
CPU = torch.device("cpu")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="a .pt file written by train.py, or an .onnx file written by export.py "
                                      "(run in onnxruntime)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one the run trained on)")
    p.add_argument("--image-dir", default=None, help="image folder (default: the run's, or found under --data-root)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="all: every labelled, gradable image of the dataset, all its splits (external validation "
                        "with --data-root another dataset, written as <run>_on_<dataset>_eval.json; on the run's "
                        "own data <run>_all_eval.json)")
    p.add_argument("--layout", default="auto", choices=["auto", *layouts.NAMES],
                   help="with --data-root: its layout (auto: recognised from its files)")
    p.add_argument("--tta", action="store_true",
                   help="average over the 8 flips and quarter turns what the objective averages (the grade "
                        "probabilities; a regression's grade)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: CPUs, at most 16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None,
                   help="metrics JSON (default: <log dir>/<run>[_tta]_eval.json); with --images, a predictions CSV")
    p.add_argument("--predictions", default=None, metavar="CSV",
                   help="per-image predictions (default: <log dir>/<run>[_tta]_predictions.csv)")
    p.add_argument("--figure-dir", default="figures", help="where the confusion matrix PNG goes")
    p.add_argument("--cam-per-grade", type=int, default=0, metavar="K",
                   help="also save Grad-CAMs of K split images per true grade for plot.py's contact sheet")
    g = p.add_argument_group("new photographs")
    g.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="grade these image files, or the images directly inside these folders")
    g.add_argument("--cam", default=None, metavar="DIR",
                   help="with --images: a Grad-CAM figure per graded photo, beside a copy of it, in DIR")
    g.add_argument("--force", action="store_true",
                   help="with --images: grade photos the quality check calls ungradable too (the reason is kept)")
    g.add_argument("--min-quality", type=float, default=None, metavar="SCORE",
                   help="with --images: the quality check's operating point, a score in 0-1 under which a photo "
                        "is ungradable (default: the fitted model's, the lowest score of a gradable photo it was "
                        "fitted on; fundus.QUALITY_MODEL)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------- inference
@torch.inference_mode()
def summaries_over_views(model, x: torch.Tensor, autocast_ctx, tta: bool,
                         objective: objectives.Objective) -> torch.Tensor:
    """The objective's summaries (objectives.Objective.summarise: grade probabilities, or a regression's grade)
    of a normalised batch; with tta, averaged over its 8 flips and quarter turns."""
    views = dataloader.dihedral_views(x) if tta else [x]
    with autocast_ctx:
        return torch.stack([objective.summarise(model(v)) for v in views]).mean(0)


class TorchGrader:
    """A checkpoint's model behind the one interface every grader has: uint8 batch [N, 3, S, S] in, the
    objective's summaries [N, 5] or [N, 1] float32 out, on the CPU (with tta, averaged over the 8 flips and
    quarter turns)."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, transform, autocast_ctx, objective: objectives.Objective):
        self.model, self.transform, self.autocast_ctx = model.eval(), transform, autocast_ctx
        self.objective = objective
        self.device = next(model.parameters()).device

    def __call__(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        x = self.transform(images.to(self.device, non_blocking=True))
        return summaries_over_views(self.model, x, self.autocast_ctx, tta, self.objective).cpu()


class TwoEyeGrader(TorchGrader):
    """A two-eye checkpoint's model (twoeye.TwoEyeModel) behind the same interface: its batches are (eyes,
    partners, partner flags) as twoeye.collate_pairs makes them; with tta each flip or turn is taken of both
    photos together, and the summaries averaged."""

    @torch.inference_mode()
    def __call__(self, batch, tta: bool = False) -> torch.Tensor:
        eyes, partners, flags = batch
        x = self.transform(eyes.to(self.device, non_blocking=True))
        y = self.transform(partners.to(self.device, non_blocking=True))
        views = zip(dataloader.dihedral_views(x), dataloader.dihedral_views(y)) if tta else [(x, y)]
        flags = flags.to(self.device)
        with self.autocast_ctx:
            return torch.stack([self.objective.summarise(self.model(a, b, flags)) for a, b in views]).mean(0).cpu()


class OnnxGrader:
    """An exported file (export.py) in onnxruntime on the CPU, behind the same interface as TorchGrader: the
    file outputs the objective's summaries. The normalisation is inside the file; the flips and quarter turns
    of tta commute with it, so they are taken of the uint8 batch."""

    runtime = "onnxruntime"

    def __init__(self, session):
        self.session = session

    def __call__(self, images, tta: bool = False) -> torch.Tensor:
        if isinstance(images, (tuple, list)):  # a two-eye file: (eyes, partners, flags), both photos turned alike
            eyes, partners, flags = images
            views = (zip(dataloader.dihedral_views(eyes), dataloader.dihedral_views(partners)) if tta
                     else [(eyes, partners)])
            return torch.stack([torch.from_numpy(deploy.run(self.session, (a.numpy(), b.numpy(), flags.numpy())))
                                for a, b in views]).mean(0)
        views = dataloader.dihedral_views(images) if tta else [images]
        return torch.stack([torch.from_numpy(deploy.run(self.session, v.numpy())) for v in views]).mean(0)


@torch.inference_mode()
def predict_with(grader, loader, tta: bool = False, desc: str = "test",
                 show: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summaries [N, 5] or [N, 1] float32, grades [N]) of this process's shard, on the CPU, from any grader
    (TorchGrader, OnnxGrader): one path from pixels to the numbers, whatever runs the model."""
    summaries, grades = [], []
    for images, batch_grades in progress(loader, len(loader), desc, show):
        summaries.append(grader(images, tta))
        grades.append(batch_grades)
    return torch.cat(summaries), torch.cat(grades)


def predict(model, loader, transform, autocast_ctx, objective: objectives.Objective, tta: bool = False,
            desc: str = "test", show: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """predict_with for a PyTorch model, its eval transform and autocast context (train.py's evaluation)."""
    return predict_with(TorchGrader(model, transform, autocast_ctx, objective), loader, tta, desc, show)


def gather_shards(tensor: torch.Tensor) -> torch.Tensor:
    """Under DDP, every rank's evaluation shard in the original order (undoing ShardSampler's
    rank::world interleaving); the tensor itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    shards = [None] * world
    dist.all_gather_object(shards, tensor)
    out = torch.empty((sum(len(s) for s in shards), *tensor.shape[1:]), dtype=tensor.dtype)
    for rank, shard in enumerate(shards):
        out[rank::world] = shard
    return out


def evaluate_split(model, loader, transform, autocast_ctx, objective: objectives.Objective, desc: str,
                   show: bool) -> dict:
    """Loss, accuracy, quadratic kappa and referable-DR AUC over a whole split (all ranks), as train.py logs
    them each epoch; images skipped as unreadable (grade -1) are counted, not scored."""
    summaries, grades = predict(model, loader, transform, autocast_ctx, objective, desc=desc, show=show)
    return split_numbers(gather_shards(summaries), gather_shards(grades), objective)


def split_numbers(summaries: torch.Tensor, grades: torch.Tensor, objective: objectives.Objective) -> dict:
    """What train.py logs of a split each epoch, from its summaries: the objective's loss, accuracy, kappa and
    referable AUC; rows of grade -1 (unreadable, skipped) are counted, not scored."""
    keep = grades >= 0
    summaries, grades = summaries[keep], grades[keep]
    numbers = objective.numbers(summaries.numpy())
    scores = metrics.grading_metrics(grades.numpy(), numbers["grade"])
    grade = metrics.SCREENING["referable"]
    referable = metrics.screening_metrics(grades.numpy(), numbers["grade"], numbers["screening"][grade], grade,
                                          None, None)
    return {"loss": objective.eval_loss(summaries, grades), "acc": scores["accuracy"], "kappa": scores["kappa"],
            "referable_auc": referable["auc"] if referable["auc"] is not None else float("nan"),
            "skipped": int((~keep).sum())}


# --------------------------------------------------------------------------- metrics
def format_report(metrics: dict) -> str:
    lines = [f"accuracy {metrics['accuracy']:.2%} | quadratic weighted kappa {metrics['kappa']:.4f} | "
             f"macro F1 {metrics['macro_f1']:.4f}", "",
             f"{'grade':<18}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for g in GRADES:
        c = metrics["per_class"][str(g)]
        lines.append(f"{g} {GRADE_NAMES[g]:<16}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}"
                     f"{c['support']:>10}")
    matrix = np.asarray(metrics["confusion_matrix"])
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    lines += ["", "confusion matrix (rows: true grade, columns: predicted) counts | row-normalised"]
    lines += [f"  {g}  " + " ".join(f"{n:>6}" for n in matrix[g]) + "  | " + " ".join(f"{r:5.2f}" for r in rows[g])
              for g in GRADES]
    return "\n".join(lines)


# --------------------------------------------------------------------------- model and data
def load_model(checkpoint: dict, path, device: torch.device) -> torch.nn.Module:
    """The checkpoint's architecture with its weights, in eval mode (a two-eye checkpoint's: its encoder and
    head, twoeye.TwoEyeModel); a mismatch is one sentence."""
    model = models.build_model(checkpoint["arch"], objectives.of(checkpoint).outputs)
    restore_model(model, checkpoint, path)
    if twoeye.is_two_eye(checkpoint):
        model = twoeye.TwoEyeModel(model, twoeye.head_of(checkpoint, path))
    channels_last = checkpoint["config"].get("channels_last", True)
    return model.to(device, memory_format=memory_format(channels_last)).eval()


def inference_setup(checkpoint: dict, source, device: torch.device):
    """(model, eval transform, autocast context) as the run used them: one place for all three."""
    config = checkpoint["config"]
    amp_dtype, _ = precision(config.get("amp"), device)
    transform = dataloader.BatchTransform(device, augment=False, channels_last=config.get("channels_last", True))
    return load_model(checkpoint, source, device), transform, autocast(device, amp_dtype)


# --------------------------------------------------------------------------- exported models
EXPORTED = "exported"  # the key a model record read from an .onnx file has, and a checkpoint has not
EXPORTED_WEIGHTS = "exported_weights"  # and what its graph's weights were checked to be (graph_weights)


def load_model_file(path) -> dict:
    """What evaluate.py runs: a checkpoint, or an exported file (export.py), read as the checkpoint it came from
    (the record its metadata keeps: architecture, size, flags, data) with EXPORTED holding the file, its
    precision and parameter count. The rest of the evaluation cannot tell the two apart."""
    if not deploy.is_onnx_file(path):
        return load_checkpoint(path)
    path = input_file("model", path)
    meta = deploy.read_metadata(path)
    if not isinstance(meta.get("checkpoint"), dict):
        raise UserError(f"{path} is an ONNX model, but not one export.py wrote (its metadata has no checkpoint "
                        "record); export the checkpoint with export.py")
    record = {**meta["checkpoint"], EXPORTED: {"path": str(path), "precision": meta.get("precision", "fp32"),
                                               "parameters": int(meta.get("parameters", 0))}}
    return {**record, **graph_weights(path, meta)}


def graph_weights(path, meta: dict) -> dict:
    """The weights digest an evaluation of an exported file is reported under, from the graph that runs: the
    checkpoint's digest (as export.py recorded it) only when the file's initializers still give the digest
    export.py recorded of them (graph_weights_digest); else the graph's own digest, with the metadata's kept
    as claimed_weights_digest and one line saying so. So a file whose weights were changed after export (an
    fc zeroed) is never reported, nor listed by plot.py, as the run's checkpoint."""
    try:
        graph = deploy.graph_digest(path)
    except Exception as err:  # noqa: BLE001 (onnx raises its own classes, and numpy's, on a graph it cannot read)
        detail = " ".join(str(err).split())[:120]
        raise UserError(f"cannot read the weights of {path}'s graph, so what ran could not be told "
                        f"({type(err).__name__}: {detail}); export the checkpoint again") from None
    claimed = meta["checkpoint"].get("weights_digest")
    recorded = meta.get("graph_weights_digest")
    fields = {"graph_weights_digest": graph, "claimed_weights_digest": None}
    if recorded == graph and claimed:
        return {"weights_digest": claimed, EXPORTED_WEIGHTS: fields}
    why = (f"its graph's weights (digest {graph[:12]}) are not those export.py wrote (digest {str(recorded)[:12]})"
           if recorded else "it records no digest of its graph's weights (exported before export.py wrote one)")
    print(f"evaluate.py: {path}: {why}, so its metadata's claim to hold checkpoint weights {str(claimed)[:12]} "
          f"is not taken: reported under the graph's own digest {graph[:12]}; export the checkpoint again")
    return {"weights_digest": graph, EXPORTED_WEIGHTS: {**fields, "claimed_weights_digest": claimed}}


def make_grader(checkpoint: dict, source, device: torch.device):
    """The model of a checkpoint (in PyTorch, as the run used it) or of an exported file (in onnxruntime)."""
    if EXPORTED in checkpoint:
        return OnnxGrader(deploy.session(checkpoint[EXPORTED]["path"]))
    kind = TwoEyeGrader if twoeye.is_two_eye(checkpoint) else TorchGrader
    return kind(*inference_setup(checkpoint, source, device), objectives.of(checkpoint))


def model_label(checkpoint: dict) -> str:
    """What an exported file's evaluations add to the run's name (<run>_onnx, <run>_onnx_int8), so that they
    sit beside the checkpoint's instead of replacing them; nothing for a checkpoint."""
    if EXPORTED not in checkpoint:
        return ""
    return "_onnx_int8" if checkpoint[EXPORTED]["precision"].startswith("int8") else "_onnx"


# A few repetitions after a warm-up: the median settles within a few per cent, and evaluate.py stays quick
COST_REPEATS, COST_SECONDS, COST_BATCHES = 3, 2.0, (1, 32)


def ms_per_image(grader, batch: int, size: int, two_eye: bool = False) -> float:
    """Milliseconds per image of the grader on a random uint8 batch (the median of a few calls, after one); for
    the two-eye model each image with a partner photo (the cost of grading one eye, its partner read too)."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    if two_eye:
        images = (images, images.flip(0), torch.ones(batch))
    grader(images)  # warm-up: first-call allocations, kernel choice
    times = []
    while not times or (len(times) < COST_REPEATS and sum(times) < COST_SECONDS):
        start = time.perf_counter()
        grader(images)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / batch


def cost_of_a_grade(checkpoint: dict, path, device: torch.device) -> dict:
    """What a grade costs where it ran: ms per image at batch 1 and 32, parameters, the file's size."""
    grader = make_grader(checkpoint, path, device)
    parameters = (checkpoint[EXPORTED]["parameters"] if EXPORTED in checkpoint
                  else sum(p.numel() for p in grader.model.parameters()))
    return {**{f"ms_per_image_batch{b}": round(ms_per_image(grader, b, checkpoint["image_size"],
                                                            twoeye.is_two_eye(checkpoint)), 3)
               for b in COST_BATCHES},
            "parameters": parameters, "file_mb": round(Path(path).stat().st_size / 1e6, 2),
            "device": device_name(CPU if EXPORTED in checkpoint else device), "runtime": grader.runtime,
            "precision": checkpoint[EXPORTED]["precision"] if EXPORTED in checkpoint else "checkpoint's"}


def format_cost(cost: dict) -> str:
    return (f"cost of a grade ({cost['runtime']} on {cost['device']}): {cost['ms_per_image_batch1']:.1f} ms per "
            f"image at batch 1, {cost['ms_per_image_batch32']:.1f} at batch 32; {cost['parameters'] / 1e6:.1f} M "
            f"parameters, file {cost['file_mb']:.1f} MB")


def run_data(checkpoint: dict, args) -> dataloader.FundusData:
    """The data to evaluate on: the run's own data and splits (found from any working folder, checked to be
    unchanged), or with --data-root the data there (in --layout, default the one its files show), split by
    the run's flags where the dataset has no splits of its own."""
    config = checkpoint["config"]
    if args.data_root is None:
        return dataloader.load_run_data(config, checkpoint.get("data", {}), image_dir=args.image_dir)
    return dataloader.load_fundus_data(args.data_root, args.image_dir, config.get("test_fraction", 0.2),
                                       config.get("val_fraction", 0.0), config.get("split_seed", 0),
                                       layout=args.layout)


def reported_table(fundus: dataloader.FundusData, split: str) -> dataloader.FundusTable:
    """The images reported on: a split, or with --split all every labelled gradable image of the dataset."""
    if split == "all":
        return fundus.all_images()
    table = getattr(fundus, split)
    if table is None:
        raise UserError("--split val: the run held out no validation part (train.py ran with --val-fraction 0)")
    return table


def reference_split(fundus: dataloader.FundusData, reported: str) -> str | None:
    """The split that operating points and kappa thresholds are chosen on: the run's validation split when it
    has one, else its training split; never the split being reported (then the other one, or none: --split
    all reports them all)."""
    if reported == "all":
        return None
    for split in ("val", "train"):
        if split != reported and getattr(fundus, split) is not None:
            return split
    return None


def trained_on_ben_graham(checkpoint: dict) -> bool:
    """Whether the run's training crops were Ben Graham-normalised (data/prepare.py --ben-graham)."""
    return bool((checkpoint.get("data", {}).get("prepare") or {}).get("ben_graham", False))


def run_dataset(checkpoint: dict, table: dataloader.FundusTable, skip_bad_images: bool = False):
    """The table's images as the run's model saw its own: at its size, raw photos (a public dataset as
    published) cropped to the eye and normalised as the run's crops were."""
    return dataloader.FundusDataset(table, checkpoint["image_size"], skip_bad_images, trained_on_ben_graham(checkpoint))


def predict_table(checkpoint: dict, table: dataloader.FundusTable, device: torch.device, batch_size: int,
                  workers: int, tta: bool, show: bool = False) -> np.ndarray:
    """The objective's summaries [N, 5] or [N, 1] of the table's images, in its order (NaN rows for images
    skipped as unreadable with the run's --skip-bad-images)."""
    grader = make_grader(checkpoint, table.source, device)
    dataset = run_dataset(checkpoint, table, checkpoint["config"].get("skip_bad_images", False))
    if twoeye.is_two_eye(checkpoint):  # each eye with its partner's photo
        loader = twoeye.pair_loader(dataset, twoeye.partner_index(table.names), batch_size, workers, device)
    else:
        loader = dataloader.build_loader(dataset, batch_size, dataloader.ShardSampler(len(dataset)), workers, device)
    summaries, grades = predict_with(grader, loader, tta=tta, desc="evaluate", show=show)
    summaries = summaries.numpy().astype(np.float64)
    summaries[grades.numpy() < 0] = np.nan
    return summaries


def evaluate_checkpoint(checkpoint: dict, table: dataloader.FundusTable, device: torch.device, batch_size: int,
                        workers: int, tta: bool, show: bool = False) -> tuple[dict, np.ndarray]:
    """The lab's metrics over the table, and the summaries (NaN rows for skipped images)."""
    summaries = predict_table(checkpoint, table, device, batch_size, workers, tta, show)
    keep = ~np.isnan(summaries[:, 0])
    grades = objectives.of(checkpoint).numbers(summaries[keep])["grade"]
    return metrics.grading_metrics(table.grades[keep], grades), summaries


PROBABILITY_COLUMNS = [f"p{g}" for g in GRADES]
# Where every row of a predictions table came from, the same in each row (constant columns, so that the file
# read alone, or copied elsewhere, still names the checkpoint, its weights, the split and the dataset)
PREDICTION_PROVENANCE = ["checkpoint", "weights_digest", "split", "dataset"]
PREDICTION_COLUMNS = ["image", "grade", "pred", "score", *PROBABILITY_COLUMNS, *PREDICTION_PROVENANCE]


def summary_columns(objective: objectives.Objective) -> list[str]:
    """The columns of a predictions table that hold the objective's summaries: p0-p4, or a regression's score."""
    return PROBABILITY_COLUMNS if objective.probabilities else ["score"]


def write_predictions(path: Path, table: dataloader.FundusTable, summaries: np.ndarray,
                      objective: objectives.Objective, provenance: dict | None = None):
    """One row per evaluated image (PREDICTION_COLUMNS, `image` as the split's CSV names it): the true grade,
    the objective's grade and continuous score, and its probabilities (empty for a regression), to 6
    decimals, then PREDICTION_PROVENANCE from `provenance` (prediction_provenance); returns the table as read back
    from the file, so that every number computed from it follows from the file alone (the grade and score are
    recomputed from the rounded summaries)."""
    import io

    import pandas as pd

    keep = ~np.isnan(summaries[:, 0])
    rounded = np.round(summaries[keep], 6)
    numbers = objective.numbers(rounded)
    frame = pd.DataFrame({"image": np.array(table.image_names())[keep], "grade": table.grades[keep],
                          "pred": numbers["grade"], "score": np.round(numbers["score"], 6),
                          **{c: rounded[:, g] if objective.probabilities else np.nan
                             for g, c in enumerate(PROBABILITY_COLUMNS)}})
    for column in PREDICTION_PROVENANCE if provenance is not None else ():
        frame[column] = provenance[column]
    text = frame.to_csv(index=False, float_format="%.6f")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return pd.read_csv(io.StringIO(text), dtype={"image": str, **{c: str for c in PREDICTION_PROVENANCE}})


def prediction_provenance(args, checkpoint: dict, table: dataloader.FundusTable, split: str) -> dict:
    """The constant columns of a predictions table (PREDICTION_PROVENANCE): the model file evaluated, the digest
    of the weights that ran (weights_digest, as the metrics JSON records it), the split and the dataset."""
    return {"checkpoint": str(args.checkpoint), "weights_digest": reported_digest(checkpoint), "split": split,
            "dataset": table.dataset or "data"}


def reported_digest(checkpoint: dict) -> str:
    """The weights digest an evaluation is reported under: an exported file's from its graph (graph_weights), a
    checkpoint's of everything that grades (runtime.checkpoint_digest)."""
    return checkpoint.get("weights_digest") or checkpoint_digest(checkpoint)


def split_scores(predictions, reference, objective: objectives.Objective) -> dict:
    """Every number of the metrics JSON, from a predictions table (and the reference split's, for operating
    points and kappa thresholds) through the objective: the lab's metrics, then screening (per image and per
    patient), tuned kappa, calibration, intervals."""
    columns = summary_columns(objective)
    numbers = objective.numbers(predictions[columns].to_numpy())
    # EyePACS' names pair a patient's two eyes; any other image is its own patient
    grades, patients = predictions["grade"].to_numpy(), [layouts.patient_of(n) for n in predictions["image"]]
    chosen = None if reference is None else (reference[0]["grade"].to_numpy(),
                                             objective.numbers(reference[0][columns].to_numpy()), reference[1])
    return {**metrics.grading_metrics(grades, numbers["grade"]),
            **metrics.clinical_metrics(grades, numbers, patients, chosen)}


# --------------------------------------------------------------------------- new photographs
def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, and every file directly inside folders, sorted (hidden ones aside): any name, as a
    file named directly is graded whatever its extension (.gif, .webp), and one that is no image gets its
    row with status unreadable and the reason, never a silent skip."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            with os.scandir(path) as entries:
                found += sorted(Path(e.path) for e in entries if e.is_file() and not e.name.startswith("."))
        elif path.is_file():
            found.append(path)
        elif path.exists():  # reading a FIFO would wait for a writer forever, a device never end
            raise UserError(f"--images {path} is not a regular file but {special_file(path)}; name the photos "
                            "themselves")
        else:
            raise UserError(f"--images {path}: no such file or folder")
    if not found:
        raise UserError(f"--images {' '.join(paths)}: no files there")
    return found


# What --images answers for every file (the CSV's status column).
GRADED, UNGRADABLE, UNREADABLE = "graded", "ungradable", "unreadable"


class PhotoDataset(torch.utils.data.Dataset):
    """New photographs, judged and preprocessed as the test split was. Each is decoded at a reduced JPEG
    scale and assessed (fundus.load_photo, fundus.assess: a gradable colour fundus photo, or why not), then
    an eye crop goes through the same load_square as the training data and
    a raw camera photo is cropped to the eye as data/prepare.py does (and Ben Graham-normalised when the
    training data was). A crop already Ben Graham-normalised is graded as it is for a run trained on such
    crops, and ungradable for any other. Items: (uint8 image, index, status, reason, quality score or NaN); a
    blank image unless graded. With force, ungradable photos are graded anyway, their reason kept; min_quality
    is the check's operating point (None: the fitted model's)."""

    def __init__(self, paths: list[Path], size: int, ben_graham: bool = False, force: bool = False,
                 min_quality: float | None = None):
        self.paths, self.size, self.ben_graham, self.force = paths, size, ben_graham, force
        self.min_quality = min_quality

    def __len__(self):
        return len(self.paths)

    def load(self, path: Path):
        photo, quality = fundus.load_photo(path, self.size, self.min_quality)
        if fundus.is_ben_graham_crop(photo, quality):
            # what a run trained on such crops takes as it is; the quality check judges photographs, not these
            quality = dataclasses.replace(quality, gradable=self.ben_graham, reason="" if self.ben_graham else (
                "already Ben Graham-normalised, and this run was trained on plain crops: pass the original photo"))
        if not quality.gradable and not self.force:
            return None, UNGRADABLE, quality.reason, quality.score
        if fundus.is_eye_crop(photo, quality.field):
            return dataloader.load_square(str(path), self.size), GRADED, quality.reason, quality.score
        crop = fundus.crop_eye(photo, self.size, quality.field)
        image = fundus.ben_graham(crop, self.size / 2) if self.ben_graham else crop
        return image, GRADED, quality.reason, quality.score

    def __getitem__(self, i):
        from PIL import Image

        try:
            image, status, reason, score = self.load(self.paths[i])
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            image, status, reason = None, UNREADABLE, f"not a readable image ({' '.join(str(err).split())})"
            score = float("nan")
        if image is None:  # a blank in the batch: never shown to the model
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8).permute(2, 0, 1), i, status, reason, score
        return dataloader.to_uint8_chw(image), i, status, reason, score


def collate_photos(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str], list[float]]:
    """PhotoDataset items as one uint8 batch (as the training data's), their indices, statuses, reasons and
    quality scores."""
    images, index = dataloader.collate_fundus([(item[0], item[1]) for item in batch])
    return images, index, [item[2] for item in batch], [item[3] for item in batch], [item[4] for item in batch]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, grade: torch.Tensor, objective: objectives.Objective,
             partner: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of the last residual stage for the objective's signal of the predicted
    `grade` (objectives.Objective.cam_signal: the grade's logit, or the regressed or expected grade), upsampled
    to the input and scaled to [0, 1] per image: captum's LayerGradCam, the PyTorch project's own. For the
    two-eye model, `partner` is (partner batch, flags): the partner's features held fixed, the map is of the eye."""
    from captum.attr import LayerAttribution, LayerGradCam

    if partner is None:
        def signal(inputs):
            return objective.cam_signal(model(inputs), grade)
        layer = model.layer4
    else:
        with torch.no_grad():
            partner_features = model.encoder.features(partner[0].float())

        def signal(inputs):
            return objective.cam_signal(model.head(model.encoder.features(inputs), partner_features, partner[1]),
                                        grade)
        layer = model.encoder.layer4

    with torch.enable_grad():
        cam = LayerGradCam(signal, layer).attribute(x.float(), target=0, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


# Where each grade of --images came from, the same in every row: the model file, the digest of the weights that
# ran, and the gradability check (fundus.check_version of its fitted model) at the operating point it judged at
PHOTO_PROVENANCE = ["checkpoint", "weights_digest", "quality_check", "min_quality"]
PHOTO_COLUMNS = ["path", "status", "reason", "quality", "grade", "score", "confidence", *PROBABILITY_COLUMNS,
                 *PHOTO_PROVENANCE]


def predict_photos(checkpoint: dict, paths: list[Path], device: torch.device, batch_size: int, workers: int,
                   tta: bool, cam_dir: Path | None = None, force: bool = False, show: bool = False,
                   min_quality: float | None = None):
    """One row per file, in order (PHOTO_COLUMNS): the quality check's score (empty for unreadable files);
    graded photos with the objective's grade and continuous score, and where it has probabilities the
    confidence (the grade's probability) and p0-p4; ungradable and unreadable ones with the reason and empty
    numbers."""
    import pandas as pd

    grader = make_grader(checkpoint, paths[0], device)
    objective = objectives.of(checkpoint)
    dataset = PhotoDataset(paths, checkpoint["image_size"], trained_on_ben_graham(checkpoint), force, min_quality)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_photos, worker_init_fn=worker_signals)
    outputs = cam_outputs(paths, cam_dir) if cam_dir is not None else None
    rows, held = {}, {}
    two_eye = twoeye.is_two_eye(checkpoint)
    for images, index, statuses, reasons, scores in progress(loader, len(loader), "grade", show):
        for i, status, reason, score in zip(index.tolist(), statuses, reasons, scores):
            rows[i] = {"path": str(paths[i]), "status": status, "reason": reason, "quality": score}
        graded = torch.tensor([status == GRADED for status in statuses])
        if not graded.any():
            continue
        if two_eye:  # the partner may come in a later batch: every graded photo is held, then paired
            held.update(zip(index[graded].tolist(), images[graded]))
            continue
        grade_photos_batch(grader, objective, images[graded], index[graded].tolist(), None, tta, paths, outputs, rows)
    if two_eye:
        order = sorted(held)
        partner = twoeye.partner_index([paths[i].stem for i in order])
        for begin in range(0, len(order), batch_size):
            chunk = range(begin, min(begin + batch_size, len(order)))
            eyes = torch.stack([held[order[k]] for k in chunk])
            mates = torch.stack([held[order[partner[k]]] if partner[k] >= 0 else held[order[k]] for k in chunk])
            flags = torch.tensor([float(partner[k] >= 0) for k in chunk])
            grade_photos_batch(grader, objective, eyes, [order[k] for k in chunk], (mates, flags), tta, paths,
                               outputs, rows)
            for k in chunk:
                rows[order[k]]["partner"] = str(paths[order[partner[k]]]) if partner[k] >= 0 else ""
    columns = [c for c in PHOTO_COLUMNS if c not in PHOTO_PROVENANCE] + (["partner"] if two_eye else [])
    table = pd.DataFrame([rows[i] for i in range(len(paths))], columns=columns)
    return table.astype({"grade": "Int64"})


def grade_photos_batch(grader, objective: objectives.Objective, images: torch.Tensor, index: list[int],
                       partners: tuple[torch.Tensor, torch.Tensor] | None, tta: bool, paths: list[Path], outputs,
                       rows: dict) -> None:
    """Grade a batch of gradable photos (with their partners' photos and flags, for the two-eye model), draw their
    Grad-CAMs when asked, and fill their rows."""
    device = getattr(grader, "device", CPU)
    numbers = objective.numbers(grader(images if partners is None else (images, *partners), tta).numpy())
    grades = numbers["grade"]
    confidence = (numbers["probs"][np.arange(len(grades)), grades] if objective.probabilities
                  else np.full(len(grades), np.nan))
    if outputs is not None:  # a TorchGrader: check_args refuses --cam for an exported file
        x = grader.transform(images.to(device, non_blocking=True))
        mate = None if partners is None else (grader.transform(partners[0].to(device)), partners[1].to(device))
        cams = grad_cam(grader.model, x, torch.as_tensor(grades).to(device), objective, mate).cpu()
        for j, i in enumerate(index):
            save_cam(paths[i], images[j], cams[j], int(grades[j]), float(confidence[j]),
                     float(numbers["score"][j]), *outputs[i])
    for j, i in enumerate(index):
        rows[i].update(grade=int(grades[j]), score=float(numbers["score"][j]), confidence=float(confidence[j]),
                       **{f"p{g}": float(numbers["probs"][j, g]) if objective.probabilities else np.nan
                          for g in GRADES})


def cam_outputs(paths: list[Path], cam_dir: Path) -> list[tuple[Path | None, Path]]:
    """Per photo, where --cam puts its copy (None when the photo already lies in cam_dir) and its Grad-CAM
    figure: <stem>.<ext> and <stem>_cam.png, with -2, -3, ... added where two photos share a name, and
    never the name of an input file or of a file already there that is no earlier output of the same photo
    (a figure or copy never overwrites a photo: runtime's output rule, applied by choosing another name)."""
    taken = {p.resolve() for p in paths}
    outputs = []
    for path in paths:
        in_place = path.resolve().parent == cam_dir.resolve()
        for n in itertools.count(1):
            stem = path.stem if n == 1 else f"{path.stem}-{n}"
            copy = None if in_place else cam_dir / f"{stem}{path.suffix}"
            figure = cam_dir / f"{stem}_cam.png"
            if free_for(figure, taken, lambda old: may_replace(old, "a figure drawn by matplotlib")) and (
                    copy is None or free_for(copy, taken, lambda old: filecmp.cmp(old, path, shallow=False))):
                break
        taken |= {figure.resolve()} | ({copy.resolve()} if copy else set())
        outputs.append((copy, figure))
    return outputs


def free_for(output: Path, taken: set, replaceable) -> bool:
    """Whether `output` may be written: not taken by an input or another output of this call, and absent or
    a file that `replaceable` recognises as this output written before."""
    return output.resolve() not in taken and (not output.exists() or (output.is_file() and replaceable(output)))


def save_cam(source: Path, image: torch.Tensor, cam: torch.Tensor, grade: int, confidence: float, score: float,
             copy: Path | None, figure: Path) -> None:
    """A copy of the photo and its figure: what the model saw, and the heatmap over it."""
    import plot

    figure.parent.mkdir(parents=True, exist_ok=True)
    if copy is not None:
        copy_atomic(source, copy)
    title = f"{source.name}: grade {grade} ({GRADE_NAMES[grade]}), " + (
        f"confidence {confidence:.0%}" if np.isfinite(confidence) else f"regressed grade {score:.2f}")
    plot.plot_cam(image.permute(1, 2, 0).numpy(), cam.numpy(), figure, title)


def cam_samples(checkpoint: dict, table: dataloader.FundusTable, per_grade: int, device: torch.device) -> dict:
    """Grad-CAMs of the first `per_grade` images of each true grade (CSV order), for the contact sheet."""
    picks = np.concatenate([np.flatnonzero(table.grades == g)[:per_grade] for g in GRADES])
    model, transform, ctx = inference_setup(checkpoint, table.source, device)
    objective = objectives.of(checkpoint)
    dataset = run_dataset(checkpoint, table)
    images, grades = dataloader.collate_fundus([dataset[i] for i in picks])
    x = transform(images.to(device))
    partner = None
    if twoeye.is_two_eye(checkpoint):  # each pick with its partner's photo, as the split's evaluation has it
        pairs = twoeye.PairDataset(dataset, twoeye.partner_index(table.names))
        (_, mates, flags), _ = twoeye.collate_pairs([pairs[i] for i in picks])
        partner = (transform(mates.to(device)), flags.to(device))
        with torch.inference_mode(), ctx:
            summaries = objective.summarise(model(x, *partner)).float().cpu()
    else:
        summaries = summaries_over_views(model, x, ctx, False, objective).cpu()
    numbers = objective.numbers(summaries.numpy())
    preds = numbers["grade"]
    cams = grad_cam(model, x, torch.as_tensor(preds).to(device), objective, partner).cpu()
    # the contact sheet's number under each image: the grade's probability, or a regression's grade
    confidence = (numbers["probs"][np.arange(len(preds)), preds] if objective.probabilities else numbers["score"])
    return {"images": images.permute(0, 2, 3, 1).numpy(), "cams": cams.numpy().astype(np.float16),
            "grades": grades.numpy(), "preds": preds, "confidence": confidence.astype(np.float32),
            "objective": objective.name, "names": np.array(table.subset(picks, "").names)}


# --------------------------------------------------------------------------- the command
def grade_photos(args, checkpoint: dict, device: torch.device, workers: int) -> None:
    import pandas as pd

    paths = collect_images(args.images)
    cam_dir = Path(args.cam) if args.cam else None
    table = predict_photos(checkpoint, paths, device, args.batch_size, workers, args.tta, cam_dir, args.force,
                           show=not args.quiet, min_quality=args.min_quality)
    provenance = photo_provenance(args, checkpoint)
    table = table.assign(**provenance)
    print(provenance_line(checkpoint, provenance))
    for row in table.itertuples():
        if row.status == GRADED:
            probs = " ".join(f"{getattr(row, f'p{g}'):.3f}" for g in GRADES)
            warning = f"\t(graded with --force: {row.reason})" if row.reason else ""
            said = (f"confidence {row.confidence:.1%}\tp0-p4 {probs}" if pd.notna(row.confidence)
                    else f"regressed grade {row.score:.2f}")
            pair = ("" if "partner" not in table else
                    f"\twith partner {row.partner}" if row.partner else "\talone (no partner photo graded)")
            print(f"{row.path}\tgraded\tgrade {row.grade} ({GRADE_NAMES[row.grade]})\t{said}\tquality "
                  f"{row.quality:.2f}{pair}{warning}")
        else:
            print(f"{row.path}\t{row.status}\t{row.reason}")
    counts = table["status"].value_counts()
    print(f"{len(table)} files: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in (GRADED, UNGRADABLE, UNREADABLE))
          + ("" if args.force or not counts.get(UNGRADABLE) else "; --force grades ungradable photos anyway")
          + ("" if "partner" not in table else
             f"; two-eye model: {int((table['partner'].fillna('') != '').sum())} graded with their partner, "
             f"{int(((table['status'] == GRADED) & (table['partner'].fillna('') == '')).sum())} alone"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, table.to_csv(index=False, float_format="%.6f"))
        print(f"wrote {args.out}")
    if cam_dir is not None and counts.get(GRADED):
        print(f"wrote {counts.get(GRADED)} Grad-CAM figures to {cam_dir}/")
    if counts.get(UNREADABLE) == len(table):
        raise UserError(nothing_read("--images", len(table), table["path"][0], table["reason"][0]))


def photo_provenance(args, checkpoint: dict) -> dict:
    """The constant columns of the --images table (PHOTO_PROVENANCE)."""
    min_quality = fundus.quality_model()["min_quality"] if args.min_quality is None else args.min_quality
    return {"checkpoint": str(args.checkpoint), "weights_digest": reported_digest(checkpoint),
            "quality_check": fundus.check_version(), "min_quality": float(min_quality)}


def provenance_line(checkpoint: dict, provenance: dict) -> str:
    """The line --images prints before its grades: what graded them, and what judged them gradable."""
    run = checkpoint["config"].get("run_name") or Path(provenance["checkpoint"]).parent.name
    return (f"graded by {provenance['checkpoint']} (run {run}, epoch {checkpoint.get('epoch', '?')}, weights "
            f"{provenance['weights_digest'][:12]}); quality check {provenance['quality_check']} at min quality "
            f"{provenance['min_quality']:.2f}")


def report_name(name: str, split: str, external: bool = False) -> str:
    """What an evaluation's JSON, figure, predictions and Grad-CAMs are named, one per checkpoint, data, TTA and
    split (name: <run>[_on_<dataset>][_tta]): <name>_<split>, except the two evaluations the README names, the
    run's test split (<run>) and another dataset's every image (<run>_on_<dataset>). So two splits never share
    a file: --split test and --split all of one dataset used to write the same one, the second replacing the
    first."""
    plain = split == ("all" if external else "test")
    return name if plain else f"{name}_{split}"


def predictions_path(log_dir: Path, name: str, split: str) -> Path:
    """<log dir>/<report_name>_predictions.csv of one of the run's own splits."""
    return log_dir / f"{report_name(name, split)}_predictions.csv"


def reference_data(checkpoint: dict, args, fundus: dataloader.FundusData, on: str | None):
    """(data, split) that operating points and kappa thresholds are chosen on, or None. On the run's own data
    the reference_split; on another dataset the run's own validation (or training) split, as a grader's
    operating points are set on its development data and then carried to the external set; --split all on
    the run's own data has no split left that is not reported."""
    if on is None:
        split = reference_split(fundus, args.split)
        return (fundus, split) if split else None
    if args.data_root is None:
        return None
    try:
        own = dataloader.load_run_data(checkpoint["config"], checkpoint.get("data", {}), log=lambda *a, **k: None)
    except UserError as err:
        print(f"evaluate.py: no operating points or kappa thresholds: the run's own data is not here ({err})")
        return None
    split = reference_split(own, "test")
    return (own, split) if split else None


def evaluate_split_command(args, checkpoint: dict, device: torch.device, workers: int) -> None:
    run_name = checkpoint["config"].get("run_name") or Path(args.checkpoint).parent.name
    fundus = run_data(checkpoint, args)
    table = reported_table(fundus, args.split)
    on = evaluated_on(checkpoint, args, fundus, table)
    table, overlap = without_training_photos(checkpoint, table) if on else (table, None)
    label = run_name + model_label(checkpoint)  # an exported file's evaluations sit beside the checkpoint's
    base = f"{label}_tta" if args.tta else label  # the run's own predictions, whatever data is reported
    name = f"{label}_on_{on}{'_tta' if args.tta else ''}" if on else base
    reported = report_name(name, args.split, on is not None)
    reference = reference_data(checkpoint, args, fundus, on)
    cams = report_name(f"{run_name}_on_{on}" if on else run_name, args.split, on is not None)  # TTA or not alike
    outputs = split_outputs(args, checkpoint, reported, reference, base, cams)
    predict_split = functools.partial(predict_table, checkpoint, device=device, batch_size=args.batch_size,
                                      workers=workers, tta=args.tta, show=not args.quiet)
    objective = objectives.of(checkpoint)
    summaries = predict_split(table=table)
    predictions = write_predictions(outputs["predictions"], table, summaries, objective,
                                    prediction_provenance(args, checkpoint, table, args.split))
    reference_csv = outputs.get("reference")
    chosen = None if reference is None else (write_predictions(
        reference_csv, getattr(*reference), predict_split(table=getattr(*reference)), objective,
        prediction_provenance(args, checkpoint, getattr(*reference), reference[1])), reference[1])
    scores = split_scores(predictions, chosen, objective)
    result = {"run_name": run_name, "arch": checkpoint["arch"], "pretrained": is_pretrained(checkpoint["config"]),
              "objective": objective.name,
              "checkpoint": str(args.checkpoint), "epoch": checkpoint["epoch"],
              "weights_digest": reported_digest(checkpoint),
              "two_eye": two_eye_fields(checkpoint, table),
              "split": args.split,
              "data_digest": table.digest(), "num_images": len(predictions), "tta": args.tta,
              "predictions": str(outputs["predictions"]),
              "reference_predictions": str(reference_csv) if reference_csv else None, **scores,
              "training_overlap": overlap,
              **dataset_fields(table, on, summaries, objective), **deployment_fields(checkpoint, args.checkpoint, device)}
    outputs["out"].parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(outputs["out"], json.dumps(result, indent=2))
    import plot  # matplotlib only when a figure is drawn

    outputs["figure"].parent.mkdir(parents=True, exist_ok=True)
    plot.plot_confusion(scores["confusion_matrix"], outputs["figure"])
    dataset = on or "the run's own data"
    where = (f"every gradable image of {dataset}" if args.split == "all"
             else f"the {args.split} split" + (f" of {on}" if on else ""))
    left_out = "".join(f", left out: {n} {reason}" for reason, n in table.excluded.items())
    print(f"{args.checkpoint} (epoch {checkpoint['epoch']}) on {where}: {result['num_images']} images{left_out}"
          + (", TTA x8" if args.tta else ""))
    print(format_report(scores))
    print(clinical_report(result))
    print(format_cost(result["cost"]))
    print(f"wrote {outputs['out']}, {outputs['predictions']}" + (f", {reference_csv}" if reference_csv else "")
          + f" and {outputs['figure']}")
    if args.cam_per_grade:
        outputs["cams"].parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(outputs["cams"]) as f:
            np.savez_compressed(f, run_name=run_name, weights_digest=result["weights_digest"],
                                **cam_samples(checkpoint, table, args.cam_per_grade, device))
        print(f"wrote {outputs['cams']} (Grad-CAMs of up to {args.cam_per_grade} images per grade; plot.py draws "
              "them)")


def split_outputs(args, checkpoint: dict, reported: str, reference, base: str, cams: str) -> dict:
    """Every file an evaluation of a split writes, each checked before any work (runtime.check_output_file):
    never the checkpoint it reads, never an existing file of another kind (a run's log, a checkpoint, a photo,
    a table the user gave); an evaluation run again rewrites its own files."""
    log_dir = Path(checkpoint["config"].get("log_dir", "logs"))
    main_csv = Path(args.predictions) if args.predictions else log_dir / f"{reported}_predictions.csv"
    outputs = {"predictions": main_csv, "out": Path(args.out) if args.out else log_dir / f"{reported}_eval.json",
               "figure": Path(args.figure_dir) / f"confusion_{reported}.png"}
    if reference is not None:
        outputs["reference"] = predictions_path(main_csv.parent, base, reference[1])
    if args.cam_per_grade:
        outputs["cams"] = outputs["out"].parent / f"{cams}_cams.npz"
    kinds = {"predictions": "a predictions table of evaluate.py", "reference": "a predictions table of evaluate.py",
             "out": "a metrics JSON of evaluate.py", "figure": "a figure drawn by matplotlib",
             "cams": "a set of Grad-CAM samples of evaluate.py"}
    flags = {"predictions": "--predictions", "out": "--out", "figure": "--figure-dir"}
    seen = {}
    for key, path in outputs.items():
        check_output_file(flags.get(key, "output"), path, kinds[key], inputs=[args.checkpoint])
        if path.resolve() in seen:
            raise UserError(f"{flags.get(key, 'output')} {path} is where this evaluation's {seen[path.resolve()]} "
                            "goes too; give another path")
        seen[path.resolve()] = kinds[key].split(" of ")[0].removeprefix("a ")
    return outputs  # their folders are made as each is written: a run refused later leaves none behind


def two_eye_fields(checkpoint: dict, table: dataloader.FundusTable) -> dict | None:
    """What an evaluation of the two-eye model records of it: its encoder, and how many eyes of the reported
    images were graded with their partner and how many alone (None for a single-eye model)."""
    if not twoeye.is_two_eye(checkpoint):
        return None
    encoder = checkpoint["two_eye"]["encoder"]
    return {"encoder": encoder["checkpoint"], "encoder_weights_digest": encoder["weights_digest"],
            **twoeye.pair_counts(twoeye.partner_index(table.names))}


def clinical_report(result: dict) -> str:
    """The screening block of the printed report: a few lines with the numbers clinicians judge a grader by."""
    ci = result["ci95"]
    span = lambda name: (f" [{ci[name][0]:.3f}, {ci[name][1]:.3f}]" if ci.get(name) else  # noqa: E731
                         " undefined (one class only: the split holds no referable or only referable photos)")
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"95 % intervals ({result['bootstrap']['resamples']} bootstrap resamples of "
             f"{result['bootstrap']['patients']} patients): accuracy{span('accuracy')}, kappa{span('kappa')}, "
             f"referable AUC{span('referable_auc')}"]
    for name, title in (("referable", "referable DR (grade >= 2)"), ("vision_threatening", "vision-threatening "
                                                                                            "DR (grade >= 3)")):
        m = result[name]
        auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
        lines.append(f"{title}: AUC {auc} | predicted grade: sensitivity {pct(m['sensitivity'])}, specificity "
                     f"{pct(m['specificity'])}, PPV {pct(m['ppv'])}, NPV {pct(m['npv'])} "
                     f"({m['positives']} positive, {m['negatives']} negative)")
        for point, values in (m["operating_points"] or {}).items():
            lines.append(f"  {point.replace('_', '-')} point (score >= {values['threshold']:.4f}, chosen on "
                         f"{m['chosen_on']}): sensitivity {pct(values['sensitivity'])}, specificity "
                         f"{pct(values['specificity'])}")
        for point, why in m.get("operating_points_unset", {}).items():
            lines.append(f"  {point.replace('_', '-')} point {why}")
    lines.append(patient_report(result))
    if result.get("two_eye"):
        pairs = result["two_eye"]
        lines.append(f"two-eye model (encoder {pairs['encoder']}): {pairs['with_partner']} of {pairs['eyes']} eyes "
                     f"graded with their partner, {pairs['alone']} alone")
    if result["thresholds"] is not None:
        lines.append(f"kappa-tuned grading (continuous grade cut at "
                     f"{', '.join(f'{t:.2f}' for t in result['thresholds'])}, tuned on {result['thresholds_from']}): "
                     f"kappa {result['kappa_tuned']:.4f}, accuracy {result['accuracy_tuned']:.2%}")
    lines.append(f"calibration: expected calibration error {result['ece']:.4f} ({metrics.ECE_BINS} bins)"
                 if result["ece"] is not None else f"calibration: {result['calibration_note']}")
    return "\n".join(lines)


def patient_report(result: dict) -> str:
    """The patient-level screening line: a patient referred when either eye is referable."""
    m, ci = result["patient_referable"], result["ci95"]
    if not m["applies"]:
        return f"referable DR by patient: not reported, {m['why_not']}"
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    span = lambda name: f" [{ci[name][0]:.3f}, {ci[name][1]:.3f}]" if ci.get(name) else ""  # noqa: E731
    auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
    return (f"referable DR by patient (referred when either eye is; {m['patients']} patients, {m['with_both_eyes']} "
            f"with both eyes, {m['with_one_eye']} with one): AUC {auc}{span('patient_referable_auc')} | "
            f"sensitivity {pct(m['sensitivity'])}{span('patient_sensitivity')}, specificity "
            f"{pct(m['specificity'])}{span('patient_specificity')} ({m['positives']} positive, {m['negatives']} "
            "negative)")


def evaluated_on(checkpoint: dict, args, fundus: dataloader.FundusData, table: dataloader.FundusTable) -> str | None:
    """The dataset an evaluation is named after (<run>_on_<dataset>_eval.json, plot.py's row "<run> on
    <dataset>") when it is not the run's own data: data whose splits' digests (names and grades) differ from
    the ones the checkpoint recorded. A moved copy of the run's folder is the run's own data, wherever it lies,
    and so is --split all on it. The name is the layout's for a public dataset (messidor2), else the data
    root's folder name."""
    if args.data_root is None:
        return None  # run_data read the run's own data and checked its digests
    recorded = checkpoint.get("data", {}).get("splits")
    if recorded:
        found = {name: split.digest() for name, split in fundus.splits().items()}
        own = all(found.get(name) == split["digest"] for name, split in recorded.items())
    else:  # a checkpoint from before digests were recorded: the folder tells
        root = checkpoint.get("data", {}).get("root")
        own = root is not None and Path(args.data_root).resolve() == Path(root).resolve()
    return None if own else (table.dataset or "data")


IN_TRAINING = "in the run's training data"  # the reason an external photo is left out (without_training_photos)


def without_training_photos(checkpoint: dict, table: dataloader.FundusTable):
    """(the table, what was found) for an evaluation on another dataset: photos that are photos the run trained
    or chose best.pt on (its train and val splits; dataloader.shared_photos: the same name and bytes, or the same
    bytes under another name) are left out, counted, and said in one line, so that no external figure is
    measured on photos the model saw. Photos that only share a name with one of them (other bytes) are kept and
    counted: the figures are marked with them. When the run's own data is not here, nothing can be checked, and
    that is said and recorded."""
    try:
        own = dataloader.load_run_data(checkpoint["config"], checkpoint.get("data", {}), log=lambda *a, **k: None)
    except UserError as err:
        print(f"evaluate.py: not checked for photos the run trained on: its own data is not here ({err})")
        return table, {"checked": False, "why": str(err)}
    splits = [name for name in ("train", "val") if getattr(own, name) is not None]
    found = dataloader.shared_photos(table, [getattr(own, name) for name in splits])
    left_out = found["by_name"] | found["by_content"]
    record = {"checked": True, "against": splits, "left_out": int(left_out.sum()),
              "by_name": int(found["by_name"].sum()), "by_content": int(found["by_content"].sum()),
              "same_name_other_bytes": int(found["same_name_only"].sum())}
    if left_out.any():
        example = Path(table.paths[np.flatnonzero(left_out)[0]]).name
        print(f"evaluate.py: left out {record['left_out']} of {len(table)} photos of {table.dataset}, the run's own "
              f"{' and '.join(splits)} photos ({record['by_name']} by name and content, {record['by_content']} by "
              f"content under another name; first: {example}): an external figure is of photos the model did not "
              "see")
        kept = np.flatnonzero(~left_out)
        if not len(kept):
            raise UserError(f"every photo of {table.source} is a photo the run trained or chose on; there is "
                            "nothing external to evaluate")
        excluded = {**table.excluded, IN_TRAINING: table.excluded.get(IN_TRAINING, 0) + record["left_out"]}
        table = dataclasses.replace(table.subset(kept, table.source), excluded=excluded)
    of_test = dataloader.shared_photos(table, [own.test])
    record["of_own_test"] = int((of_test["by_name"] | of_test["by_content"]).sum())
    if record["of_own_test"]:
        print(f"evaluate.py: note: {record['of_own_test']} of the {len(table)} photos evaluated are photos of the "
              "run's own test split: kept, but those figures are not of other data")
    if record["same_name_other_bytes"]:
        print(f"evaluate.py: note: {record['same_name_other_bytes']} photos of {table.dataset} share a name with a "
              f"photo of the run's {' or '.join(splits)} split but not its bytes: kept (another photo under the "
              "same naming scheme, or the same one re-encoded or cropped, which is not told apart here)")
    return table, record


def dataset_fields(table: dataloader.FundusTable, on: str | None, summaries: np.ndarray,
                   objective: objectives.Objective) -> dict:
    """What the metrics JSON records of the data: the dataset, the one it is named after (None: the run's
    own split), the photos its tables list but no split uses, and on EyePACS' official test split the
    accuracy and kappa per leaderboard (Usage Public/Private), comparable with the competition's."""
    fields = {"dataset": table.dataset, "evaluated_on": on, "excluded": table.excluded}
    usage = table.extra.get("usage")
    if usage is not None:
        scored = ~np.isnan(summaries).any(axis=1)
        fields["by_usage"] = {}
        for board in sorted(set(usage[scored].tolist())):
            rows = scored & (usage == board)
            board_metrics = metrics.grading_metrics(table.grades[rows], objective.numbers(summaries[rows])["grade"])
            fields["by_usage"][board] = {"num_images": int(rows.sum()), "accuracy": board_metrics["accuracy"],
                                         "kappa": board_metrics["kappa"]}
    return fields


def deployment_fields(checkpoint: dict, path, device: torch.device) -> dict:
    """What ran the model (torch or onnxruntime, and for an exported file its precision) and the cost of a grade."""
    fields = {"runtime": OnnxGrader.runtime if EXPORTED in checkpoint else TorchGrader.runtime,
              "cost": cost_of_a_grade(checkpoint, path, device)}
    if EXPORTED in checkpoint:
        fields["precision"] = checkpoint[EXPORTED]["precision"]
        fields.update(checkpoint.get(EXPORTED_WEIGHTS, {}))
    return fields


def check_args(args) -> None:
    """Flags out of range, and outputs that cannot be written, before any work."""
    rules = [(args.batch_size >= 1, "--batch-size must be at least 1"),
             (args.workers is None or args.workers >= 0, "--workers must not be negative"),
             (args.cam_per_grade >= 0, "--cam-per-grade must not be negative"),
             (not args.cam or args.images, "--cam needs --images (for a split, --cam-per-grade feeds plot.py's "
                                           "contact sheet)"),
             (not args.force or args.images, "--force needs --images: it grades photos the quality check rejects"),
             (args.min_quality is None or args.images, "--min-quality needs --images (data/prepare.py has its own)"),
             (args.min_quality is None or 0 <= args.min_quality <= 1, "--min-quality must lie between 0 and 1"),
             (not (args.predictions and args.images), "--predictions is for a split; with --images, --out is the "
                                                       "table of grades"),
             (args.layout == "auto" or args.data_root,
              "--layout needs --data-root (a run's own data keeps its layout)")]
    if deploy.is_onnx_file(args.checkpoint):  # onnxruntime runs the file forward only, on the CPU
        rules += [(not args.cam and not args.cam_per_grade, "--cam and --cam-per-grade need the PyTorch checkpoint "
                                                            "(Grad-CAM takes gradients an ONNX file does not give)"),
                  (args.device != "cuda", "--device cuda: an ONNX file runs in onnxruntime on the CPU here; evaluate "
                                          "the checkpoint for the GPU")]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    if args.images and args.out:
        check_output_file("--out", args.out, "a table of grades of evaluate.py --images",
                          inputs=[args.checkpoint, *collect_images(args.images)])
    for flag in ("out", "predictions"):
        if getattr(args, flag):
            check_output(f"--{flag}", getattr(args, flag), folder=False)
    if args.cam:
        check_output("--cam", args.cam, folder=True)
    if not args.images:
        check_output("--figure-dir", args.figure_dir, folder=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    checkpoint = load_model_file(args.checkpoint)
    device = CPU if EXPORTED in checkpoint else choose_device(args.device)
    workers = args.workers if args.workers is not None else dataloader.default_workers()
    if args.images:
        grade_photos(args, checkpoint, device, workers)
    else:
        evaluate_split_command(args, checkpoint, device, workers)


if __name__ == "__main__":
    main()
