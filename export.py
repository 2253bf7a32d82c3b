"""Export a checkpoint as one self-describing ONNX file, proven to grade as the checkpoint does.

    python export.py checkpoints/resnet18_scratch/best.pt            # -> checkpoints/resnet18_scratch/best.onnx
    python export.py checkpoints/resnet18_scratch/best.pt --int8     # -> best_int8.onnx

The file takes uint8 RGB images [N, 3, S, S] at the run's size (as a decoded photo is), normalises them
inside, and gives what the run's objective outputs: the five grade probabilities (ce, ordinal), or the
regressed grade (mse). Its metadata_props say what a user needs to grade without this repo: the objective and
how its output becomes a grade, architecture, size, grade names, preprocessing, the operating points and kappa
cut points the evaluation chose, the run and its data. Before writing, the file is run in onnxruntime on a
sample of the run's test images and compared with PyTorch: any output further than 1e-4 or any other grade,
and no file is written. --int8 quantises it (static, calibrated on training images) and checks the test split's
accuracy, kappa and referable AUC against fp32 instead (within 0.01).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import torch

import dataloader
import deploy
import evaluate  # the one path from pixels to grades: export is checked against the evaluation's own model
import metrics
import objectives
import twoeye
from runtime import (GRADE_NAMES, Parser, RunFailed, UserError, atomic_write, check_output, check_output_file,
                     checkpoint_digest, exit_on_user_error, input_file,
                     load_checkpoint)

# fp32: onnxruntime's kernels reorder sums, not their terms; 1e-6 is measured on ResNet18/50, 1e-4 leaves room
# for other CPUs' instruction sets while still catching any wrong weight or preprocessing (errors of 1e-2+)
MAX_PROBABILITY_DIFFERENCE = 1e-4
# INT8: what a grader may lose to quantisation on the test split, in accuracy, kappa and referable AUC
MAX_METRIC_LOSS = 0.01
CPU = torch.device("cpu")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="a .pt file written by train.py")
    p.add_argument("--out", default=None,
                   help="the ONNX file (default: beside the checkpoint, best.pt -> best.onnx, with --int8 "
                        "best_int8.onnx)")
    p.add_argument("--int8", action="store_true",
                   help="quantise to INT8 (static, calibrated on training images); checked on the test split's metrics")
    g = p.add_argument_group("the check against PyTorch")
    g.add_argument("--data-root", default=None, help="dataset folder (default: the one the run trained on)")
    g.add_argument("--image-dir", default=None, help="image folder (default: the run's)")
    g.add_argument("--check-images", type=int, default=64,
                   help="test images the fp32 file is compared with PyTorch on (spread over the split)")
    # 64 images let the 1-epoch demo model's kappa move by 0.011; 256 kept it exact (and the 4-epoch one's)
    g.add_argument("--calibration-images", type=int, default=256,
                   help="with --int8: training images the activation ranges are calibrated on")
    g.add_argument("--batch-size", type=int, default=16)
    return p


def default_out(checkpoint: Path, int8: bool) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}{'_int8' if int8 else ''}{deploy.ONNX_SUFFIX}")


def check_args(args) -> None:
    rules = [(args.check_images >= 1, "--check-images must be at least 1"),
             (args.calibration_images >= 1, "--calibration-images must be at least 1"),
             (args.batch_size >= 1, "--batch-size must be at least 1"),
             (not deploy.is_onnx_file(args.checkpoint), f"{args.checkpoint} is already an ONNX file; pass the .pt "
                                                        "checkpoint it came from"),
             (args.out is None or deploy.is_onnx_file(args.out), f"--out {args.out} must end in .onnx")]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    if args.out:
        check_output("--out", args.out, folder=False)


# --------------------------------------------------------------------------- images and probabilities
def spread(n: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(n) (every grade of a split sorted by grade gets its share)."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def uint8_batches(checkpoint: dict, table: dataloader.FundusTable, batch_size: int):
    """(uint8 images [B, 3, S, S], grades) of the table, as the run's evaluation loads them; for the two-eye
    model ((eyes, partners, flags), grades), each eye with its partner in the table."""
    dataset = evaluate.run_dataset(checkpoint, table)
    collate = dataloader.collate_fundus
    if twoeye.is_two_eye(checkpoint):
        dataset, collate = twoeye.PairDataset(dataset, twoeye.partner_index(table.names)), twoeye.collate_pairs
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def summaries(grader, batches: list) -> np.ndarray:
    """The grader's outputs (the objective's summaries) of the batches."""
    with torch.inference_mode():
        return torch.cat([grader(images) for images, _ in batches]).numpy().astype(np.float64)


def compare(reference: np.ndarray, exported: np.ndarray, objective: objectives.Objective) -> dict:
    """The largest output difference and the images whose grade (the objective's) differs."""
    return {"images": len(reference), "max_difference": float(np.abs(reference - exported).max()),
            "grades_differ": int((objective.numbers(reference)["grade"] != objective.numbers(exported)["grade"]).sum())}


def headline(grades: np.ndarray, outputs: np.ndarray, objective: objectives.Objective) -> dict:
    """The three numbers the INT8 file is held to: accuracy, quadratic kappa, referable-DR AUC."""
    numbers = objective.numbers(outputs)
    scores = metrics.grading_metrics(grades, numbers["grade"])
    grade = metrics.SCREENING["referable"]
    auc = metrics.screening_metrics(grades, numbers["grade"], numbers["screening"][grade], grade, None, None)["auc"]
    return {"accuracy": scores["accuracy"], "kappa": scores["kappa"], "referable_auc": auc}


# --------------------------------------------------------------------------- what the file says of itself
# What the output is and how it becomes a grade, per objective (objectives.Objective.grade, in words)
OUTPUT_TEXT = {
    "ce": f"{deploy.OUTPUT}: float32 [batch, 5], softmax over grades 0-4 (objective ce: the grade is the argmax)",
    "ordinal": f"{deploy.OUTPUT}: float32 [batch, 5], grade probabilities 0-4 of CORN ordinal regression (objective "
               "ordinal: the grade is the number of k = 1..4 with P(grade >= k) = p_k + ... + p_4 above 0.5)",
    "mse": "grade: float32 [batch, 1], the regressed grade (objective mse: the grade is it cut at 0.5, 1.5, 2.5, "
           "3.5, or at kappa_thresholds)",
}


def evaluation_choices(checkpoint: dict, path: Path) -> dict:
    """The operating points and kappa cut points evaluate.py chose for this checkpoint (logs/<run>_eval.json,
    when it evaluated these very weights without TTA: the weights' digest, as plot.py ties evaluations to
    checkpoints, not the file's path and epoch, which a run made again under the same name repeats), with the
    split they were chosen on; else a sentence saying there are none and why."""
    run_name = checkpoint["config"].get("run_name") or path.parent.name
    log = Path(checkpoint["config"].get("log_dir", "logs")) / f"{run_name}_eval.json"
    none = {"operating_points": "none", "kappa_thresholds": "none"}
    if not log.is_file():
        return {**none, "evaluation": f"none: {log} does not exist (run evaluate.py {path} first to carry them)"}
    result = json.loads(log.read_text())
    same = result.get("weights_digest") == checkpoint_digest(checkpoint) and not result.get("tta")
    if not same:
        return {**none, "evaluation": f"none: {log} evaluated {result.get('checkpoint')} (epoch "
                                      f"{result.get('epoch')}{', with TTA' if result.get('tta') else ''}), not "
                                      f"this checkpoint's weights (run evaluate.py {path} first to carry them)"}
    points = {name: {"grade_at_least": result[name]["grade_at_least"], "chosen_on": result[name]["chosen_on"],
                     **{point: values["threshold"]
                        for point, values in (result[name]["operating_points"] or {}).items()},
                     # a point the choosing split was too small for: the sentence, not a threshold that misses
                     **({"not_chosen": result[name]["operating_points_unset"]}
                        if result[name].get("operating_points_unset") else {})}
              for name in metrics.SCREENING if result.get(name)}
    thresholds = "none" if result.get("thresholds") is None else {
        "expected_grade_cuts": result["thresholds"], "chosen_on": result["thresholds_from"]}
    return {"operating_points": points or "none", "kappa_thresholds": thresholds,
            "evaluation": f"{log}: {result.get('split')} split, accuracy {result.get('accuracy'):.4f}, "
                          f"kappa {result.get('kappa'):.4f}"}


def data_digest(data: dict) -> str:
    """sha256 of the run's splits (names and grades of each, in order) as its checkpoint recorded them."""
    splits = {name: split["digest"] for name, split in sorted(data.get("splits", {}).items())}
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def metadata(checkpoint: dict, path: Path, precision: str, check: dict, parameters: int) -> dict:
    """metadata_props: what a user needs to grade with the file alone, and the checkpoint's record that
    evaluate.py rebuilds the run's data and names from."""
    size = checkpoint["image_size"]
    data = checkpoint.get("data", {})
    ben_graham = evaluate.trained_on_ben_graham(checkpoint)
    objective = objectives.of(checkpoint)
    record = {key: checkpoint.get(key) for key in ("arch", "num_classes", "objective", "image_size", "epoch", "best_epoch",
                                                   "best_metric", "best_metric_name", "pretrained_source", "config",
                                                   "data")}
    # the checkpoint's weights, so that plot.py ties the file's evaluations to the run's best.pt as a checkpoint's
    record["weights_digest"] = checkpoint_digest(checkpoint)
    if twoeye.is_two_eye(checkpoint):  # what the file is, without the head's weights (they are in the graph)
        record["two_eye"] = {k: v for k, v in checkpoint["two_eye"].items() if k != "head"}
    return {
        "arch": checkpoint["arch"], "image_size": str(size), "precision": precision,
        "grade_names": list(GRADE_NAMES), "objective": objective.name,
        "input": f"{deploy.INPUT}: uint8 RGB [batch, 3, {size}, {size}], pixel values 0-255 (no normalisation)"
                 + (f"; two-eye model: {deploy.PARTNER_INPUTS[0]} the same for each eye's partner (the patient's "
                    f"other eye, <patient>_left/_right), {deploy.PARTNER_INPUTS[1]} float32 [batch], 1 where it is "
                    "the partner and 0 to grade the eye alone (pass its own photo then); the output is of `images`: "
                    "grade both eyes as two rows, each with the other as partner"
                    if twoeye.is_two_eye(checkpoint) else ""),
        "output": OUTPUT_TEXT[objective.name],
        "preprocessing": {
            "eye_crop": "the eye cropped to a square (data/prepare.py does it to camera photos; evaluate.py --images "
                        "does it on the fly), then the centre square resized to the image size, bilinear",
            "ben_graham": ben_graham,
            "normalisation": "inside the graph: ImageNet mean and std of 0-255 pixels"},
        **evaluation_choices(checkpoint, path),
        "run_name": checkpoint["config"].get("run_name") or path.parent.name,
        "data_digest": data_digest(data), "dataset": data.get("dataset", ""),
        "parameters": str(parameters), "checked_against_pytorch": check,
        "exporter": f"torch {torch.__version__}, opset {deploy.OPSET}, Python {platform.python_version()}",
        "checkpoint": record,
    }


def graph_record(model_bytes: bytes) -> dict:
    """The digest of the weights in the file's own graph (deploy.graph_digest: BatchNorm folded, and with --int8
    quantised, so not the checkpoint's), which evaluate.py recomputes from the file it runs: a file whose weights
    were changed after export is then reported under its own digest, never the checkpoint's."""
    return {"graph_weights_digest": deploy.graph_digest(model_bytes)}


# --------------------------------------------------------------------------- the command
def check_fp32(torch_grader, onnx_grader, batches: list) -> dict:
    """PyTorch (eval mode, fp32, CPU) and onnxruntime on the same uint8 images; refuses on any difference."""
    result = compare(summaries(torch_grader, batches), summaries(onnx_grader, batches), torch_grader.objective)
    print(f"fp32: onnxruntime vs PyTorch on {result['images']} test images: largest output difference "
          f"{result['max_difference']:.2e}, {result['grades_differ']} grades differ")
    if result["max_difference"] > MAX_PROBABILITY_DIFFERENCE or result["grades_differ"]:
        raise RunFailed(f"the exported model does not grade as the checkpoint does (largest output difference "
                        f"{result['max_difference']:.2e} > {MAX_PROBABILITY_DIFFERENCE:g} or {result['grades_differ']} "
                        "grades differ); no file written")
    return result


def check_int8(fp32_grader, int8_grader, batches: list, objective: objectives.Objective) -> dict:
    """The test split's accuracy, kappa and referable AUC of the INT8 file, each within MAX_METRIC_LOSS of fp32's."""
    grades = torch.cat([g for _, g in batches]).numpy()
    fp32 = headline(grades, summaries(fp32_grader, batches), objective)
    int8 = headline(grades, summaries(int8_grader, batches), objective)
    gaps = {k: abs(int8[k] - fp32[k]) for k in fp32 if fp32[k] is not None and int8[k] is not None}
    print(f"int8 vs fp32 on {len(grades)} test images: " + ", ".join(
        f"{k} {int8[k]:.4f} vs {fp32[k]:.4f}" for k in gaps))
    worst = max(gaps, key=gaps.get)
    if gaps[worst] > MAX_METRIC_LOSS:
        raise RunFailed(f"INT8 changes the test split's {worst} by {gaps[worst]:.4f} (> {MAX_METRIC_LOSS}); "
                        "no file written: deploy the fp32 file")
    return {"images": len(grades), "fp32": fp32, "int8": int8, "max_metric_change": gaps[worst]}


def fp32_file(checkpoint: dict, path: Path, data: dataloader.FundusData, args):
    """(the fp32 file as a ModelProto, its onnxruntime grader, the check against PyTorch, parameters)."""
    # the reference is fp32 on the CPU, as the file is, whatever precision the run trained and evaluates in
    model, transform, _ = evaluate.inference_setup(checkpoint, path, CPU)
    objective, two_eye = objectives.of(checkpoint), twoeye.is_two_eye(checkpoint)
    kind = evaluate.TwoEyeGrader if two_eye else evaluate.TorchGrader
    torch_grader = kind(model, transform, contextlib.nullcontext(), objective)
    proto = deploy.export_fp32(model, checkpoint["image_size"], objective, two_eye)
    onnx_grader = evaluate.OnnxGrader(deploy.session(proto.SerializeToString()))
    sample = data.test.subset(spread(len(data.test), args.check_images), data.test.source)
    check = check_fp32(torch_grader, onnx_grader, list(uint8_batches(checkpoint, sample, args.batch_size)))
    return proto, onnx_grader, check, sum(p.numel() for p in model.parameters())


def int8_file(checkpoint: dict, data: dataloader.FundusData, proto, fp32_grader, args) -> tuple[bytes, str, dict]:
    """(the INT8 file's bytes, its precision in words, its check against fp32 on the test split)."""
    calibration = data.train.subset(spread(len(data.train), args.calibration_images), data.train.source)
    model_bytes = deploy.quantise_static(proto, [tuple(t.numpy() for t in images) if isinstance(images, tuple)
                                                 else images.numpy()
                                                 for images, _ in uint8_batches(checkpoint, calibration, args.batch_size)])
    check = check_int8(fp32_grader, evaluate.OnnxGrader(deploy.session(model_bytes)),
                       list(uint8_batches(checkpoint, data.test, args.batch_size)), objectives.of(checkpoint))
    return model_bytes, f"int8 (static, calibrated on {len(calibration)} training images)", check


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    path = input_file("checkpoint", args.checkpoint)
    checkpoint = load_checkpoint(path)
    deploy.require("export.py")
    out = Path(args.out) if args.out else default_out(path, args.int8)
    check_output_file("--out", out, "an ONNX model written by export.py", inputs=[path])
    data = evaluate.run_data(checkpoint, argparse.Namespace(data_root=args.data_root, image_dir=args.image_dir,
                                                            layout="auto"))
    proto, fp32_grader, check, parameters = fp32_file(checkpoint, path, data, args)
    model_bytes, precision = proto.SerializeToString(), "fp32"
    if args.int8:
        model_bytes, precision, int8_check = int8_file(checkpoint, data, proto, fp32_grader, args)
        check = {"fp32": check, "int8": int8_check}
    model_bytes = deploy.with_metadata(model_bytes, {**metadata(checkpoint, path, precision, check, parameters),
                                                     **graph_record(model_bytes)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(model_bytes)
    print(f"wrote {out} ({len(model_bytes) / 1e6:.1f} MB, {precision}, opset {deploy.OPSET}); "
          f"python evaluate.py {out} evaluates it as the checkpoint")


if __name__ == "__main__":
    main()
