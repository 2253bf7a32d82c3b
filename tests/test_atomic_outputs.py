"""Every output whole after a crash or a full disk (issue 31).

The source is read for every call that writes a file: each goes through runtime.atomic_writes, or is one of
the few listed below with the reason it needs none. Every function that writes through it has a scenario
here in which that very write fails midway, as a full disk fails it (os.write answers ENOSPC after half the
bytes): the command says so in one sentence and exits 1, the file there before is byte for byte as it was,
no temporary file is left, and a dead writer's temporary file of the same output is gone. A writer added
without a scenario, or a write added outside the helper, fails this file."""
import argparse
import ast
import contextlib
import errno
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import bench
import dataloader
import evaluate
import export
import plot
import runtime
import train
from data import prepare
from photo_kit import fundus_photo
from runtime import DiskFull

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
RUN = "resnet18_scratch"


# --------------------------------------------------------------------------- the writes in the source
HELPERS = {"atomic_write", "atomic_writes", "write_text_atomic", "save_atomic", "copy_atomic"}
# calls that write a file given as an argument (the receiver: Image.save, fig.savefig, frame.to_csv, ...)
WRITE_CALLS = {"savefig", "write_text", "write_bytes", "save", "savez", "savez_compressed", "savetxt", "tofile",
               "to_csv", "to_json", "to_parquet", "to_excel", "to_pickle", "to_feather", "dump", "save_model",
               "urlretrieve", "download_url_to_file", "quantize_static", "quantize_dynamic", "quant_pre_process",
               "imwrite", "imsave"}
WRITE_CALLS |= {"to_markdown", "to_html", "to_latex", "to_string", "to_hdf", "to_stata", "save_image"}
SHUTIL_WRITES = {"copy", "copy2", "copyfile", "copytree", "copyfileobj", "move"}
# functions of a module that open (path, mode): open(), io.open, gzip.open, tarfile.open, zipfile.ZipFile, ...
OPENERS = {"open", "fdopen", "ZipFile", "TarFile"}
PATH_FIRST = {None, "io", "os", "gzip", "bz2", "lzma", "codecs", "tarfile", "zipfile", "Image"}
# a file created beside an output and renamed into place by hand: an atomic write that skips the helper
HAND_MADE = {"mkstemp", "NamedTemporaryFile"}
# The writes that need no atomic_writes, and why. Each must still be in the source (a stale entry fails).
OWN_WAY = {
    ("train.py", "RunLock.acquire"): "the run lock, created exclusively (O_EXCL); the empty lock of a process "
                                     "killed before it wrote its pid is stale and taken over",
    ("data/prepare.py", "Crops.record"): "prepared.txt, an append-only journal: one os.write per record, fsynced",
    ("synthetic.py", "draw_task"): "the demo set is written into a hidden partial folder, moved into place whole",
    ("synthetic.py", "write_csvs"): "the demo set is written into a hidden partial folder, moved into place whole",
    ("synthetic.py", "generate_demo"): "the demo set is written into a hidden partial folder, moved into place "
                                       "whole",
    ("deploy.py", "quantise_dynamic"): "onnxruntime's files in a private tempfile.TemporaryDirectory, never an "
                                       "output (export.py writes the result atomically)",
    ("deploy.py", "quantise_static"): "onnxruntime's files in a private tempfile.TemporaryDirectory, never an "
                                      "output (export.py writes the result atomically)",
    ("bench.py", "camera_jpeg"): "a scratch photo in bench.py's private tempfile.TemporaryDirectory",
}


def sources() -> list[Path]:
    skip = {"tests", "__pycache__"}
    return sorted(p for p in ROOT.rglob("*.py")
                  if not skip & set(p.relative_to(ROOT).parts) and not any(part.startswith(".")
                                                                           for part in p.relative_to(ROOT).parts))


