"""export.py and evaluate.py on an exported file: PyTorch in eval mode is the oracle for onnxruntime,
scikit-learn for the metrics, the checkpoint's own evaluation for the exported file's."""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import dataloader  # noqa: E402
import deploy  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import models  # noqa: E402
import objectives  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """A ResNet18 trained 2 epochs on the tiny demo set (with a validation split, so that the evaluation
    chooses operating points), evaluated, and exported."""
    out = tmp_path_factory.mktemp("export")
    train.main(["--data-root", str(tiny_demo), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                "--epochs", "2", "--val-fraction", "0.3", "--optimizer", "adamw", "--checkpoint-dir",
                str(out / "checkpoints"), "--log-dir", str(out / "logs"), "--quiet"])
    ckpt = out / "checkpoints" / "resnet18_scratch" / "best.pt"
    evaluate.main([str(ckpt), "--workers", "0", "--quiet", "--figure-dir", str(out / "figures")])
    export.main([str(ckpt)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.main([str(ckpt.with_suffix(".onnx")), "--workers", "0", "--quiet",
                       "--figure-dir", str(out / "figures")])
    (out / "onnx_eval.txt").write_text(printed.getvalue())
    return out, tiny_demo, ckpt


def reference_model(ckpt):
    """The checkpoint in PyTorch, eval mode, with the evaluation's normalisation: the oracle."""
    checkpoint = torch.load(ckpt, weights_only=True)
    model = models.build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["model"])
    transform = dataloader.BatchTransform(torch.device("cpu"), augment=False)
    model.eval()

    def probs(images):
        with torch.no_grad():
            return torch.softmax(model(transform(images)), 1).numpy()
    return probs


def test_onnx_file_grades_as_pytorch_on_the_same_uint8_images(run, capsys):
    out, root, ckpt = run
    path = ckpt.with_suffix(".onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [deploy.OPSET]
    (image_input,) = proto.graph.input
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    data = dataloader.load_fundus_data(root, val_fraction=0.3)
    images = torch.stack([dataloader.to_uint8_chw(dataloader.load_square(str(p), 32)) for p in data.test.paths])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = reference_model(ckpt)(images)
    for batch in (len(images), 1):  # the batch is dynamic
        got = np.concatenate([session.run(None, {"images": images[i:i + batch].numpy()})[0]
                              for i in range(0, len(images), batch)])
        assert np.abs(got - expected).max() <= 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.allclose(got.sum(1), 1, atol=1e-5)  # probabilities, not logits


def test_metadata_says_how_to_grade_without_the_repo(run):
    out, root, ckpt = run
    meta = deploy.read_metadata(ckpt.with_suffix(".onnx"))
    evaluation = json.loads((out / "logs" / "resnet18_scratch_eval.json").read_text())
    checkpoint = torch.load(ckpt, weights_only=True)
    assert meta["arch"] == "resnet18" and meta["image_size"] == 32 and meta["precision"] == "fp32"
    assert meta["grade_names"] == ["No DR", "Mild", "Moderate", "Severe", "Proliferative"]
    assert meta["preprocessing"]["ben_graham"] is False and "eye" in meta["preprocessing"]["eye_crop"]
    referable = meta["operating_points"]["referable"]
    assert referable["chosen_on"] == "val" == evaluation["referable"]["chosen_on"]
    for point in ("high_sensitivity", "high_specificity"):  # a threshold, or why the val split chose none
        chosen = (evaluation["referable"]["operating_points"] or {}).get(point)
        if chosen:
            assert referable[point] == chosen["threshold"]
        else:
            assert referable["not_chosen"][point] == evaluation["referable"]["operating_points_unset"][point]
    assert meta["kappa_thresholds"] == {"expected_grade_cuts": evaluation["thresholds"], "chosen_on": "val"}
    assert meta["run_name"] == "resnet18_scratch" and re.fullmatch(r"[0-9a-f]{64}", meta["data_digest"])
    assert meta["checkpoint"]["config"] == checkpoint["config"] and meta["checkpoint"]["epoch"] == checkpoint["epoch"]
    assert meta["checked_against_pytorch"]["max_difference"] <= 1e-4
    assert int(meta["parameters"]) == models.count_parameters(models.build_model("resnet18"))


def test_without_an_evaluation_of_this_checkpoint_the_metadata_says_none(run, tmp_path):
    # the evaluation is tied to the weights: other weights at the same path and epoch (a run made again under
    # its name, beside the first run's logs) get none of its choices, the same weights at another path do
    out, root, ckpt = run
    checkpoint = torch.load(ckpt, weights_only=True)
    assert export.evaluation_choices(checkpoint, ckpt)["operating_points"] != "none"
    moved = tmp_path / "copy_of_best.pt"
    shutil.copy(ckpt, moved)
    assert export.evaluation_choices(torch.load(moved, weights_only=True), moved) == \
        export.evaluation_choices(checkpoint, ckpt)
    retrained = torch.load(ckpt, weights_only=True)
    first = next(iter(retrained["model"]))
    retrained["model"][first] = retrained["model"][first] + 1e-3
    choices = export.evaluation_choices(retrained, ckpt)
    assert choices["operating_points"] == "none" and choices["kappa_thresholds"] == "none"
    assert "not this checkpoint's weights" in choices["evaluation"] and "evaluate.py" in choices["evaluation"]
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["config"]["log_dir"] = str(tmp_path)  # no evaluation at all
    assert "does not exist" in export.evaluation_choices(checkpoint, ckpt)["evaluation"]


def test_export_refuses_a_file_that_grades_otherwise_and_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    out, root, ckpt = run
    real = deploy.export_fp32

    def off_by_a_little(model, *args, **kwargs):  # a wrong weight: what a broken export or preprocessing looks like
        with torch.no_grad():
            model.fc.bias[0] += 0.05
        try:
            return real(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                model.fc.bias[0] -= 0.05

    monkeypatch.setattr(deploy, "export_fp32", off_by_a_little)
    target = tmp_path / "broken.onnx"
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), "--out", str(target)])
    assert exit_info.value.code == 1
    assert "does not grade as the checkpoint does" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


