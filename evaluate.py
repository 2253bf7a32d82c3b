"""Evaluate one checkpoint: accuracy, quadratic weighted kappa, macro F1, per-grade table, confusion matrix.

    python evaluate.py checkpoints/resnet50_pretrained/best.pt [--tta]

The model is rebuilt from what the checkpoint says (architecture, classes, image size) and the split
is rebuilt from the data and split flags the run trained with, unless --data-root says otherwise.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, \
    precision_recall_fscore_support

import dataloader as data
import models
import train
from errors import UserError, exit_on_user_error

GRADES = list(range(data.NUM_GRADES))


def build_parser() -> argparse.ArgumentParser:
    p = train.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a .pt file written by train.py")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one the run trained on)")
    p.add_argument("--image-dir", default=None, help="image folder (default: the run's, or <data-root>/images)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--tta", action="store_true", help="average the softmax over the 8 flips and quarter turns")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: CPUs, at most 16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="metrics JSON (default: <log dir>/<run>[_tta]_eval.json)")
    p.add_argument("--figure-dir", default="figures", help="where the confusion matrix PNG goes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------- metrics
def grading_metrics(grades, preds) -> dict:
    """The numbers a DR grader is judged by, all from scikit-learn, over the five grades."""
    grades, preds = np.asarray(grades), np.asarray(preds)
    precision, recall, f1, support = precision_recall_fscore_support(grades, preds, labels=GRADES, zero_division=0)
    kappa = cohen_kappa_score(grades, preds, weights="quadratic", labels=GRADES)
    return {
        "accuracy": float(accuracy_score(grades, preds)),
        "kappa": 0.0 if np.isnan(kappa) else float(kappa),
        "macro_f1": float(f1_score(grades, preds, labels=GRADES, average="macro", zero_division=0)),
        "per_class": {str(g): {"precision": float(precision[g]), "recall": float(recall[g]), "f1": float(f1[g]),
                               "support": int(support[g])} for g in GRADES},
        "confusion_matrix": confusion_matrix(grades, preds, labels=GRADES).tolist(),
    }


def format_report(metrics: dict) -> str:
    lines = [f"accuracy {metrics['accuracy']:.2%} | quadratic weighted kappa {metrics['kappa']:.4f} | "
             f"macro F1 {metrics['macro_f1']:.4f}", "",
             f"{'grade':<18}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for g in GRADES:
        c = metrics["per_class"][str(g)]
        lines.append(f"{g} {data.GRADE_NAMES[g]:<16}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}"
                     f"{c['support']:>10}")
    matrix = np.asarray(metrics["confusion_matrix"])
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    lines += ["", "confusion matrix (rows: true grade, columns: predicted) counts | row-normalised"]
    lines += [f"  {g}  " + " ".join(f"{n:>6}" for n in matrix[g]) + "  | " + " ".join(f"{r:5.2f}" for r in rows[g])
              for g in GRADES]
    return "\n".join(lines)


# --------------------------------------------------------------------------- model and data
def device_for(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def load_model(checkpoint: dict, path, device: torch.device) -> torch.nn.Module:
    """The checkpoint's architecture with its weights, in eval mode; a mismatch is one sentence."""
    arch = checkpoint["arch"]
    model = models.build_model(arch, checkpoint.get("num_classes", data.NUM_GRADES))
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"{path} says arch {arch} but its weights do not fit {arch} ({detail[:160]})") from None
    memory_format = torch.channels_last if checkpoint["config"].get("channels_last", True) else torch.contiguous_format
    return model.to(device, memory_format=memory_format).eval()


def split_table(checkpoint: dict, args) -> data.FundusTable:
    config, recorded = checkpoint["config"], checkpoint.get("data", {})
    root = args.data_root if args.data_root is not None else recorded.get("root", config.get("data_root"))
    image_dir = args.image_dir if args.image_dir is not None else (
        recorded.get("image_dir") if args.data_root is None else None)
    if args.data_root is None and recorded.get("layout") == "demo":
        import synthetic

        synthetic.ensure_demo(root)  # deterministic: regenerated identical when deleted
    fundus = data.load_fundus_data(root, image_dir, config.get("test_fraction", 0.2),
                                   config.get("val_fraction", 0.0), config.get("split_seed", 0))
    table = getattr(fundus, args.split)
    if table is None:
        raise UserError(f"--split val: the run held out no validation part (it trained with --val-fraction 0)")
    return table


def evaluate_checkpoint(checkpoint: dict, table: data.FundusTable, device: torch.device, batch_size: int,
                        workers: int, tta: bool, show: bool = False) -> tuple[dict, np.ndarray]:
    """Metrics over the table, and the softmax probabilities [N, 5] (NaN rows for skipped images)."""
    model = load_model(checkpoint, table.source, device)
    config = checkpoint["config"]
    amp_dtype, _ = train.precision(argparse.Namespace(amp=config.get("amp")), device)
    dataset = data.FundusDataset(table, checkpoint["image_size"], config.get("skip_bad_images", False))
    loader = data.build_loader(dataset, batch_size, data.ShardSampler(len(dataset)), workers, device)
    transform = data.BatchTransform(device, augment=False, channels_last=config.get("channels_last", True))
    log_probs, grades = train.predict(model, loader, transform, device, train.autocast(device, amp_dtype),
                                      tta=tta, desc="evaluate", show=show)
    probs = log_probs.exp().numpy()
    keep = grades.numpy() >= 0
    probs[~keep] = np.nan
    return grading_metrics(grades.numpy()[keep], probs[keep].argmax(1)), probs


# --------------------------------------------------------------------------- the command
@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    checkpoint = train.load_checkpoint(args.checkpoint)
    device = device_for(args.device)
    run_name = checkpoint["config"].get("run_name") or Path(args.checkpoint).parent.name
    table = split_table(checkpoint, args)
    workers = args.workers if args.workers is not None else data.default_workers()
    metrics, _ = evaluate_checkpoint(checkpoint, table, device, args.batch_size, workers, args.tta,
                                     show=not args.quiet)
    stem = f"{run_name}_tta" if args.tta else run_name
    result = {"run_name": run_name, "arch": checkpoint["arch"],
              "pretrained": bool(checkpoint["config"].get("pretrained") or checkpoint["config"].get("weights")),
              "checkpoint": str(args.checkpoint), "epoch": checkpoint["epoch"], "split": args.split,
              "num_images": int(sum(c["support"] for c in metrics["per_class"].values())),
              "tta": args.tta, **metrics}
    out = Path(args.out) if args.out else Path(checkpoint["config"].get("log_dir", "logs")) / f"{stem}_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    import plot  # matplotlib only when a figure is drawn

    figure = Path(args.figure_dir) / f"confusion_{stem}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot.plot_confusion(metrics["confusion_matrix"], figure)
    print(f"{args.checkpoint} (epoch {checkpoint['epoch']}) on the {args.split} split: {result['num_images']} images"
          + (", TTA x8" if args.tta else ""))
    print(format_report(metrics))
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
