"""The two-eye stage (twoeye.py, train.py --two-eye): pairs by name, a head that starts as its encoder, a run that
resumes bit for bit, evaluate.py's figures equal to the log's, --images pairs, the ONNX file equal to the
checkpoint, and the flag combinations that cannot work refused in one sentence."""
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import objectives
import plot
import runtime
import train
import twoeye


def test_partners_are_found_by_name_whatever_the_order():
    names = ["7_right", "3_left", "7_left", "9_LEFT", "3_right", "x", "9_left"]
    partner = twoeye.partner_index(names)
    assert partner.tolist() == [2, 4, 0, -1, 1, -1, -1]  # 9_LEFT and 9_left are one eye listed twice
    assert twoeye.pair_counts(partner) == {"eyes": 7, "with_partner": 4, "alone": 3}


def test_the_head_starts_as_its_encoder():
    import models

    torch.manual_seed(0)
    encoder = models.build_model("resnet18", 1).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        features = encoder.features(torch.cat([x, y]))
        head = twoeye.build_head(encoder, features)
        both = twoeye.TwoEyeModel(encoder, head.eval())(x, y, torch.ones(6))
        assert torch.allclose(both, encoder(x), atol=1e-6)
        # once trained, the partner's features move the eye's grade; without the flag they do not count
        torch.nn.init.normal_(head.mix[-1].weight)
        model = twoeye.TwoEyeModel(encoder, head.eval())
        assert not torch.allclose(model(x, y, torch.ones(6)), model(x, x, torch.ones(6)))
        assert torch.allclose(model(x, y, torch.zeros(6)), model(x, x, torch.zeros(6)))


def base(out, *extra):
    return ["--workers", "0", "--checkpoint-dir", str(out / "checkpoints"), "--log-dir", str(out / "logs"), "--quiet",
            *extra]