def test_evaluating_the_export_gives_the_checkpoints_numbers(run):
    out, root, ckpt = run
    printed = (out / "onnx_eval.txt").read_text()
    pt = json.loads((out / "logs" / "resnet18_scratch_eval.json").read_text())
    onnx_eval = json.loads((out / "logs" / "resnet18_scratch_onnx_eval.json").read_text())
    assert onnx_eval["runtime"] == "onnxruntime" and pt["runtime"] == "torch"
    # the same numbers to the printed digits
    assert f"{onnx_eval['accuracy']:.2%}" == f"{pt['accuracy']:.2%}"
    assert f"{onnx_eval['kappa']:.4f}" == f"{pt['kappa']:.4f}"
    assert f"{onnx_eval['referable']['auc']:.3f}" == f"{pt['referable']['auc']:.3f}"
    assert onnx_eval["confusion_matrix"] == pt["confusion_matrix"] and onnx_eval["epoch"] == pt["epoch"]
    # and scikit-learn agrees with the exported file's predictions
    predictions = pd.read_csv(onnx_eval["predictions"])
    assert onnx_eval["accuracy"] == pytest.approx(accuracy_score(predictions["grade"], predictions["pred"]))
    assert onnx_eval["kappa"] == pytest.approx(cohen_kappa_score(predictions["grade"], predictions["pred"],
                                                                 weights="quadratic", labels=range(5)))
    score = predictions[["p2", "p3", "p4"]].sum(axis=1)
    assert onnx_eval["referable"]["auc"] == pytest.approx(roc_auc_score(predictions["grade"] >= 2, score), abs=1e-6)
    assert "cost of a grade (onnxruntime" in printed


def test_cost_of_a_grade_in_every_evaluation(run):
    out, root, ckpt = run
    for name, path in (("resnet18_scratch", ckpt), ("resnet18_scratch_onnx", ckpt.with_suffix(".onnx"))):
        cost = json.loads((out / "logs" / f"{name}_eval.json").read_text())["cost"]
        assert cost["parameters"] == models.count_parameters(models.build_model("resnet18"))
        assert cost["file_mb"] == pytest.approx(path.stat().st_size / 1e6, abs=0.01)
        assert 0 < cost["ms_per_image_batch32"] and 0 < cost["ms_per_image_batch1"] < 10_000
        assert cost["runtime"] in ("torch", "onnxruntime") and cost["device"]