def _name(node) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _writes_a_file(call: ast.Call) -> bool:
    name = _name(call.func)
    receiver = _name(call.func.value) if isinstance(call.func, ast.Attribute) else None
    keywords = {k.arg: k.value for k in call.keywords}
    if name == "open" and receiver == "os":
        flags = {n.attr for a in call.args[1:2] for n in ast.walk(a) if isinstance(n, ast.Attribute)}
        return bool(flags & {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND"})
    if name in OPENERS:  # open(path, mode), io.open, gzip.open, os.fdopen(fd, mode); Path(...).open(mode)
        at = 1 if receiver in PATH_FIRST else 0
        mode = keywords.get("mode", call.args[at] if len(call.args) > at else None)
        if mode is None or (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
            return bool(set(mode.value if mode else "") & set("wax+"))
        return True  # a mode the source does not spell out: a write, unless listed in OWN_WAY
    if name in HAND_MADE:
        return True
    if receiver is None:  # a library's writer is a method or a module's function (torch.save, fig.savefig)
        return False
    if name == "export":  # torch.onnx.export(model, args, f): a file when given one
        return receiver == "onnx" and (len(call.args) >= 3 or "f" in keywords)
    if name in SHUTIL_WRITES:
        return receiver == "shutil"
    if name.startswith("to_"):  # frame.to_csv() with no path returns the text
        return name in WRITE_CALLS and bool(call.args or "path_or_buf" in keywords)
    if name == "dump":  # json.dump(obj, f), pickle.dump(obj, f)
        return len(call.args) >= 2
    return name in WRITE_CALLS and bool(call.args or call.keywords)


class Writes(ast.NodeVisitor):
    """(function, line, call) of every write of a file outside atomic_writes' file objects, and every function
    that calls one of the helpers."""

    def __init__(self):
        self.scope, self.through, self.raw, self.writers = [], [], [], set()

    def visit_FunctionDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_With(self, node):
        bound = [{n.id for n in ast.walk(item.optional_vars) if isinstance(n, ast.Name)}
                 for item in node.items if item.optional_vars is not None and isinstance(item.context_expr, ast.Call)
                 and _name(item.context_expr.func) in ("atomic_write", "atomic_writes")]
        self.through.append(set().union(*bound))
        self.generic_visit(node)
        self.through.pop()

    def visit_Call(self, node):
        where = ".".join(self.scope)
        if _name(node.func) in HELPERS:
            self.writers.add(where)
        if _writes_a_file(node):
            names = {n.id for part in [*node.args, *(k.value for k in node.keywords)]
                     + ([node.func.value] if isinstance(node.func, ast.Attribute) else [])
                     for n in ast.walk(part) if isinstance(n, ast.Name)}
            if not names & set().union(*self.through):
                self.raw.append((where, node.lineno, ast.unparse(node)[:80]))
        self.generic_visit(node)


def scan() -> tuple[dict, set]:
    raw, writers = {}, set()
    for path in sources():
        if path.name == "runtime.py":
            continue  # the helper itself, and its wrappers
        rel = path.relative_to(ROOT).as_posix()
        found = Writes()
        found.visit(ast.parse(path.read_text(), str(path)))
        for where, line, text in found.raw:
            raw.setdefault((rel, where), []).append(f"{rel}:{line}: {text}")
        writers |= {f"{rel}::{where}" for where in found.writers}
    return raw, writers


def test_every_file_is_written_through_the_atomic_helper():
    raw, _ = scan()
    unexplained = [line for key, lines in raw.items() if key not in OWN_WAY for line in lines]
    assert not unexplained, ("these calls write a file in place, where a kill or a full disk leaves it cut: write "
                             "through runtime.atomic_write(s) instead\n" + "\n".join(unexplained))
    stale = [key for key in OWN_WAY if key not in raw]
    assert not stale, f"OWN_WAY lists writes no longer in the source: {stale}"


def test_the_scan_finds_a_write_in_place():
    # the oracle of the two tests above: the write calls the scan must catch, each written as the code would
    code = '''
def f(fig, frame, image, arr, path, src):
    fig.savefig(path)
    frame.to_csv(path, index=False)
    image.save(path, quality=90)
    np.savez_compressed(path, a=arr)
    torch.save(arr, path)
    Path(path).write_text("x")
    shutil.copy2(src, path)
    onnx.save(arr, path)
    with open(path, "w") as f:
        f.write("x")
    os.open(path, os.O_WRONLY | os.O_CREAT)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    frame.to_csv(index=False)
    with open(path) as f:
        f.read()
    with gzip.open(path, "wt") as f:
        f.write("x")
    zipfile.ZipFile(path, "w")
    open(path, mode)
    fd, tmp = tempfile.mkstemp(dir=folder)
    torch.onnx.export(model, example, path)
    frame.to_markdown(path)
    Image.open(path)
    gzip.open(path)
    torch.onnx.export(model, example, dynamo=True)
'''
    found = Writes()
    found.visit(ast.parse(code))
    assert [line for _, line, _ in found.raw] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 19, 21, 22, 23, 24, 25]


# --------------------------------------------------------------------------- a workspace with every output
@pytest.fixture(scope="module")
def cheap_evaluation():
    """evaluate.py without its costly figures, which no test here reads: 20 bootstrap resamples instead of
    1000, no timing of a grade (each takes seconds on a CI runner, and evaluate.py runs often here)."""
    import metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics.bootstrap_intervals, "__defaults__", (20, metrics.BOOTSTRAP_SEED))
        patch.setattr(evaluate, "ms_per_image", lambda *args, **kwargs: 1.0)
        yield


@pytest.fixture(scope="module")
def ws(tiny_demo, tmp_path_factory, cheap_evaluation):
    """A run trained, evaluated (with Grad-CAMs), plotted, exported, a photo graded with --cam and --out, the
    data card's list, and a prepared folder with its lab layout: every output there once, to be replaced."""
    ws = tmp_path_factory.mktemp("atomic")
    # NCHW: channels_last BatchNorm takes twice as long on a CPU
    train.main(["--data-root", str(tiny_demo), "--image-size", "32", "--batch-size", "16", "--workers", "0",
                "--no-channels-last", "--epochs", "1", "--checkpoint-dir", str(ws / "checkpoints"), "--log-dir", str(ws / "logs"),
                "--quiet"])
    ckpt = ws / "checkpoints" / RUN / "best.pt"
    paths = {"ws": ws, "demo": tiny_demo, "ckpt": ckpt, "logs": ws / "logs", "figures": ws / "figures",
             "photo": min((tiny_demo / "images").iterdir()), "cams": ws / "cams", "raw": ws / "raw",
             "prepared": ws / "prepared"}
    evaluate.main([*evaluate_args(paths), "--cam-per-grade", "1"])
    plot.main([str(ws / "logs"), "--out", str(ws / "figures")])
    export.main([str(ckpt), "--check-images", "4"])
    evaluate.main(grade_args(paths))
    dataloader.main(["--data-root", str(tiny_demo), "--excluded-csv", str(ws / "excluded.csv")])
    for i, name in enumerate(["1_left", "1_right", "2_left", "2_right", "3_left", "3_right", "4_left", "4_right"]):
        paths["raw"].mkdir(exist_ok=True)
        fundus_photo(seed=i).save(paths["raw"] / f"{name}.jpeg", quality=90)
    fundus_photo(seed=9).convert("L").save(paths["raw"] / "5_left.png")  # not a colour photo: ungradable
    pd.DataFrame({"image": [p.stem for p in sorted(paths["raw"].iterdir())], "level": 0}).to_csv(
        ws / "labels.csv", index=False)
    assert prepare.main(prepare_args(paths)) == 0
    assert (paths["prepared"] / "ungradable.csv").is_file() and (paths["prepared"] / "test_img.csv").is_file()
    return paths


def evaluate_args(ws) -> list[str]:
    return [str(ws["ckpt"]), "--workers", "0", "--quiet", "--figure-dir", str(ws["figures"])]


def grade_args(ws) -> list[str]:
    return [str(ws["ckpt"]), "--images", str(ws["photo"]), "--force", "--workers", "0", "--quiet",
            "--cam", str(ws["cams"]), "--out", str(ws["ws"] / "grades.csv")]


def prepare_args(ws, dst=None, *more) -> list[str]:
    return [str(ws["raw"]), str(dst or ws["prepared"]), "--size", "64", "--workers", "1",
            "--labels", str(ws["ws"] / "labels.csv"), "--test-fraction", "0.25", *more]


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has ended: what a writer killed mid-write leaves in its temporary's name."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --------------------------------------------------------------------------- a write that finds no room
@contextlib.contextmanager
def no_room_for(target: Path, monkeypatch, code=errno.ENOSPC):
    """The system's answer to a full disk, for the temporary file of `target` only (in this process or a
    forked worker): half the bytes of a write land, then ENOSPC, as a disk that fills midway does."""
    real = os.write
    folder, prefix = os.path.realpath(target.parent), f".{target.name}."

    def write(fd, data):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        name = os.path.basename(where)
        if os.path.dirname(where) == folder and name.startswith(prefix) and name.endswith(runtime.TMP_SUFFIX):
            real(fd, bytes(data)[:max(1, len(data) // 2)])
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        yield


def state(path: Path):
    return path.read_bytes() if path.is_file() else None


WRITERS: dict[str, list] = {}  # "file::function" -> its scenarios


def writer(key: str, expect: str = "exit 1"):
    """A scenario for the writer `key`: fn(ws, tmp_path, monkeypatch) -> (the file whose write fails, the
    call, the other files that must stay as they were). expect: "exit 1" (one sentence), "DiskFull" (a
    function, raising it) or "summary" (data/prepare.py stops as on a signal, with its summary, exit 1)."""
    def register(fn):
        WRITERS.setdefault(key, []).append((fn, expect))
        return fn
    return register


@writer("plot.py::_save")
def plot_figure(ws, tmp_path, monkeypatch):
    return ws["figures"] / "comparison_resnet18.png", lambda: plot.main([str(ws["logs"]), "--out",
                                                                        str(ws["figures"])]), []


@writer("plot.py::write_summary")
def plot_summary(ws, tmp_path, monkeypatch):
    return ws["figures"] / "summary.md", lambda: plot.main([str(ws["logs"]), "--out", str(ws["figures"])]), []


@writer("evaluate.py::write_predictions")
def predictions(ws, tmp_path, monkeypatch):
    return ws["logs"] / f"{RUN}_predictions.csv", lambda: evaluate.main(evaluate_args(ws)), []


@writer("evaluate.py::evaluate_split_command")
def metrics_json(ws, tmp_path, monkeypatch):
    return ws["logs"] / f"{RUN}_eval.json", lambda: evaluate.main(evaluate_args(ws)), []


@writer("evaluate.py::evaluate_split_command")
def grad_cams(ws, tmp_path, monkeypatch):
    return ws["logs"] / f"{RUN}_cams.npz", lambda: evaluate.main([*evaluate_args(ws), "--cam-per-grade", "1"]), []


@writer("evaluate.py::grade_photos")
def grades(ws, tmp_path, monkeypatch):
    return ws["ws"] / "grades.csv", lambda: evaluate.main(grade_args(ws)), []


@writer("evaluate.py::save_cam")
def photo_copy(ws, tmp_path, monkeypatch):
    return ws["cams"] / ws["photo"].name, lambda: evaluate.main(grade_args(ws)), [ws["ws"] / "grades.csv"]


@writer("export.py::main")
def onnx_file(ws, tmp_path, monkeypatch):
    return ws["ckpt"].with_suffix(".onnx"), lambda: export.main([str(ws["ckpt"]), "--check-images", "4"]), []


@writer("train.py::write_epoch", expect="DiskFull")
def checkpoint(ws, tmp_path, monkeypatch):
    run_dir = tmp_path / "checkpoints" / RUN
    shutil.copytree(ws["ckpt"].parent, run_dir)
    saved = runtime.load_checkpoint(run_dir / "last.pt")
    return run_dir / "last.pt", lambda: train.write_epoch(saved, True, run_dir, tmp_path / "logs", {}), []


@writer("train.py::write_epoch", expect="DiskFull")
def epoch_log(ws, tmp_path, monkeypatch):
    run_dir, log_dir = tmp_path / "checkpoints" / RUN, tmp_path / "logs"
    shutil.copytree(ws["ckpt"].parent, run_dir)
    shutil.copytree(ws["logs"], log_dir)
    saved = runtime.load_checkpoint(run_dir / "last.pt")
    return log_dir / f"{RUN}.csv", lambda: train.write_epoch(saved, True, run_dir, log_dir, {}), [
        log_dir / f"{RUN}.json"]


@writer("dataloader.py::main")
def excluded(ws, tmp_path, monkeypatch):
    return ws["ws"] / "excluded.csv", lambda: dataloader.main(["--data-root", str(ws["demo"]), "--excluded-csv",
                                                               str(ws["ws"] / "excluded.csv")]), []


@writer("data/prepare.py::check_options")
def prepare_options(ws, tmp_path, monkeypatch):
    return tmp_path / "fresh" / "prepare_options.json", lambda: prepare.main(prepare_args(ws, tmp_path / "fresh")), []


@writer("fundus.py::prepare_photo", expect="summary")
def crop(ws, tmp_path, monkeypatch):
    images = tmp_path / "fresh" / "images"
    args = prepare_args(ws, tmp_path / "fresh")
    args[args.index("--workers") + 1] = "2"  # the sentence comes back from a worker process whole
    return prepare.crop_file(images / "2_left.jpeg"), lambda: prepare.main(args), [images / "2_left.jpeg"]


@writer("data/prepare.py::report")
def ungradable_list(ws, tmp_path, monkeypatch):
    return ws["prepared"] / "ungradable.csv", lambda: prepare.main(prepare_args(ws)), []


@writer("data/prepare.py::write_lab_layout")
def lab_layout(ws, tmp_path, monkeypatch):
    # another --test-fraction: every table would change, and none may while one of them cannot be written
    tables = [ws["prepared"] / name for pair in dataloader.LAB_FILES.values() for name in pair]
    args = prepare_args(ws)
    args[args.index("--test-fraction") + 1] = "0.5"
    return tables[1], lambda: prepare.main(args), tables


@writer("bench.py::write_result")
def bench_result(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_cpu", lambda work, quick, workers: {"measured": 1.0})
    monkeypatch.setattr(bench, "report_cpu", lambda result: "a table")
    monkeypatch.setattr(bench, "machine", lambda: "this machine")
    out = tmp_path / "bench.json"
    bench.main(["--out", str(out)])
    return out, lambda: bench.main(["--out", str(out)]), []


def benchmark_module(name: str):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return __import__(name)


@writer("benchmarks/quality_check.py::measures_table", expect="DiskFull")
def measures_cache(ws, tmp_path, monkeypatch):
    quality_check = benchmark_module("quality_check")
    photos = sorted(ws["raw"].glob("*.jpeg"))
    cache = tmp_path / "measures.csv"
    quality_check.measures_table(pd.DataFrame({"path": photos[:1]}), cache)
    return cache, lambda: quality_check.measures_table(pd.DataFrame({"path": photos[:2]}), cache), []


@writer("benchmarks/quality_check.py::main")
def quality_figures(ws, tmp_path, monkeypatch):
    quality_check = benchmark_module("quality_check")
    for folder in ("drimdb/Good", "drimdb/Bad", "drimdb/Outlier", "eyepacs/train"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("trainLabels.csv", "eyeq_quality.csv"):
        (tmp_path / "eyepacs" / name).write_text("image,level\n")
    # the fit is tested in test_quality_check.py; here only what main writes
    monkeypatch.setattr(quality_check, "photos", lambda drimdb, eyepacs, unseen: None)
    monkeypatch.setattr(quality_check, "measures_table", lambda table, cache: pd.DataFrame(
        {"ms": [1.0, 2.0], "set": ["drimdb", "eyepacs"], "label": ["good", "good"]}))
    for step in ("out_of_fold", "cross_set", "fit", "small_sides"):
        monkeypatch.setattr(quality_check, step, lambda *args: None)
    monkeypatch.setattr(quality_check, "figures", lambda *args: {"accuracy": 1.0})
    args = ["--drimdb", str(tmp_path / "drimdb"), "--eyepacs", str(tmp_path / "eyepacs"),
            "--json", str(tmp_path / "figures.json")]
    quality_check.main(args)
    return tmp_path / "figures.json", lambda: quality_check.main(args), []


@writer("benchmarks/recipes.py::main")
def recipes_json(ws, tmp_path, monkeypatch):
    recipes = benchmark_module("recipes")
    # the runs and their figures are the repo's own commands, tested elsewhere; here only what main writes
    monkeypatch.setattr(recipes, "train_and_evaluate", lambda args, work, name, flags: {"kappa": 0.5,
                                                                                        "num_images": 16})
    monkeypatch.setattr(recipes, "figures", lambda result: {"kappa": result["kappa"]})
    monkeypatch.setattr(recipes, "paired_difference", lambda pairs: {})
    monkeypatch.setattr(recipes, "table", lambda results: "a table")
    monkeypatch.setattr(recipes, "difference_table", lambda differences: "no differences")
    out = tmp_path / "recipes.json"
    args = [str(ws["demo"]), "--seeds", "0", "--losses", "ce", "--work", str(tmp_path / "work"), "--out", str(out)]
    recipes.main(args)
    return out, lambda: recipes.main(args), []


@writer("train.py::cached_features", expect="DiskFull")
def two_eye_features(ws, tmp_path, monkeypatch):
    import torch

    import twoeye

    checkpoint = runtime.load_checkpoint(ws["ckpt"])
    fundus = dataloader.load_run_data(checkpoint["config"], checkpoint.get("data", {}), log=lambda *a, **k: None)
    # the encoder's pass is twoeye's own test; here only the cache it fills
    monkeypatch.setattr(twoeye, "compute_features", lambda encoder, loader, *rest: torch.zeros(len(loader.dataset), 4))
    args = argparse.Namespace(checkpoint_dir=str(tmp_path / "checkpoints"), run_name=f"{RUN}_two_eye",
                              image_size=32, workers=0, batch_size=8, skip_bad_images=False, quiet=True)
    (tmp_path / "checkpoints" / args.run_name).mkdir(parents=True)
    train.cached_features(args, checkpoint, None, fundus, torch.device("cpu"), lambda *a: None)
    args.image_size = 48  # another size: the cache no longer holds these features, and is written again
    return (tmp_path / "checkpoints" / args.run_name / "features.pt",
            lambda: train.cached_features(args, checkpoint, None, fundus, torch.device("cpu"), lambda *a: None), [])


def test_every_writer_has_a_failing_write_scenario():
    _, writers = scan()
    assert writers == set(WRITERS), ("every function that writes through runtime's atomic helpers needs a "
                                     "scenario in WRITERS in which that write fails; missing: "
                                     f"{sorted(writers - set(WRITERS))}, gone: {sorted(set(WRITERS) - writers)}")


SCENARIOS = [(key, *entry) for key, entries in WRITERS.items() for entry in entries]


@pytest.mark.parametrize("key,scenario,expect", SCENARIOS, ids=[f"{key}:{fn.__name__}" for key, fn, _ in SCENARIOS])
def test_a_full_disk_in_every_writer_replaces_nothing_and_says_so(ws, tmp_path, monkeypatch, capsys, dead_pid,
                                                                  key, scenario, expect):
    target, call, others = scenario(ws, tmp_path, monkeypatch)
    target.parent.mkdir(parents=True, exist_ok=True)
    before = {p: state(p) for p in [target, *others]}
    # a writer of this output killed mid-write, and one writing it now (pid 1 always runs)
    dead = target.with_name(f".{target.name}.{dead_pid}{runtime.TMP_SUFFIX}")
    live = target.with_name(f".{target.name}.1{runtime.TMP_SUFFIX}")
    dead.write_bytes(b"cut")
    live.write_bytes(b"being written")
    capsys.readouterr()
    with no_room_for(target, monkeypatch):
        if expect == "DiskFull":
            with pytest.raises(DiskFull) as failed:
                call()
            err = str(failed.value)
        elif expect == "summary":
            assert call() == 1
            err = capsys.readouterr().err.strip()
        else:
            with pytest.raises(SystemExit) as failed:
                call()
            err = capsys.readouterr().err.strip()
            assert failed.value.code == 1, err
            assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err, err
    if expect == "summary":
        assert "No space left on device in " in err and "run the same command again" in err, err
    else:
        assert f"the disk holding {target.parent} is full" in err and f"{target.name} could not be written" in err
        assert "nothing was replaced" in err, err
    assert {p: state(p) for p in before} == before, "a file was replaced or removed by the failed write"
    assert not dead.exists(), "the temporary file of a writer killed before was left"
    assert live.exists(), "a live writer's temporary file was removed"
    live.unlink(missing_ok=True)
    left = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert not left, left


# --------------------------------------------------------------------------- the helper itself
def test_a_write_killed_midway_leaves_the_old_file_and_the_next_write_clears_its_leftover(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("the old summary\n")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: half the new file out, flushed, then killed where it stands
        try:
            with runtime.atomic_write(target) as f:
                f.write(b"| run | half of a new tab")
                f.flush()
                os.write(ready_w, b"1")
                signal.pause()
        finally:
            os._exit(1)
    assert os.read(ready_r, 1) == b"1"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    leftover = runtime.tmp_name(target).with_name(f".summary.md.{pid}.tmp")
    assert target.read_text() == "the old summary\n"
    assert leftover.read_bytes() == b"| run | half of a new tab"
    runtime.write_text_atomic(target, "the new summary\n")
    assert target.read_text() == "the new summary\n" and not leftover.exists()


def test_an_error_inside_a_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "figure.png"
    target.write_bytes(b"the old figure")
    with pytest.raises(KeyboardInterrupt), runtime.atomic_write(target) as f:
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt  # Ctrl-C, as it lands between two writes
    assert target.read_bytes() == b"the old figure" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_a_set_of_files_is_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    tables = [tmp_path / "train_img.csv", tmp_path / "test_img.csv"]
    for path in tables:
        path.write_text("old\n")
    with no_room_for(tables[1], monkeypatch), pytest.raises(DiskFull), runtime.atomic_writes(tables, "w") as files:
        for f in files:
            f.write("new\n")
    assert [p.read_text() for p in tables] == ["old\n", "old\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_img.csv", "train_img.csv"]


def test_a_file_size_limit_is_one_sentence_with_the_old_figure_kept(ws, tmp_path, capsys):
    # a real failure, not a simulated one: the kernel refuses to grow a file past RLIMIT_FSIZE (EFBIG;
    # Python ignores SIGXFSZ), and matplotlib's figures are larger than 16 kB
    figures = tmp_path / "figures"
    shutil.copytree(ws["figures"], figures)
    before = {p.name: p.read_bytes() for p in figures.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, hard))
    try:
        with pytest.raises(SystemExit) as failed:
            plot.main([str(ws["logs"]), "--out", str(figures)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err.strip()
    assert failed.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not be written: it grew past the file-size limit (16 kB, ulimit -f); nothing was replaced" in err
    assert {p.name: p.read_bytes() for p in figures.iterdir()} == before


# --------------------------------------------------------------------------- what killed writers left before
def test_a_rerun_replaces_the_empty_and_cut_files_a_killed_writer_left(ws, tmp_path):
    # before outputs were written atomically, a kill left the final path empty (savefig, savez) or cut
    figure, cams = ws["figures"] / f"confusion_{RUN}.png", ws["logs"] / f"{RUN}_cams.npz"
    cam_figure = ws["cams"] / f"{ws['photo'].stem}_cam.png"
    whole = cams.read_bytes()
    figure.write_bytes(b"")
    cams.write_bytes(whole[:len(whole) // 2])
    cam_figure.write_bytes(b"")
    evaluate.main([*evaluate_args(ws), "--cam-per-grade", "1"])
    evaluate.main(grade_args(ws))
    assert runtime.OUTPUT_KINDS["a figure drawn by matplotlib"](figure)
    with np.load(cams) as npz:
        assert str(npz["run_name"]) == RUN
    assert runtime.OUTPUT_KINDS["a figure drawn by matplotlib"](cam_figure)
    assert not list(ws["cams"].glob("*-2*"))  # the figure's own name, not another one beside the leftover


def test_a_file_of_the_users_is_still_refused(ws, tmp_path, capsys):
    # a cut Grad-CAM set is replaceable, a checkpoint (another zip) never: the rule did not loosen
    out = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(out)
    with pytest.raises(SystemExit):
        evaluate.main([*evaluate_args(ws), "--out", str(ws["ckpt"].parent / "last.pt")])
    assert "already exists and is a checkpoint" in capsys.readouterr().err
    assert not runtime.may_replace(out, "a figure drawn by matplotlib")
    assert not runtime.may_replace(ws["ckpt"], "a set of Grad-CAM samples of evaluate.py")


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_plot_skips_a_cut_grad_cam_set_in_one_line(ws, tmp_path, capsys, cut):
    logs = tmp_path / "logs"
    shutil.copytree(ws["logs"], logs)
    cams = logs / f"{RUN}_cams.npz"
    cams.write_bytes(b"" if cut == "empty" else cams.read_bytes()[:len(cams.read_bytes()) // 2])
    plot.main([str(logs), "--out", str(tmp_path / "figures")])
    out = capsys.readouterr().out
    assert f"plot.py: skipping {cams}: it is cut short" in out, out
    assert (tmp_path / "figures" / "comparison_resnet18.png").is_file()
    assert not (tmp_path / "figures" / f"cams_{RUN}.png").exists()


def test_disk_full_comes_back_from_a_worker_whole():
    import pickle

    err = runtime.disk_full(Path("/data/out/images/x.jpeg"), errno.EDQUOT)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, OSError) and isinstance(back, runtime.RunFailed)
    assert (back.errno, back.filename, str(back)) == (errno.EDQUOT, "/data/out/images/x.jpeg", str(err))
    assert str(err).startswith("your disk quota on /data/out/images is used up: x.jpeg could not be written")


def test_the_demo_set_clears_what_a_killed_generator_left_and_a_full_disk_keeps_the_old_set(tmp_path, capsys,
                                                                                             monkeypatch, dead_pid):
    # synthetic.py writes the set into a hidden folder and moves it into place whole (OWN_WAY above)
    import synthetic

    root = tmp_path / "demo"
    tiny = ["--root", str(root), "--train", "5", "--test", "5", "--size", "16", "--workers", "1"]
    synthetic.main(tiny)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    dead, live = (tmp_path / f".demo.partial-{dead_pid}", tmp_path / ".demo.old-1")  # pid 1 always runs
    for folder in (dead, live):
        (folder / "images").mkdir(parents=True)
    capsys.readouterr()

    def full(folder, splits):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "train_img.csv"))
    monkeypatch.setattr(synthetic, "write_csvs", full)
    with pytest.raises(SystemExit) as failed:
        synthetic.main([*tiny[:3], "6", *tiny[4:]])  # another set: the old one would be replaced
    err = capsys.readouterr().err.strip()
    assert failed.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "demo could not be written" in err and "nothing was replaced" in err, err
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.old-1", "demo"]
