"""Train a ResNet to grade diabetic retinopathy, from scratch or from ImageNet weights.

    python train.py --model resnet50 --pretrained
    torchrun --nproc_per_node 4 train.py --model resnet50 --pretrained

Each epoch trains, evaluates on the test split (the lab's curves need it), appends a row to
logs/<run>.csv, rewrites logs/<run>.json and checkpoints/<run>/last.pt (best.pt when the selection
metric improves). `--resume checkpoints/<run>/last.pt` continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dataloader as data
import models
from errors import UserError, exit_on_user_error

LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_kappa", "lr", "seconds",
               "images_per_s"]
VAL_COLUMNS = ["val_loss", "val_acc", "val_kappa"]
# Flags a resumed run may change; any other flag would make it a different run.
RESUME_OVERRIDES = {"epochs", "workers", "device", "compile", "resume", "quiet"}
SYNC_EVERY = 20  # batches between host syncs (progress bar text, non-finite check)


# --------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the flag
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=list(models.ARCHS), help="architecture")
    g.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    g.add_argument("--weights", default=None, help="ImageNet weight file to start from (implies --pretrained)")
    g.add_argument("--zero-init-residual", action="store_true", help="zero the last BN of each block")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None,
                   help="dataset folder (default: data/, or the synthetic demo set when data/ holds none)")
    g.add_argument("--image-dir", default=None, help="image folder (default: <data-root>/images if present)")
    g.add_argument("--image-size", type=int, default=None,
                   help="training resolution (default: 512, the demo set's own size on the demo)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out share of a labels table, grouped by patient (the lab layout has its own)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="patient-grouped share of the training split to choose best.pt on (0: choose on test)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient-grouped splits")
    g.add_argument("--sampler", default="shuffle", choices=["shuffle", "balanced"],
                   help="balanced draws every grade equally often")
    g.add_argument("--no-augment", action="store_true", help="no random flips, rotation, zoom or colour")
    g.add_argument("--workers", type=int, default=None, help="loader processes per GPU (default: CPUs, at most 16)")
    g.add_argument("--skip-bad-images", action="store_true", help="warn and skip undecodable images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs (the lab: 10 for ResNet18, 5 for ResNet50)")
    g.add_argument("--batch-size", type=int, default=32, help="images per GPU per step")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="batches summed into one optimiser step")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after the warm-up")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up from lr/100")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--class-weighted", action="store_true", help="weight the loss by inverse grade frequency")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (fp16 with loss scaling on GPUs without bf16); default on for CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convolutions on tensor cores and oneDNN")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("output")
    g.add_argument("--run-name", default=None, help="default: <model>_pretrained or <model>_scratch")
    g.add_argument("--checkpoint-dir", default="checkpoints")
    g.add_argument("--log-dir", default="logs")
    g.add_argument("--resume", default=None, help="continue from this checkpoint (its flags are kept)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the flags typed on the command line (abbreviations are off, so this is exact)."""
    by_option = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    return {by_option[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in by_option}


def check_args(args: argparse.Namespace) -> None:
    rules = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (args.momentum >= 0, "--momentum must not be negative"),
        (args.weight_decay >= 0, "--weight-decay must not be negative"),
        (args.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must lie in [0, 1)"),
        (0 < args.test_fraction < 1, "--test-fraction must lie between 0 and 1"),
        (0 <= args.val_fraction < 1, "--val-fraction must lie in [0, 1)"),
        (args.image_size is None or args.image_size >= 32, "--image-size must be at least 32"),
        (args.workers is None or args.workers >= 0, "--workers must not be negative"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def resolve_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    if args.resume is None:
        return args
    checkpoint = Path(args.resume)
    if not checkpoint.is_file():
        raise UserError(f"--resume {checkpoint}: no such file (a missing checkpoint is never a fresh start)")
    saved = load_checkpoint(checkpoint)["config"]
    typed = explicit_flags(parser, argv)
    changed = sorted(d for d in typed - RESUME_OVERRIDES if getattr(args, d) != saved.get(d))
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} differs from the checkpoint's ({saved.get(changed[0])}); a resumed run keeps its "
                        f"flags except {', '.join('--' + f for f in sorted(RESUME_OVERRIDES - {'resume'}))}")
    merged = dict(saved)
    merged.update({d: getattr(args, d) for d in typed & RESUME_OVERRIDES}, resume=args.resume)
    return argparse.Namespace(**merged)


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """One of our checkpoints, read with weights_only=True: a file whose pickle would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "forbidden object"
        raise UserError(f"refused {path}: it holds pickled objects that are not plain tensors and data, "
                        f"which could run code on loading ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file "
                        f"({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model", "arch", "config"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this project (expected the keys model, arch, config)")
    return checkpoint


def save_atomic(obj: dict, path: Path) -> None:
    """Temporary file in the same folder, fsync, os.replace: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def rng_states() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(mt), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- processes and devices
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda: CUDA when asked for or present; asked for and absent is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def setup(args) -> tuple[Dist, torch.device]:
    """Processes, device and backends, decided once. torchrun's env vars switch on DDP."""
    env = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
               int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    device = choose_device(args.device, env.local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if env.active:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return env, device


def precision(args, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 loss scaling is needed)."""
    amp = args.amp if args.amp is not None else device.type == "cuda"
    if not amp:
        return None, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, True  # pre-Ampere GPUs: fp16 needs loss scaling
    return torch.bfloat16, False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current batch, then stop with the last good checkpoint in place."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def install(self) -> None:
        """From here on a signal stops training at the next batch. Installed when training starts,
        after every pool of worker processes (the demo set's) has been started and ended."""
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        if self.signum:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, env: Dist, device: torch.device) -> bool:
        if not env.active:
            return bool(self.signum)
        # ranks can receive the signal a batch apart: agree, or DDP's next all-reduce would hang
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item())
        return bool(self.signum)


class Stopped(Exception):
    def __init__(self, epoch: int, batch: int, batches: int):
        self.epoch, self.batch, self.batches = epoch, batch, batches


class Diverged(Exception):
    pass


# --------------------------------------------------------------------------- building blocks
def build_model(args, env: Dist, log) -> tuple[nn.Module, str | None]:
    if not (args.pretrained or args.weights):
        torch.manual_seed(args.seed)
        return models.build_model(args.model, data.NUM_GRADES, args.zero_init_residual), None
    if env.active and not env.main:
        dist.barrier()  # rank 0 downloads into the hub cache first
    torch.manual_seed(args.seed)  # the new fc head is the same on every rank and every run
    model, source = models.load_pretrained(args.model, data.NUM_GRADES, args.weights, args.zero_init_residual,
                                           progress=env.main)
    if env.active and env.main:
        dist.barrier()
    log(f"ImageNet weights: {source}")
    return model, source


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up from 1/100, then cosine decay to 0 (or constant), per optimiser step."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(args, optimizer, steps_per_epoch: int):
    warmup = round(args.warmup_epochs * steps_per_epoch)
    total = args.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, args.schedule))