def test_summary_rows_carry_the_cost(run, tmp_path):
    out, root, ckpt = run
    logs = out / "logs"
    summary = plot.write_summary(plot.load_runs(logs), plot.load_evals(logs), tmp_path).read_text().splitlines()
    assert summary[0].endswith("| ms per image (batch 1 / 32) | parameters (M) | file (MB) |")
    for name, start in (("resnet18_scratch", "| resnet18_scratch |"),
                        ("resnet18_scratch_onnx", "| resnet18_scratch (ONNX fp32) |")):
        result = json.loads((logs / f"{name}_eval.json").read_text())
        cost = result["cost"]
        (row,) = [line for line in summary if line.startswith(start)]
        assert row.endswith(f"| {cost['ms_per_image_batch1']:.1f} / {cost['ms_per_image_batch32']:.1f} | "
                            f"{cost['parameters'] / 1e6:.1f} | {cost['file_mb']:.1f} |")
        assert f"| {result['kappa']:.3f} |" in row


def test_exported_file_grades_photos_and_other_data_as_the_checkpoint(run, tmp_path):
    out, root, ckpt = run
    photos = sorted((root / "images").iterdir())[:6]
    tables = {}
    for model in (ckpt, ckpt.with_suffix(".onnx")):
        csv = tmp_path / f"{model.suffix[1:]}.csv"
        evaluate.main([str(model), "--images", *map(str, photos), "--out", str(csv), "--workers", "0", "--quiet",
                       "--tta", "--force"])  # --force: 32 px photos, too small to judge; --tta: the 8 flips and quarter turns taken of the uint8 batch for onnxruntime
        tables[model.suffix] = pd.read_csv(csv)
    assert (tables[".pt"]["grade"] == tables[".onnx"]["grade"]).all()
    for g in range(5):
        assert np.abs(tables[".pt"][f"p{g}"] - tables[".onnx"][f"p{g}"]).max() <= 1e-4
    # --split all: every image of the dataset, named apart from the checkpoint's evaluation of it
    reports = {}
    for model in (ckpt, ckpt.with_suffix(".onnx")):
        target = tmp_path / f"all{model.suffix}.json"
        evaluate.main([str(model), "--split", "all", "--out", str(target), "--workers", "0", "--quiet",
                       "--predictions", str(tmp_path / f"all{model.suffix}.csv"), "--figure-dir", str(tmp_path)])
        reports[model.suffix] = json.loads(target.read_text())
    assert reports[".onnx"]["num_images"] == reports[".pt"]["num_images"] == 64
    assert reports[".onnx"]["confusion_matrix"] == reports[".pt"]["confusion_matrix"]


def test_int8_is_checked_on_the_test_metrics(run, tmp_path, monkeypatch):
    out, root, ckpt = run
    # a 2-epoch model on 16 test images moves its kappa by more than 0.01 for one image: the tolerance is
    # opened here to check what is written, then shut to check the refusal (the demo's figures: BENCHMARKS.md)
    monkeypatch.setattr(export, "MAX_METRIC_LOSS", 1.0)
    target = tmp_path / "int8.onnx"
    export.main([str(ckpt), "--int8", "--out", str(target), "--calibration-images", "16"])
    meta = deploy.read_metadata(target)
    assert meta["precision"].startswith("int8")
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(target).graph.node)
    check = meta["checked_against_pytorch"]["int8"]
    data = dataloader.load_fundus_data(root, val_fraction=0.3)
    images = torch.stack([dataloader.to_uint8_chw(dataloader.load_square(str(p), 32)) for p in data.test.paths])
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"images": images.numpy()})[0]
    grades = data.test.grades
    assert check["int8"]["accuracy"] == pytest.approx(accuracy_score(grades, probs.argmax(1)))
    assert check["int8"]["kappa"] == pytest.approx(cohen_kappa_score(grades, probs.argmax(1), weights="quadratic",
                                                                     labels=range(5)))
    assert check["int8"]["referable_auc"] == pytest.approx(roc_auc_score(grades >= 2, probs[:, 2:].sum(1)), abs=1e-6)
    changes = [abs(check["int8"][k] - check["fp32"][k]) for k in check["fp32"]]
    assert check["max_metric_change"] == pytest.approx(max(changes))
    # shut: the same two files are refused, in one sentence
    monkeypatch.setattr(export, "MAX_METRIC_LOSS", -1.0)
    graders = [evaluate.OnnxGrader(deploy.session(str(f))) for f in (ckpt.with_suffix(".onnx"), target)]
    with pytest.raises(export.RunFailed, match="no file written"):
        export.check_int8(*graders, [(images, torch.from_numpy(grades))], objectives.OBJECTIVES["ce"])