@pytest.fixture(scope="module")
def encoder_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_eye")
    train.main(base(out, "--data-root", str(tiny_demo), "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                    "--loss", "mse", "--optimizer", "adamw", "--val-fraction", "0.3"))
    encoder = out / "checkpoints" / "resnet18_scratch_mse" / "best.pt"
    train.main(base(out, "--two-eye", str(encoder), "--epochs", "4", "--batch-size", "8"))
    return out, encoder, out / "checkpoints" / "resnet18_scratch_mse_two_eye"


def test_the_run_takes_its_encoders_recipe_and_resumes_bit_for_bit(encoder_run, tmp_path):
    out, encoder, run_dir = encoder_run
    last = runtime.load_checkpoint(run_dir / "last.pt")
    assert last["objective"] == "mse" and last["arch"] == "resnet18" and last["image_size"] == 32
    assert last["config"]["optimizer"] == "adamw" and last["two_eye"]["encoder"]["checkpoint"] == str(encoder.absolute())
    # the encoder's weights travel as the model, unchanged; the head beside them
    for key, tensor in runtime.load_checkpoint(encoder)["model"].items():
        assert torch.equal(last["model"][key], tensor), key
    # SIGTERM during the third epoch: the run stops after saving it, and goes on from there
    real, calls = twoeye.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(twoeye, "train_epoch", interrupted)
        with pytest.raises(SystemExit) as stopped:
            train.main(base(tmp_path, "--two-eye", str(encoder), "--epochs", "4", "--batch-size", "8"))
    assert stopped.value.code == 128 + signal.SIGTERM
    part = tmp_path / "checkpoints" / "resnet18_scratch_mse_two_eye" / "last.pt"
    assert runtime.load_checkpoint(part)["epoch"] == 3
    train.main(["--resume", str(part), "--quiet"])
    resumed = runtime.load_checkpoint(part)
    for key, tensor in last["two_eye"]["head"].items():
        assert torch.equal(resumed["two_eye"]["head"][key], tensor), key
    a, b = (pd.read_csv(d / "logs" / "resnet18_scratch_mse_two_eye.csv") for d in (tmp_path, out))
    pd.testing.assert_frame_equal(a.drop(columns=["seconds", "images_per_s"]), b.drop(columns=["seconds", "images_per_s"]))


def test_evaluate_grades_each_eye_with_its_partner_as_the_log_did(encoder_run, tmp_path):
    out, _, run_dir = encoder_run
    evaluate.main([str(run_dir / "best.pt"), "--workers", "0", "--quiet", "--figure-dir", str(tmp_path),
                   "--cam-per-grade", "1"])
    result = json.loads((out / "logs" / "resnet18_scratch_mse_two_eye_eval.json").read_text())
    log = pd.read_csv(out / "logs" / "resnet18_scratch_mse_two_eye.csv")
    best = json.loads((out / "logs" / "resnet18_scratch_mse_two_eye.json").read_text())
    assert best["two_eye"]["pairs"]["test"]["with_partner"] > 0 and best["objective"] == "mse"
    row = log.iloc[best["best_epoch"] - 1]
    assert result["kappa"] == pytest.approx(row["test_kappa"], abs=1e-6) and result["accuracy"] == row["test_acc"]
    assert result["two_eye"]["eyes"] == 16 and result["two_eye"]["alone"] == 16 - result["two_eye"]["with_partner"]
    assert result["patient_referable"]["applies"]
    # the digest covers the head: it is not the encoder's
    assert result["weights_digest"] == best["best_weights_digest"] != result["two_eye"]["encoder_weights_digest"]
    plot.main([str(out / "logs"), "--out", str(tmp_path / "figures")])
    summary = (tmp_path / "figures" / "summary.md").read_text()
    assert "| resnet18_scratch_mse_two_eye | ResNet18 | no | mse, two-eye |" in summary
    assert (tmp_path / "figures" / "comparison_resnet18_mse_two_eye.png").is_file()


def test_images_are_paired_by_name_and_a_lone_eye_is_graded_alone(encoder_run, tiny_demo, tmp_path):
    out, _, run_dir = encoder_run
    left = sorted((tiny_demo / "images").glob("*_left.jpeg"))[0]
    right, lone = left.with_name(left.name.replace("_left", "_right")), sorted((tiny_demo / "images").glob("*_left.jpeg"))[1]
    table = tmp_path / "grades.csv"
    evaluate.main([str(run_dir / "best.pt"), "--images", str(left), str(right), str(lone), "--out", str(table),
                   "--workers", "0", "--quiet", "--cam", str(tmp_path / "cams"), "--force"])  # 32 px: too small to judge
    graded = pd.read_csv(table, keep_default_na=False)
    assert graded["partner"].tolist() == [str(right), str(left), ""]
    assert len(list((tmp_path / "cams").glob("*_cam.png"))) == 3
    # the same photos through the split's path: the pair's grades as evaluate.py's split evaluation gives them
    checkpoint = runtime.load_checkpoint(run_dir / "best.pt")
    grader = evaluate.make_grader(checkpoint, "test", torch.device("cpu"))
    photos = evaluate.PhotoDataset([left, right, lone], 32, force=True)  # loaded as --images loads them
    images = [photos[i][0] for i in range(3)]
    eyes, mates = torch.stack(images), torch.stack([images[1], images[0], images[2]])
    expected = grader((eyes, mates, torch.tensor([1.0, 1.0, 0.0])))
    np.testing.assert_allclose(graded["score"].to_numpy(dtype=float), expected[:, 0].numpy(), atol=1e-5)
    alone = grader((eyes, eyes, torch.zeros(3)))
    assert not np.allclose(graded["score"].to_numpy(dtype=float)[:2], alone[:2, 0].numpy(), atol=1e-4)


def test_the_exported_two_eye_file_grades_as_the_checkpoint(encoder_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import deploy
    import export

    out, _, run_dir = encoder_run
    target = tmp_path / "two_eye.onnx"
    export.main([str(run_dir / "best.pt"), "--out", str(target)])
    meta = deploy.read_metadata(target)
    assert meta["objective"] == "mse" and "partner_images" in meta["input"]
    assert meta["checked_against_pytorch"]["max_difference"] < 1e-4
    evaluate.main([str(target), "--workers", "0", "--quiet", "--figure-dir", str(tmp_path)])
    exported = json.loads((out / "logs" / "resnet18_scratch_mse_two_eye_onnx_eval.json").read_text())
    log = pd.read_csv(out / "logs" / "resnet18_scratch_mse_two_eye.csv")
    best = json.loads((out / "logs" / "resnet18_scratch_mse_two_eye.json").read_text())["best_epoch"]
    assert exported["kappa"] == pytest.approx(log["test_kappa"].iloc[best - 1], abs=1e-6)
    assert exported["two_eye"]["with_partner"] > 0


def expect_refusal(argv, capsys, words):
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and words in err and len(err.splitlines()) == 1, err


def test_combinations_that_cannot_work_are_refused(encoder_run, tmp_path, capsys):
    out, encoder, run_dir = encoder_run
    ws = tmp_path / "ws"
    expect_refusal(base(ws, "--two-eye", str(encoder), "--loss", "ce"), capsys, "--loss ce differs from the encoder's")
    expect_refusal(base(ws, "--two-eye", str(encoder), "--model", "resnet50"), capsys, "--model cannot go with --two-eye")
    expect_refusal(base(ws, "--two-eye", str(encoder), "--image-size", "64"), capsys,
                   "--image-size cannot go with --two-eye")
    expect_refusal(base(ws, "--two-eye", str(run_dir / "best.pt")), capsys, "is itself a two-eye checkpoint")
    assert not ws.exists()


def test_data_without_pairs_is_refused(encoder_run, tmp_path, capsys):
    import synthetic

    out, encoder, _ = encoder_run
    root = synthetic.generate_demo(tmp_path / "unpaired", n_train=24, n_test=8, size=32, seed=1, quiet=True)
    for name in ("train_img.csv", "test_img.csv"):  # the same photos under names that pair no one
        rows = (root / name).read_text().split()
        for row in rows:
            (root / "images" / f"{row}.jpeg").rename(root / "images" / f"p{row.replace('_', '')}.jpeg")
        (root / name).write_text("".join(f"p{row.replace('_', '')}\n" for row in rows))
    expect_refusal(base(tmp_path, "--two-eye", str(encoder), "--data-root", str(root)), capsys,
                   "pairs no patient's two eyes")
    assert objectives.of(runtime.load_checkpoint(encoder)).name == "mse"


def test_tta_turns_both_photos_alike_and_averages_the_summaries(encoder_run):
    import dataloader

    _, _, run_dir = encoder_run
    checkpoint = runtime.load_checkpoint(run_dir / "best.pt")
    grader = evaluate.make_grader(checkpoint, "test", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    eyes, mates = (torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(2))
    flags = torch.tensor([1.0, 0.0, 1.0])
    model, x, y = grader.model, grader.transform(eyes), grader.transform(mates)
    with torch.no_grad():
        expected = torch.stack([objectives.OBJECTIVES["mse"].summarise(model(a, b, flags))
                                for a, b in zip(dataloader.dihedral_views(x), dataloader.dihedral_views(y))]).mean(0)
    assert torch.allclose(grader((eyes, mates, flags), tta=True), expected, atol=1e-5)
    assert not torch.allclose(grader((eyes, mates, flags), tta=True), grader((eyes, mates, flags)), atol=1e-5)