def build_criterion(args, train_grades: np.ndarray, device) -> nn.Module:
    weight = None
    if args.class_weighted:
        counts = data.class_counts(train_grades).astype(np.float64)
        weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                              device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def progress(iterable, total: int, desc: str, enabled: bool):
    # disable=None: tqdm stays quiet when stderr is not a terminal (CI, logs, nohup)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


# --------------------------------------------------------------------------- one epoch
def train_one_epoch(model, loader, transform, criterion, optimizer, scheduler, scaler, ctx, device,
                    epoch: int, args, env: Dist, stop: StopRequest, aug_gen, show: bool) -> dict:
    model.train()
    loader.sampler.set_epoch(epoch)
    aug_gen.manual_seed(args.seed * 1_000_003 + epoch * 1009 + env.rank)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    skipped = torch.zeros((), device=device, dtype=torch.int64)
    bad_batch = torch.full((), -1, device=device, dtype=torch.int64)
    accum, batches = args.grad_accum_steps, len(loader)
    start = time.perf_counter()
    bar = progress(loader, batches, f"epoch {epoch} train", show)
    for i, (images, grades) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        grades = grades.to(device, non_blocking=True)
        if args.skip_bad_images:
            keep = grades >= 0
            skipped += (~keep).sum()
            images, grades = images[keep], grades[keep]
        x = transform(images, aug_gen)
        step_now = (i + 1) % accum == 0 or i + 1 == batches
        sync = contextlib.nullcontext() if step_now or not env.active else model.no_sync()
        with sync:
            with ctx:
                logits = model(x)
                loss = criterion(logits, grades)
            scaler.scale(loss / accum).backward()
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        bad_batch = torch.where((bad_batch < 0) & ~torch.isfinite(loss.detach()), i + 1, bad_batch)
        loss_sum += loss.detach().double() * len(grades)
        correct += (logits.argmax(1) == grades).sum()
        seen += len(grades)
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == batches:
            if bad_batch.item() >= 0:
                raise Diverged(f"the loss became non-finite in epoch {epoch}, batch {bad_batch.item()} of {batches}; "
                               f"lower --lr (now {args.lr}) or check the data")
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, seen.item()):.3f}", refresh=False)
        if stop.requested(env, device):
            raise Stopped(epoch, i + 1, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct.double(), seen.double(), skipped.double()])
    if env.active:
        dist.all_reduce(totals)
    loss_total, correct_total, seen_total, skipped_total = totals.tolist()
    return {"loss": loss_total / max(1, seen_total), "acc": correct_total / max(1, seen_total),
            "seconds": seconds, "images_per_s": seen_total / seconds, "skipped": int(skipped_total),
            "lr": optimizer.param_groups[0]["lr"]}