def readme_snippet(repo_root) -> str:
    """The Python block of the deploy page (docs/deploy.md), as a reader copies it."""
    section = (repo_root / "docs" / "deploy.md").read_text().split("## Grading a photo without torch", 1)[1]
    section = section.split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_readme_example_grades_a_photo_without_torch(run, repo_root, tmp_path):
    out, root, ckpt = run
    snippet = tmp_path / "grade.py"
    snippet.write_text("import sys\nsys.modules['torch'] = None  # importing torch now fails\n"
                       + readme_snippet(repo_root))
    photo = tmp_path / "photo.jpeg"  # twice the model's size, so the example's decoding and resizing count
    Image.open(sorted((root / "images").iterdir())[3]).resize((64, 64), Image.BICUBIC).save(photo, quality=95)
    result = subprocess.run([sys.executable, str(snippet), str(ckpt.with_suffix(".onnx")), str(photo)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    grade, confidence = re.fullmatch(r"grade (\d) \(.+\), confidence ([\d.]+)\n", result.stdout).groups()
    expected = reference_model(ckpt)(dataloader.to_uint8_chw(dataloader.load_square(str(photo), 32))[None])[0]
    assert int(grade) == expected.argmax() and float(confidence) == pytest.approx(expected.max(), abs=1e-4)
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                             capture_output=True, text=True)
    assert blocked.returncode != 0  # the block is real


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_without_onnxruntime_one_sentence_says_how_to_install(run, command, monkeypatch, capsys):
    out, root, ckpt = run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    target = ckpt if command == "export" else ckpt.with_suffix(".onnx")
    with pytest.raises(SystemExit) as exit_info:
        (export if command == "export" else evaluate).main([str(target), "--out", str(out / "unused.onnx")]
                                                           if command == "export" else [str(target)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pip install -r requirements-deploy.txt" in err
    assert len(err.strip().splitlines()) == 1


def test_the_exported_files_evaluation_is_tied_to_the_runs_best_pt(run, tmp_path, capsys):
    out, root, ckpt = run
    logs = out / "logs"
    checkpoint = torch.load(ckpt, weights_only=True)
    result = json.loads((logs / "resnet18_scratch_onnx_eval.json").read_text())
    assert result["weights_digest"] == checkpoint["best_weights_digest"]  # the file's weights are best.pt's
    capsys.readouterr()
    plot.main([str(logs), "--out", str(tmp_path)])
    assert "stale" not in capsys.readouterr().out
    assert "| resnet18_scratch (ONNX fp32) |" in (tmp_path / "summary.md").read_text()


def test_export_never_writes_over_a_file_that_is_not_its_own(run, tmp_path, capsys):
    out, root, ckpt = run
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x08\x07\x00\xff an ONNX model from elsewhere")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), "--out", str(other)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already exists and is a binary file, not an ONNX model written by export.py" in err
    assert other.read_bytes() == b"\x08\x07\x00\xff an ONNX model from elsewhere"
    export.main([str(ckpt), "--out", str(tmp_path / "again.onnx")])  # its own file it rewrites
    export.main([str(ckpt), "--out", str(tmp_path / "again.onnx")])
