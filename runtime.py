"""What every script shares at run time: the grading scale, one-line errors and the argument parser,
worker processes, atomic writes, device and precision, and the checkpoint format.

It imports no script of this repo, so that any of them can import it; scripts never import each other
(train.py calls evaluate.py's inference, the one path from logits to numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import random
import signal
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# The International Clinical Diabetic Retinopathy scale, as EyePACS, APTOS and the lab grade it.
NUM_GRADES = 5
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
# logs/<run>.csv, one row per epoch, in this order; a run with a validation split adds VAL_COLUMNS.
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_kappa", "lr", "seconds",
               "images_per_s"]
VAL_COLUMNS = ["val_loss", "val_acc", "val_kappa"]


# --------------------------------------------------------------------------- errors
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the input the user gave: the message names the flag, file or row."""


class RunFailed(Exception):
    """Not the user's mistake, but an end that one sentence explains (a diverged loss, a dead worker):
    exit status 1, no traceback."""


class WorkerDied(RunFailed):
    """A worker process ended without returning (killed by the system, often for lack of memory)."""


def exit_on_user_error(main):
    """A script's entry point: a UserError ends in its sentence and exit status 2, a RunFailed in its
    sentence and exit status 1; everything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "error"
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = str(err)
            if "Original Traceback" in message:
                # raised in a DataLoader worker, which wraps it in the worker's traceback: keep the sentence
                message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
            print(f"{prog}: error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except RunFailed as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(1)
    return wrapper


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line and no usage block: the message names the flag."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar; disable=None keeps it quiet when stderr is not a terminal (CI, logs, nohup)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


# --------------------------------------------------------------------------- worker processes
def worker_signals(_worker_id: int | None = None) -> None:
    """Signal handling of every worker process (a pool's initializer, a DataLoader's worker_init_fn).

    Ctrl-C belongs to the parent, which stops the work and ends the workers; SIGTERM ends a worker,
    which is how pools and DataLoader shut workers down. A forked worker otherwise inherits the
    parent's handlers: train.py's stop request once made idle pool workers shrug off the pool's
    SIGTERM, and the parent waited for them forever (make demo hung in about half the runs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def map_in_processes(fn, items: list, workers: int, chunksize: int = 1):
    """fn(item) for every item on `workers` processes, yielded in the order they finish; in this
    process when workers <= 1 (plain tracebacks, pdb works).

    concurrent.futures notices a worker that dies and raises WorkerDied at once, where
    multiprocessing.Pool would wait for its lost task forever. Stopping early (Ctrl-C, an error, the
    caller breaking off) cancels every chunk not yet started and waits only for the running ones."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(min(workers, len(items)), initializer=worker_signals) as pool:
        futures = [pool.submit(_run_chunk, fn, items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
        try:
            for future in as_completed(futures):
                yield from future.result()
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed by the system, often for lack of memory); "
                             "rerun with --workers 1 to see its error") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --------------------------------------------------------------------------- atomic writes
TMP_SUFFIX = ".tmp"


def tmp_name(path: Path) -> Path:
    """The temporary name atomic_write writes `path` under: hidden, beside it, one per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write `path` through a file object; readers see the old file or the whole new one, never a
    part: a temporary file in the same folder, flushed and fsynced, then os.replace (atomic on POSIX).
    On an exception, Ctrl-C included, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files atomic_write left in `folder` when its process was killed (SIGKILL,
    a power cut): all of them, or those of the file `name` only. Returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = sorted(folder.glob(f".{name}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path`, atomically (see atomic_write)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) into `path`, atomically (see atomic_write)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A copy of the file `src` at `dst`, atomically (see atomic_write)."""
    with open(src, "rb") as source, atomic_write(dst) as f:
        while chunk := source.read(1 << 24):
            f.write(chunk)


# --------------------------------------------------------------------------- device and precision
def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda: CUDA when asked for or present; asked for and absent is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def precision(amp: bool | None, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 loss scaling is needed) for --amp/--no-amp (None: on for CUDA)."""
    if not (amp if amp is not None else device.type == "cuda"):
        return None, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, True  # pre-Ampere GPUs: fp16 needs loss scaling
    return torch.bfloat16, False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype`, or a context that does nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """--channels-last/--no-channels-last as the memory format of the model and its batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


# --------------------------------------------------------------------------- the checkpoint format
# One dict, loadable with torch.load(path, weights_only=True). `model` holds torchvision's key names
# (no `module.` or `_orig_mod.` prefix), so torchvision.models.resnetXX(num_classes=5) loads it strictly.
CHECKPOINT_KEYS = ("model", "arch", "num_classes", "image_size", "epoch", "best_metric", "best_epoch",
                   "best_metric_name", "config", "data", "pretrained_source", "optimizer", "scheduler", "scaler",
                   "rng", "history")


def make_checkpoint(state_dict: dict, config: dict, data: dict, epoch: int, history: list[dict], best: dict,
                    training: dict, pretrained_source: str | None) -> dict:
    """The checkpoint of a run after `epoch`.

    config: the run's flags as a plain dict (arch from --model, image size from --image-size);
    data: where the data came from (layout, folders, split sizes); best: best_epoch, best_metric,
    best_metric_name; training: the state_dicts of optimizer, scheduler and scaler."""
    return {"model": state_dict, "arch": config["model"], "num_classes": NUM_GRADES,
            "image_size": config["image_size"], "epoch": epoch, **best, "config": config, "data": data,
            "pretrained_source": pretrained_source, **training, "rng": rng_states(), "history": history}


def load_checkpoint(path: str | os.PathLike, flag: str = "checkpoint") -> dict:
    """One of our checkpoints, read with weights_only=True: a file whose pickle would run code is refused.
    `flag` names where the path came from in the messages (`checkpoint`, `--resume`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "forbidden object"
        raise UserError(f"refused {path}: it holds pickled objects that are not plain tensors and data, "
                        f"which could run code on loading ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"cannot read {flag} {path}: truncated or not a PyTorch file "
                        f"({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model", "arch", "config"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this project (expected the keys model, arch, config)")
    return checkpoint


def restore_model(model: torch.nn.Module, checkpoint: dict, path) -> torch.nn.Module:
    """The checkpoint's weights into `model` (strictly); weights of another shape are one sentence."""
    arch = checkpoint["arch"]
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise UserError(f"{path} says arch {arch} but its weights do not fit {arch} ({detail[:160]})") from None
    return model


def restore_training(checkpoint: dict, optimizer, scheduler, scaler) -> None:
    """Optimiser, schedule, loss scaler and every random number generator, as they were after the epoch."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])


def run_summary(checkpoint: dict, environment: dict, checkpoint_dir: Path) -> dict:
    """logs/<run>.json: the flags, the data, the environment and the best epoch, from the checkpoint."""
    config, history = checkpoint["config"], checkpoint["history"]
    return {"run_name": config["run_name"], "arch": checkpoint["arch"], "pretrained": is_pretrained(config),
            "config": config, "data": checkpoint["data"], "environment": environment,
            "epochs_done": checkpoint["epoch"], "best_epoch": checkpoint["best_epoch"],
            "best_metric": checkpoint["best_metric"], "best_metric_name": checkpoint["best_metric_name"],
            "best": history[checkpoint["best_epoch"] - 1], "last": history[-1],
            "checkpoint_dir": str(checkpoint_dir)}


def is_pretrained(config: dict) -> bool:
    """Whether a run's flags (a checkpoint's config) start from ImageNet weights."""
    return bool(config.get("pretrained") or config.get("weights"))


def rng_states() -> dict:
    """Every generator a run draws from, as tensors and plain lists (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(mt), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Every generator back to the state rng_states() recorded (CUDA's only on the same GPU count)."""
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