@torch.inference_mode()
def softmax_over_views(model, x: torch.Tensor, ctx, tta: bool) -> torch.Tensor:
    """Class probabilities of a normalised batch; with tta, averaged over its 8 flips and quarter turns."""
    views = data.dihedral_views(x) if tta else [x]
    with ctx:
        return torch.stack([F.softmax(model(v).float(), dim=1) for v in views]).mean(0)


@torch.inference_mode()
def predict(model, loader, transform, device, ctx, tta: bool = False, desc: str = "test",
            show: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [N, 5] float32, grades [N]) of this rank's shard, on the CPU. With tta, the
    softmax is averaged over the 8 flips and quarter turns of each image."""
    model.eval()
    log_probs, grades = [], []
    for images, batch_grades in progress(loader, len(loader), desc, show):
        probs = softmax_over_views(model, transform(images.to(device, non_blocking=True)), ctx, tta)
        log_probs.append(probs.clamp_min(1e-12).log().cpu())
        grades.append(batch_grades)
    return torch.cat(log_probs), torch.cat(grades)


def gather_shards(tensor: torch.Tensor, env: Dist) -> torch.Tensor:
    """Undo ShardSampler's rank::world interleaving over all ranks."""
    if not env.active:
        return tensor
    shards = [None] * env.world
    dist.all_gather_object(shards, tensor)
    total = sum(len(s) for s in shards)
    out = torch.empty((total, *tensor.shape[1:]), dtype=tensor.dtype)
    for rank, shard in enumerate(shards):
        out[rank::env.world] = shard
    return out


def evaluate_split(model, loader, transform, device, ctx, env: Dist, desc: str, show: bool) -> dict:
    from sklearn.metrics import cohen_kappa_score

    log_probs, grades = predict(model, loader, transform, device, ctx, desc=desc, show=show)
    log_probs, grades = gather_shards(log_probs, env), gather_shards(grades, env)
    keep = grades >= 0  # unreadable images skipped with --skip-bad-images
    log_probs, grades = log_probs[keep], grades[keep]
    preds = log_probs.argmax(1)
    kappa = cohen_kappa_score(grades.numpy(), preds.numpy(), weights="quadratic", labels=range(data.NUM_GRADES))
    return {"loss": F.nll_loss(log_probs, grades).item(), "acc": (preds == grades).double().mean().item(),
            "kappa": 0.0 if math.isnan(kappa) else float(kappa), "skipped": int((~keep).sum())}


# --------------------------------------------------------------------------- logs
def environment(device: torch.device, env: Dist) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cuda": torch.version.cuda if device.type == "cuda" else None, "world_size": env.world,
            "cpus": os.cpu_count(), "git_commit": commit, "host": platform.node()}


def write_logs(log_dir: Path, run_name: str, history: list[dict], summary: dict) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(history)
    csv_tmp, json_tmp = log_dir / f".{run_name}.csv.tmp", log_dir / f".{run_name}.json.tmp"
    frame.to_csv(csv_tmp, index=False, float_format="%.6g")
    json_tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(csv_tmp, log_dir / f"{run_name}.csv")
    os.replace(json_tmp, log_dir / f"{run_name}.json")


