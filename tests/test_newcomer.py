"""A newcomer's first run: no hang in a fresh folder, worker pools that end in an error, not a wait."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import runtime
import train


def run_python(code: str, cwd, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_pools_end_while_the_stop_handler_is_installed(repo_root, tmp_path):
    # The hang of make demo: a pool whose forked workers inherited train.py's SIGTERM handler never
    # ended. Each round had about one chance in six to hang; eight rounds in a row must all end.
    code = f"""
        import sys
        sys.path.insert(0, {str(repo_root)!r})
        import torch, synthetic, train
        train.StopRequest(train.Dist(), torch.device("cpu")).install()
        for i in range(8):
            synthetic.generate_demo(f"set{{i}}", n_train=60, n_test=20, size=32, workers=2, quiet=True)
        print("done")
    """
    result = run_python(code, tmp_path, timeout=120)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]


def test_a_worker_that_dies_is_an_error_not_a_wait(repo_root, tmp_path):
    code = f"""
        import os, signal, sys
        sys.path.insert(0, {str(repo_root)!r})
        from runtime import WorkerDied, map_in_processes

        def work(i):
            if i == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
            return i

        try:
            list(map_in_processes(work, list(range(8)), workers=2))
        except WorkerDied as err:
            print("WorkerDied:", err)
    """
    result = run_python(code, tmp_path, timeout=60)
    assert "WorkerDied: a worker process died" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("attempt", range(3))
def test_train_in_an_empty_folder_draws_the_demo_and_finishes(repo_root, tmp_path, attempt):
    # what `python train.py` does on a fresh clone: no data/, so it draws data/demo/ with a pool of
    # workers and then trains; before the fix about half of these runs hung right after the drawing
    cmd = [sys.executable, str(repo_root / "train.py"), "--epochs", "1", "--image-size", "32", "--quiet"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generated the synthetic demo set in data/demo/" in result.stdout
    assert runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "best.pt")["epoch"] == 1


# --------------------------------------------------------------------------- runs never overwrite each other
def base_args(root, out, *extra):
    return ["--data-root", str(root), "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--checkpoint-dir", str(out / "checkpoints"), "--log-dir", str(out / "logs"), "--quiet", *extra]


def fails_with(capsys, fragment, call, *args):
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and fragment in err and len(err.splitlines()) == 1, err
    return err


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_of_one_name_is_refused_until_overwrite(tiny_demo, tmp_path, capsys):
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "1"))
    before = snapshot(tmp_path)
    err = fails_with(capsys, "already holds a checkpoint of run resnet18_scratch", train.main,
                     base_args(tiny_demo, tmp_path, "--epochs", "2"))
    assert "--resume" in err and "--run-name" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "2", "--overwrite"))
    assert runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt")["epoch"] == 2
    assert len(pd.read_csv(tmp_path / "logs" / "resnet18_scratch.csv")) == 2


def test_a_running_run_is_locked_and_a_dead_runs_lock_is_taken_over(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "checkpoints" / "resnet18_scratch"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process: this one
    fails_with(capsys, f"being trained by another train.py (pid {os.getpid()}", train.main,
               base_args(tiny_demo, tmp_path, "--epochs", "1"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # a process that has ended
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "1"))
    assert (run_dir / "last.pt").is_file() and not (run_dir / ".lock").exists()  # released at exit


def test_resume_auto_starts_fresh_then_goes_on(tiny_demo, tmp_path, capsys):
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "1", "--resume", "auto"))
    assert "resumed" not in capsys.readouterr().out
    train.main(base_args(tiny_demo, tmp_path, "--epochs", "2", "--resume", "auto"))
    assert "resumed" in capsys.readouterr().out
    log = pd.read_csv(tmp_path / "logs" / "resnet18_scratch.csv")
    assert log["epoch"].tolist() == [1, 2]


def test_torchrun_restarts_a_killed_rank_and_logs_every_epoch_once(repo_root, tmp_path):
    import psutil
    import synthetic

    # big enough that an epoch lasts seconds, so that the kill lands inside one
    root = synthetic.generate_demo(tmp_path / "demo", n_train=240, n_test=32, size=64, seed=4, quiet=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", str(repo_root / "train.py"),
           *base_args(root, tmp_path, "--epochs", "3", "--device", "cpu", "--resume", "auto")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "logs" / "resnet18_scratch.csv"
    deadline = time.time() + 240
    while not log.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert log.exists(), proc.communicate()[0][-3000:]
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"
             and p.environ().get("TORCHELASTIC_RESTART_COUNT") == "0" and "train.py" in " ".join(p.cmdline())]
    assert ranks, "rank 1 not found"
    ranks[0].kill()  # mid-epoch 2
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed" in out
    epochs = pd.read_csv(log)["epoch"].tolist()
    assert epochs == [1, 2, 3], out[-3000:]
    assert runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt")["epoch"] == 3


# --------------------------------------------------------------------------- best.pt never lags the logs
@pytest.mark.parametrize("crash_in", ["copy_atomic", "write_text_atomic"])
def test_a_run_killed_while_writing_an_epoch_is_brought_level_on_resume(tiny_demo, tmp_path, monkeypatch, crash_in,
                                                                          capsys):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment the process died

    with monkeypatch.context() as m:
        m.setattr(train, crash_in, killed)
        with pytest.raises(KeyboardInterrupt):
            train.main(base_args(tiny_demo, tmp_path, "--epochs", "1"))
    run_dir, logs = tmp_path / "checkpoints" / "resnet18_scratch", tmp_path / "logs"
    last = runtime.load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == last["best_epoch"] == 1
    # what a reader sees now: the logs never name a best epoch that best.pt lacks
    if (logs / "resnet18_scratch.json").exists():
        assert json.loads((logs / "resnet18_scratch.json").read_text())["best_epoch"] == 1
        assert runtime.load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    # leftovers of the kill
    (run_dir / ".last.pt.999999.tmp").write_bytes(b"half")
    logs.mkdir(exist_ok=True)
    (logs / ".resnet18_scratch.csv.999999.tmp").write_text("epoch\n")
    train.main(["--resume", str(run_dir / "last.pt"), "--quiet"])
    assert "brought" in capsys.readouterr().out
    assert runtime.load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    summary = json.loads((logs / "resnet18_scratch.json").read_text())
    assert summary["best_epoch"] == summary["epochs_done"] == 1
    assert pd.read_csv(logs / "resnet18_scratch.csv")["epoch"].tolist() == [1]
    assert not list(run_dir.glob(".*.tmp")) and not list(logs.glob(".*.tmp"))


# --------------------------------------------------------------------------- resume finds its own data
def test_resume_from_another_folder_trains_on_the_runs_own_data(tiny_demo, tmp_path, monkeypatch, capsys):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    (first / "data").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("train_img.csv", "train_label.csv", "test_img.csv", "test_label.csv", "images"):
        src = tiny_demo / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, first / "data" / name)
    monkeypatch.chdir(first)  # data/ here holds the lab layout: the default data root, given relatively
    train.main(["--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--quiet"])
    last = first / "checkpoints" / "resnet18_scratch" / "last.pt"
    assert runtime.load_checkpoint(last)["data"]["root"] == str(first / "data")
    monkeypatch.chdir(elsewhere)  # no data/ here: the resume must not draw the demo set
    train.main(["--resume", str(last), "--epochs", "2", "--quiet"])
    assert not (elsewhere / "data").exists() and runtime.load_checkpoint(last)["epoch"] == 2
    # the data moves: the recorded folder is gone, --data-root says where it is now
    shutil.move(first / "data", tmp_path / "moved")
    fails_with(capsys, "recorded in its checkpoint) does not exist; pass --data-root", train.main,
               ["--resume", str(last), "--epochs", "3", "--quiet"])
    fails_with(capsys, "does not hold the data the run trained on", train.main,
               ["--resume", str(last), "--epochs", "3", "--data-root", str(tmp_path / "other"), "--quiet"]) \
        if make_other_dataset(tmp_path / "other") else None
    train.main(["--resume", str(last), "--epochs", "3", "--data-root", str(tmp_path / "moved"), "--quiet"])
    assert runtime.load_checkpoint(last)["epoch"] == 3


def make_other_dataset(root):
    import synthetic

    synthetic.generate_demo(root, n_train=48, n_test=16, size=32, seed=9, quiet=True)
    (root / synthetic.MARKER).unlink()  # a lab-layout folder of other images and grades
    return True


# --------------------------------------------------------------------------- the rest of the trial
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_depth_images_are_scaled_to_8_bits_not_clipped(tmp_path, mode):
    import dataloader
    import evaluate
    import numpy as np
    from PIL import Image

    # a 12-bit eye (values up to 4095) on black: convert("RGB") clipped it to white everywhere it was lit
    yy, xx = np.mgrid[:64, :64]
    eye = ((xx - 32) ** 2 + (yy - 32) ** 2 < 28 ** 2) * (1000 + 3000 * xx / 63)
    raw = Image.fromarray(eye.astype(np.float32), "F") if mode == "F" else \
        Image.fromarray(eye.astype(np.int32), "I").convert(mode) if mode != "I" else Image.fromarray(eye.astype(np.int32))
    path = tmp_path / ("x.tif" if mode in ("I", "F") else "x.png")
    raw.save(path)
    with Image.open(path) as check:
        assert check.mode == mode or (mode.startswith("I;16") and check.mode.startswith("I;16")), check.mode
    table = dataloader.FundusTable(np.array([str(path)]), np.array([1]), "test")
    pixels = dataloader.FundusDataset(table, 64)[0][0].float()
    centre = pixels[:, 24:40, 24:40]
    assert 40 < centre.mean() < 220 and centre.std() > 5  # scaled, with its gradient kept
    photo = evaluate.PhotoDataset([path], 64, force=True)[0][0].float()  # greyscale: graded only with --force
    assert 40 < photo[:, 24:40, 24:40].mean() < 220


def test_a_last_training_batch_of_one_image_is_dropped_not_a_crash(tmp_path):
    import synthetic

    root = synthetic.generate_demo(tmp_path / "nine", n_train=9, n_test=5, size=32, seed=0, quiet=True)
    train.main(base_args(root, tmp_path, "--epochs", "1"))  # batches of 8 and 1: BatchNorm failed on the 1
    assert runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt")["epoch"] == 1


@pytest.mark.filterwarnings("ignore:skipped unreadable image")
def test_a_whole_unreadable_batch_is_skipped(tmp_path, capsys):
    import synthetic

    root = synthetic.generate_demo(tmp_path / "bad", n_train=16, n_test=5, size=32, seed=0, quiet=True)
    for name in runtime_names(root)[1:]:  # one readable image left: each batch of 8 holds it or none
        (root / "images" / f"{name}.jpeg").write_bytes(b"not a jpeg")
    # before: an empty batch gave a false "loss became non-finite", a batch of one a BatchNorm traceback
    train.main(base_args(root, tmp_path, "--epochs", "2", "--skip-bad-images"))
    out = capsys.readouterr().out
    assert "skipped unreadable images in epoch 2 (--skip-bad-images): 15 in training" in out
    assert runtime.load_checkpoint(tmp_path / "checkpoints" / "resnet18_scratch" / "last.pt")["epoch"] == 2


def runtime_names(root):
    import dataloader

    return dataloader.read_column(root / "train_img.csv")


def test_cam_figures_never_overwrite_a_photo_and_get_distinct_names(tmp_path):
    import evaluate

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    paths = [a / "eye.jpeg", b / "eye.jpeg", a / "eye-2.jpeg", a / "eye_cam.png"]
    for p in paths:
        p.write_bytes(b"x")
    outputs = evaluate.cam_outputs(paths, a)  # --cam pointing at an input folder
    written = [p for copy, figure in outputs for p in (copy, figure) if p is not None]
    assert len(set(written)) == len(written)
    assert not {p.resolve() for p in written} & {p.resolve() for p in paths}
    assert outputs[0][0] is None  # a photo already in the folder is not copied onto itself
    assert outputs[1][0] is not None and outputs[1][0].parent == a


def test_prepare_refuses_labels_that_match_no_photo_before_cropping(tmp_path, capsys):
    from data import prepare
    from PIL import Image

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (64, 48), (120, 40, 20)).save(raw / "10_left.jpeg")
    (tmp_path / "labels.csv").write_text("image,level\n99_left,2\n")
    fails_with(capsys, "matches a photo in SRC_DIR", prepare.main,
               [str(raw), str(tmp_path / "out"), "--labels", str(tmp_path / "labels.csv"), "--workers", "1"])
    (tmp_path / "header.csv").write_text("image,level\n")
    fails_with(capsys, "has a header but no rows", prepare.main,
               [str(raw), str(tmp_path / "out"), "--labels", str(tmp_path / "header.csv"), "--workers", "1"])
    assert not (tmp_path / "out").exists()  # nothing cropped


def test_plot_skips_a_run_without_a_finished_epoch_and_hidden_files(tmp_path, capsys):
    import plot

    logs = tmp_path / "logs"
    logs.mkdir()
    header = "epoch,train_loss,train_acc,test_loss,test_acc,test_kappa,lr,seconds,images_per_s"
    row = "1,1.0,0.6,1.1,0.7,0.3,0.001,10,50"
    for name, rows in (("done", [row]), ("starting", [])):
        (logs / f"{name}.csv").write_text("\n".join([header, *rows]) + "\n")
        (logs / f"{name}.json").write_text(json.dumps({"run_name": name, "arch": "resnet18", "pretrained": False}))
    (logs / "._done.json").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (logs / ".done.json.123.tmp").write_text("{")
    plot.main([str(logs), "--out", str(tmp_path / "figures")])
    out = capsys.readouterr().out
    assert "skipping starting" in out and "no finished epoch yet" in out
    assert (tmp_path / "figures" / "comparison_resnet18.png").is_file()


def test_labels_table_errors_name_the_files_own_line(tmp_path, capsys):
    import dataloader

    (tmp_path / "trainLabels.csv").write_text("image,level\n1_left,0\n\n1_right,seven\n")
    with pytest.raises(runtime.UserError, match=r"trainLabels.csv line 4: grade 'seven'"):
        dataloader.read_labels_table(tmp_path / "trainLabels.csv")


def test_stop_message_quotes_a_path_with_spaces(tiny_demo, tmp_path):
    out = tmp_path / "my runs"
    cmd = [sys.executable, "train.py", *base_args(tiny_demo, out, "--epochs", "50")]
    proc = subprocess.Popen(cmd, cwd=Path(train.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    last = out / "checkpoints" / "resnet18_scratch" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert f"resume with: python train.py --resume '{last}'" in stdout


def test_url_probe_gives_up_within_its_timeout(tmp_path):
    import models

    silent = socket.socket()  # accepts the connection, never answers: a black-holed network
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    start = time.time()
    reason = models.url_unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}/resnet18.pth", timeout=1)
    silent.close()
    assert reason is not None and "within 1 s" in reason and time.time() - start < 5


def test_make_demo_trains_the_pretrained_half_when_the_weights_are_cached(repo_root, tmp_path):
    import synthetic
    import torch
    import torchvision

    # the repo's files in an empty folder, a small demo set already drawn, ImageNet weights in the cache
    work = tmp_path / "repo"
    work.mkdir()
    for name in ["Makefile", "requirements.txt", "pyproject.toml", *[p.name for p in repo_root.glob("*.py")]]:
        shutil.copy(repo_root / name, work / name)
    synthetic.generate_demo(work / "data" / "demo", n_train=48, n_test=24, size=32, seed=0, quiet=True)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(["make", "-o", str(venv / ".installed"), "demo", f"VENV={venv}", f"PY={sys.executable}",
                             "DEMO_EPOCHS=1"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ImageNet weights for resnet18: " in result.stdout
    import plot

    runs = plot.load_runs(work / "logs")
    fig = plot.comparison_figure("resnet18", runs)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    lab = ["Train(with pretraining)", "Test(with pretraining)", "Train(w/o pretraining)", "Test(w/o pretraining)"]
    assert [label for label in labels if label in lab] == lab  # and the validation lines the demo holds out
    assert (work / "figures" / "comparison_resnet18.png").is_file()


def test_models_fetch_without_weights_or_network_says_why_in_seconds(repo_root, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    start = time.time()
    result = subprocess.run([sys.executable, "models.py", "--fetch", "resnet18"], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.time() - start < 30
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "resnet18-f37072fd.pth" in err and str(tmp_path / "torch") in err
