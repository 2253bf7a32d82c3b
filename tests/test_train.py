"""train.py on tiny generated data, on the CPU: outputs, exact resume, signals, DDP, bad flags."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import dataloader
import models
import optimisation
import objectives
import runtime
import train

LOG_KEYS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_kappa", "lr", "seconds",
            "images_per_s"]


def base_args(root, out, *extra):
    return ["--data-root", str(root), "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--checkpoint-dir", str(out / "checkpoints"), "--log-dir", str(out / "logs"), "--quiet", *extra]


def weights(path):
    return runtime.load_checkpoint(path)["model"]


def test_short_run_writes_checkpoints_and_logs(tiny_demo, tmp_path):
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "2"))
    run_dir = tmp_path / "checkpoints" / "resnet18_scratch"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    for key in ["model", "arch", "num_classes", "image_size", "epoch", "best_metric", "config", "optimizer",
                "scheduler", "scaler", "rng", "history"]:
        assert key in last, key
    assert last["arch"] == "resnet18" and last["num_classes"] == 5 and last["image_size"] == 32
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert best["epoch"] == last["best_epoch"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    assert isinstance(last["config"], dict) and last["config"]["model"] == "resnet18"

    log = pd.read_csv(tmp_path / "logs" / "resnet18_scratch.csv")
    assert list(log.columns) == LOG_KEYS + ["test_referable_auc"]
    assert log["epoch"].tolist() == [1, 2]
    for col in ["train_acc", "test_acc"]:
        assert log[col].between(0, 1).all()
    assert (log["train_loss"] > 0).all() and (log["images_per_s"] > 0).all() and (log["seconds"] > 0).all()
    # the cosine schedule reaches 0 with the last step (the logged lr is the one after the epoch)
    assert log["lr"].iloc[0] > 0 and log["lr"].iloc[1] == pytest.approx(0, abs=1e-15)

    summary = json.loads((tmp_path / "logs" / "resnet18_scratch.json").read_text())
    assert summary["arch"] == "resnet18" and summary["pretrained"] is False
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_metric"] == pytest.approx(log["test_acc"].max())
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["config"]["epochs"] == 2


def test_checkpoint_loads_into_torchvision_strict(tiny_demo, tmp_path):
    train.main(base_args(tiny_demo, tmp_path, "--model", "resnet34", "--epochs", "1"))
    state = weights(tmp_path / "checkpoints" / "resnet34_scratch" / "last.pt")
    torchvision.models.resnet34(num_classes=5).load_state_dict(state, strict=True)


def sigterm_at_train_batch(monkeypatch, batch_number):
    """Send SIGTERM to this process while the training transform handles batch `batch_number` (1-based)."""
    calls = {"n": 0}
    original = dataloader.BatchTransform.__call__

    def call(self, images, generator=None):
        if self.augment:
            calls["n"] += 1
            if calls["n"] == batch_number:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images, generator)

    monkeypatch.setattr(dataloader.BatchTransform, "__call__", call)


def test_interrupted_run_resumes_to_identical_weights(tiny_demo, tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(base_args(tiny_demo, whole, "--epochs", "3"))

    with monkeypatch.context() as m:
        sigterm_at_train_batch(m, 6 + 2)  # 48 images / batch 8 = 6 batches: epoch 2, batch 2
        with pytest.raises(SystemExit) as stopped:
            train.main(base_args(tiny_demo, parts, "--epochs", "3"))
    assert stopped.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "stopped during epoch 2 (batch 2 of 6)" in out and "--resume" in out
    last = parts / "checkpoints" / "resnet18_scratch" / "last.pt"
    assert runtime.load_checkpoint(last)["epoch"] == 1
    assert len(pd.read_csv(parts / "logs" / "resnet18_scratch.csv")) == 1

    train.main(["--resume", str(last), "--quiet"])
    resumed, reference = weights(last), weights(whole / "checkpoints" / "resnet18_scratch" / "last.pt")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    a = pd.read_csv(parts / "logs" / "resnet18_scratch.csv")
    b = pd.read_csv(whole / "logs" / "resnet18_scratch.csv")
    pd.testing.assert_frame_equal(a.drop(columns=["seconds", "images_per_s"]),
                                  b.drop(columns=["seconds", "images_per_s"]))


def test_sigterm_to_a_real_process_leaves_a_resumable_checkpoint(tiny_demo, tmp_path, repo_root):
    cmd = [sys.executable, "train.py", *base_args(tiny_demo, tmp_path, "--epochs", "30")]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume with: python train.py --resume" in out
    epoch = runtime.load_checkpoint(last)["epoch"]
    assert epoch >= 1
    train.main(["--resume", str(last), "--epochs", str(epoch + 1), "--quiet"])
    assert runtime.load_checkpoint(last)["epoch"] == epoch + 1


def test_non_finite_loss_stops_with_epoch_and_batch(tiny_demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(base_args(tiny_demo, tmp_path, "--epochs", "2", "--lr", "1e30", "--warmup-epochs", "0"))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite in epoch 1, batch" in err and "--lr" in err


def test_torchrun_two_processes_gloo(tiny_demo, tmp_path, repo_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *base_args(tiny_demo, tmp_path, "--epochs", "2", "--device", "cpu", "--grad-accum-steps", "2")]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2/2") == 1  # only rank 0 prints
    checkpoint = runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt")
    assert checkpoint["config"]["model"] == "resnet18"
    torchvision.models.resnet18(num_classes=5).load_state_dict(checkpoint["model"], strict=True)
    summary = json.loads((tmp_path / "logs" / "resnet18_scratch.json").read_text())
    assert summary["environment"]["world_size"] == 2
    # every test image counted once over both ranks: accuracy is a multiple of 1/16
    for acc in pd.read_csv(tmp_path / "logs" / "resnet18_scratch.csv")["test_acc"]:
        assert abs(acc * 16 - round(acc * 16)) < 1e-6


@pytest.mark.parametrize("flags,expected", [
    (["--model", "resnet19"], "argument --model: invalid choice: 'resnet19'"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--resume", "nowhere/last.pt"], "--resume nowhere/last.pt does not exist"),
    (["--lr", "0"], "--lr must be positive"),
    (["--val-fraction", "1.5"], "--val-fraction must lie in [0, 1)"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, tiny_demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(base_args(tiny_demo, tmp_path, *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_pretrained_without_reachable_weights(tiny_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit) as exit_info:
        train.main(base_args(tiny_demo, tmp_path, "--pretrained", "--epochs", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "torch") in err and len(err.splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


def test_pretrained_from_cache_starts_from_those_weights(tiny_demo, tmp_path, monkeypatch):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # one epoch at a learning rate of ~0 keeps the convolutions at their ImageNet values
    train.main(base_args(tiny_demo, tmp_path, "--pretrained", "--epochs", "1", "--lr", "1e-12"))
    checkpoint = runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_pretrained" / "last.pt")
    assert torch.allclose(checkpoint["model"]["conv1.weight"], reference.conv1.weight, atol=1e-9)
    assert checkpoint["pretrained_source"] == str(cache / "resnet18-f37072fd.pth")


def test_resume_refuses_changed_flags(tiny_demo, tmp_path, capsys):
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "1"))
    last = tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(last), "--lr", "0.5"])
    assert exit_info.value.code == 2
    assert "--lr differs from the checkpoint's (0.001)" in capsys.readouterr().err


def test_named_data_root_without_dataset_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-root", str(tmp_path / "empty"), "--epochs", "1"])
    assert exit_info.value.code == 2
    assert f"--data-root {tmp_path / 'empty'} holds no dataset" in capsys.readouterr().err


def one_epoch(model, batch_size, accum, samples):
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, collate_fn=dataloader.collate_fundus)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cpu = torch.device("cpu")
    return optimisation.train_one_epoch(model, loader, dataloader.BatchTransform(cpu, augment=False),
                                        optimisation.Criterion(objectives.OBJECTIVES["ce"]), optimizer, scheduler,
                                        torch.amp.GradScaler("cpu", enabled=False), runtime.autocast(cpu, None), 1,
                                        aug_seed=0, accum_steps=accum)


def test_gradient_accumulation_equals_one_large_batch():
    torch.manual_seed(0)
    samples = [(torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8), int(g)) for g in torch.randint(0, 5, (8,))]
    start = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    accumulated, large, small_steps = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
                                       for _ in range(3))
    for m in (accumulated, large, small_steps):
        m.load_state_dict(start.state_dict())
    one_epoch(accumulated, 2, 4, samples)   # 4 batches of 2, one optimiser step
    one_epoch(large, 8, 1, samples)         # 1 batch of 8, one optimiser step
    one_epoch(small_steps, 2, 1, samples)   # 4 batches of 2, four steps: must differ
    for a, b, c, s in zip(accumulated.parameters(), large.parameters(), small_steps.parameters(),
                          start.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, s)
    assert not all(torch.allclose(a, c, atol=1e-4) for a, c in zip(accumulated.parameters(),
                                                                   small_steps.parameters()))


# --------------------------------------------------------------------------- each flag does what it says
def test_lr_factor_warms_up_linearly_then_follows_the_cosine_to_zero():
    factor = optimisation.lr_factor
    assert factor(0, 10, 110, "cosine") == pytest.approx(0.01)
    assert factor(5, 10, 110, "cosine") == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor(10, 10, 110, "cosine") == pytest.approx(1.0)
    assert factor(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert factor(150, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-15)  # past the end it stays at 0
    assert factor(60, 10, 110, "constant") == 1.0
    assert factor(0, 0, 110, "cosine") == 1.0  # no warm-up


def test_class_weights_are_sklearns_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    grades = np.array([0] * 73 + [1] * 7 + [2] * 15 + [3] * 3 + [4] * 2)
    criterion = optimisation.build_criterion(grades, True, 0.1, torch.device("cpu"))
    expected = compute_class_weight("balanced", classes=np.arange(5), y=grades)
    np.testing.assert_allclose(criterion.weight.numpy(), expected, rtol=1e-6)
    assert criterion.label_smoothing == 0.1
    assert optimisation.build_criterion(grades, False, 0.0, torch.device("cpu")).weight is None


def final_weights(root, out, *flags):
    train.main(base_args(root, out, "--epochs", "1", "--run-name", "r", *flags))
    return weights(out / "checkpoints" / "r" / "last.pt")


@pytest.fixture(scope="module")
def unflagged_weights(tiny_demo, tmp_path_factory):
    # the same seed twice gives the same weights: a CPU run is deterministic
    base = final_weights(tiny_demo, tmp_path_factory.mktemp("a"))
    again = final_weights(tiny_demo, tmp_path_factory.mktemp("b"))
    assert all(torch.equal(base[k], again[k]) for k in base)
    return base


@pytest.mark.parametrize("flags", [["--class-weighted"], ["--label-smoothing", "0.3"], ["--sampler", "balanced"],
                                   ["--optimizer", "adamw"], ["--no-augment"], ["--zero-init-residual"],
                                   ["--nesterov"]])
def test_each_training_flag_changes_the_trained_weights(tiny_demo, tmp_path, flags, unflagged_weights):
    # the flag gives other weights than the same run without it: a flag that train.py ignored would not
    flagged = final_weights(tiny_demo, tmp_path, *flags)
    base = unflagged_weights
    assert not all(torch.equal(base[k], flagged[k]) for k in base if base[k].is_floating_point())
    if flags == ["--nesterov"]:  # and it is torch's own Nesterov SGD that stepped, recorded for a resume
        state = torch.load(tmp_path / "checkpoints" / "r" / "last.pt", weights_only=True)
        assert [g["nesterov"] for g in state["optimizer"]["param_groups"]] == [True]
        assert state["config"]["nesterov"] is True


def test_balanced_sampler_is_what_the_run_draws_from(tiny_demo):
    args, _ = train.resolve_args(base_args(tiny_demo, tiny_demo.parent, "--sampler", "balanced"))
    fundus = dataloader.load_fundus_data(tiny_demo)
    loaders = train.build_loaders(train.with_image_size(args, fundus), fundus, train.Dist(), torch.device("cpu"))
    assert isinstance(loaders["train"].sampler, dataloader.BalancedSampler)
    drawn = np.concatenate([grades.numpy() for epoch in range(1, 6)
                            for _, grades in (loaders["train"].sampler.set_epoch(epoch) or loaders["train"])])
    counts = np.bincount(drawn, minlength=5)
    assert counts.min() > 0.12 * len(drawn)  # about a fifth each, where the split holds 73 % of grade 0


def test_validation_split_chooses_best_pt_and_evaluate_reports_it(tiny_demo, tmp_path):
    import evaluate

    train.main(base_args(tiny_demo, tmp_path, "--epochs", "3", "--val-fraction", "0.25", "--lr", "3e-3"))
    log = pd.read_csv(tmp_path / "logs" / "resnet18_scratch.csv")
    assert list(log.columns) == LOG_KEYS + ["val_loss", "val_acc", "val_kappa", "test_referable_auc"]
    summary = json.loads((tmp_path / "logs" / "resnet18_scratch.json").read_text())
    chosen = int(log["val_acc"].idxmax()) + 1  # the first epoch with the best validation accuracy
    assert summary["best_metric_name"] == "val_acc" and summary["best_epoch"] == chosen
    run_dir = tmp_path / "checkpoints" / "resnet18_scratch"
    assert runtime.load_checkpoint(run_dir / "best.pt")["epoch"] == chosen
    out = tmp_path / "val_eval.json"
    evaluate.main([str(run_dir / "last.pt"), "--split", "val", "--out", str(out), "--workers", "0", "--quiet",
                   "--figure-dir", str(tmp_path / "figures")])
    result = json.loads(out.read_text())
    fundus = dataloader.load_fundus_data(tiny_demo, val_fraction=0.25)
    assert result["split"] == "val" and result["num_images"] == len(fundus.val) < 48
    assert result["accuracy"] == pytest.approx(log["val_acc"].iloc[-1], abs=1e-6)  # the CSV keeps 6 digits
    assert result["kappa"] == pytest.approx(log["val_kappa"].iloc[-1], abs=1e-6)


def test_compile_trains_the_compiled_model_to_the_eager_weights(tiny_demo, tmp_path):
    import torch._dynamo

    eager = final_weights(tiny_demo, tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = final_weights(tiny_demo, tmp_path / "compiled", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # 0 when --compile is ignored
    assert compiled.keys() == eager.keys()  # no _orig_mod. prefix
    # the same training: compiled kernels round differently, but they differ from eager by far less
    # than training moved the weights (measured here: 0.05 % of it)
    torch.manual_seed(0)
    start = models.build_model("resnet18").state_dict()
    moved = sum((eager[k] - start[k]).float().norm() for k in eager if eager[k].is_floating_point())
    apart = sum((compiled[k] - eager[k]).float().norm() for k in eager if eager[k].is_floating_point())
    assert apart < 0.03 * moved, (apart, moved)