def epoch_line(row: dict, epochs: int, best: bool) -> str:
    val = f" | val acc {row['val_acc']:6.2%}" if "val_acc" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%} | "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2%} kappa {row['test_kappa']:.3f}{val} | "
            f"lr {row['lr']:.2e} | {row['seconds']:.1f}s {row['images_per_s']:.1f} img/s" + (" | best" if best else ""))


def write_epoch(checkpoint: dict, is_best: bool, run_dir: Path, log_dir: Path, env_info: dict) -> None:
    """last.pt (and best.pt), then the CSV and JSON logs, each replaced atomically."""
    save_atomic(checkpoint, run_dir / "last.pt")
    if is_best:
        copy_atomic(run_dir / "last.pt", run_dir / "best.pt")
    config, history = checkpoint["config"], checkpoint["history"]
    summary = {"run_name": config["run_name"], "arch": checkpoint["arch"], "pretrained": is_pretrained(config),
               "config": config, "data": checkpoint["data"], "environment": env_info,
               "epochs_done": checkpoint["epoch"], "best_epoch": checkpoint["best_epoch"],
               "best_metric": checkpoint["best_metric"], "best_metric_name": checkpoint["best_metric_name"],
               "best": history[checkpoint["best_epoch"] - 1], "last": history[-1], "checkpoint_dir": str(run_dir)}
    write_logs(log_dir, config["run_name"], history, summary)


def is_pretrained(config: dict) -> bool:
    return bool(config.get("pretrained") or config.get("weights"))


# --------------------------------------------------------------------------- the run
@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = resolve_args(argv)
    env, device = setup(args)
    # flush: epoch lines must reach a log file or `| tee` as they happen, not when a buffer fills
    log = functools.partial(print, flush=True) if env.main else (lambda *a, **k: None)
    stop = StopRequest()
    try:
        run(args, env, device, stop, log)
    except Stopped as s:
        last = Path(args.checkpoint_dir) / args.run_name / "last.pt"
        held = f"{last} holds epoch {s.epoch - 1}" if last.is_file() else "no epoch had finished, so no checkpoint"
        log(f"stopped during epoch {s.epoch} (batch {s.batch} of {s.batches}); {held}"
            + (f"; resume with: python train.py --resume {last}" if last.is_file() else ""))
        sys.exit(128 + stop.signum)
    except Diverged as err:
        log(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        stop.restore()
        if env.active and dist.is_initialized():
            dist.destroy_process_group()


def run(args, env: Dist, device: torch.device, stop: StopRequest, log) -> None:
    fundus = data.load_fundus_data(args.data_root, args.image_dir, args.test_fraction, args.val_fraction,
                                   args.split_seed, log=log)
    if args.image_size is None:
        args.image_size = fundus.image_size() if fundus.layout == "demo" else 512
    if args.run_name is None:
        args.run_name = f"{args.model}_{'pretrained' if is_pretrained(vars(args)) else 'scratch'}"
    amp_dtype, fp16_scaling = precision(args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    workers = args.workers if args.workers is not None else data.default_workers(env.local_world)
    counts = data.class_counts(fundus.train.grades)
    log(f"data: {fundus.layout} layout at {fundus.root} | train {len(fundus.train)} test {len(fundus.test)}"
        + (f" val {len(fundus.val)}" if fundus.val else "")
        + f" | train grades {counts.tolist()} | {args.image_size}px")

    raw_model, weight_source = build_model(args, env, log)
    raw_model.to(device, memory_format=memory_format)
    # Evaluation runs on the bare model: DDP's forward would broadcast buffers, a collective call
    # that hangs when ranks hold evaluation shards of different lengths.
    model, eval_model = raw_model, torch.compile(raw_model) if args.compile else raw_model
    if env.active:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model) if env.active else eval_model

    def loader(table, train: bool):
        dataset = data.FundusDataset(table, args.image_size, args.skip_bad_images)
        sampler = (data.train_sampler(table.grades, args.sampler, env.world, env.rank, args.seed) if train
                   else data.ShardSampler(len(table), env.world, env.rank))
        batch = args.batch_size if train else 2 * args.batch_size
        return data.build_loader(dataset, batch, sampler, workers, device, drop_last=False)

    train_loader, test_loader = loader(fundus.train, True), loader(fundus.test, False)
    val_loader = loader(fundus.val, False) if fundus.val else None
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    optimizer = build_optimizer(args, raw_model)
    scheduler = build_scheduler(args, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16_scaling)
    criterion = build_criterion(args, fundus.train.grades, device)
    train_transform = data.BatchTransform(device, augment=not args.no_augment, channels_last=args.channels_last)
    eval_transform = data.BatchTransform(device, augment=False, channels_last=args.channels_last)
    aug_gen = torch.Generator(device=device)
    ctx = autocast(device, amp_dtype)

    history, best_metric, best_epoch, start_epoch = [], -1.0, 0, 1
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_states(checkpoint["rng"])
        history, best_metric = checkpoint["history"], checkpoint["best_metric"]
        best_epoch, start_epoch = checkpoint["best_epoch"], checkpoint["epoch"] + 1
        weight_source = checkpoint.get("pretrained_source")
        log(f"resumed {args.resume} at epoch {checkpoint['epoch']} (best {best_metric:.2%} at epoch {best_epoch})")
    if start_epoch > args.epochs:
        log(f"nothing to do: the checkpoint already holds epoch {start_epoch - 1} of --epochs {args.epochs}")
        return

    run_dir, log_dir = Path(args.checkpoint_dir) / args.run_name, Path(args.log_dir)
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    select = "val_acc" if val_loader else "test_acc"
    show = env.main and not args.quiet
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    data_info = {"layout": fundus.layout, "root": str(fundus.root), "image_dir": str(fundus.image_dir),
                 "train_counts": counts.tolist(), "prepare": fundus.prepare_options()}
    env_info = environment(device, env)
    log(f"run {args.run_name}: {args.model} on {env_info['device']} x{env.world} | "
        f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'} | "
        f"{'channels_last' if args.channels_last else 'NCHW'} | batch {args.batch_size}x{env.world}"
        f"x{args.grad_accum_steps} | {workers} workers")

    stop.install()
    for epoch in range(start_epoch, args.epochs + 1):
        train_stats = train_one_epoch(model, train_loader, train_transform, criterion, optimizer, scheduler, scaler,
                                      ctx, device, epoch, args, env, stop, aug_gen, show)
        if env.active:
            # each rank's last forward updated its own BN statistics: evaluate with rank 0's, the ones saved
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, 0)
        test_stats = evaluate_split(eval_model, test_loader, eval_transform, device, ctx, env, "test", show)
        row = {"epoch": epoch, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
               "test_loss": test_stats["loss"], "test_acc": test_stats["acc"], "test_kappa": test_stats["kappa"],
               "lr": train_stats["lr"], "seconds": train_stats["seconds"],
               "images_per_s": train_stats["images_per_s"]}
        if val_loader:
            val_stats = evaluate_split(eval_model, val_loader, eval_transform, device, ctx, env, "val", show)
            row.update(val_loss=val_stats["loss"], val_acc=val_stats["acc"], val_kappa=val_stats["kappa"])
        history.append(row)
        is_best = row[select] > best_metric
        if is_best:
            best_metric, best_epoch = row[select], epoch
        log(epoch_line(row, args.epochs, is_best))
        if train_stats["skipped"] or test_stats["skipped"]:
            log(f"skipped unreadable images in epoch {epoch} (--skip-bad-images): {train_stats['skipped']} in "
                f"training, {test_stats['skipped']} in the test split")
        if env.main:
            checkpoint = {
                "model": raw_model.state_dict(), "arch": args.model, "num_classes": data.NUM_GRADES,
                "image_size": args.image_size, "epoch": epoch, "best_metric": best_metric,
                "best_epoch": best_epoch, "best_metric_name": select, "config": config, "data": data_info,
                "pretrained_source": weight_source, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
                "history": history,
            }
            write_epoch(checkpoint, is_best, run_dir, log_dir, env_info)
    log(f"done: best {select} {best_metric:.2%} at epoch {best_epoch}; {run_dir}/best.pt, {log_dir}/{args.run_name}.csv")


if __name__ == "__main__":
    main()
