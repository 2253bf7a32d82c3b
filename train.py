"""Train a ResNet to grade diabetic retinopathy, from scratch or from ImageNet weights.

    python train.py --model resnet50 --pretrained
    torchrun --nproc_per_node 4 train.py --model resnet50 --pretrained

Each epoch trains, evaluates on the test split (the lab's curves need it), appends a row to
logs/<run>.csv, rewrites logs/<run>.json and checkpoints/<run>/last.pt (best.pt when the selection
metric improves). `--resume checkpoints/<run>/last.pt` continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

import dataloader
import evaluate
import layouts
import models
import objectives
import optimisation
import twoeye
from optimisation import Stopped
from runtime import (AUC_COLUMN, EXIT_USER_ERROR, LOG_COLUMNS, OUTPUT_KINDS, Parser, UserError, autocast,
                     check_output, check_run_name, checkpoint_digest, choose_device, copy_atomic, input_file, exit_on_user_error, fraction_sentence,
                     is_pretrained, load_checkpoint, make_checkpoint, memory_format, precision, process_alive,
                     remove_leftovers, restore_model, restore_training, run_summary, save_atomic, what_file_is,
                     write_text_atomic)

# The two-eye stage trains a small head on cached features: many more, faster epochs than an image run, and
# an optimiser that needs no tuned learning rate (measured: SGD at the image runs' lr 1e-3 barely moves it).
TWO_EYE_DEFAULTS = {"optimizer": "adamw", "epochs": 30}
# Flags that mean nothing for the two-eye stage (its encoder is trained and frozen, its inputs are features).
TWO_EYE_REFUSED = ("pretrained", "weights", "zero_init_residual", "compile", "grad_accum_steps", "sampler",
                   "image_size", "model", "layout", "test_fraction", "val_fraction", "split_seed")
CPU = torch.device("cpu")
# Flags a resumed run may change; any other flag would make it a different run.
RESUME_OVERRIDES = {"epochs", "workers", "device", "compile", "resume", "quiet", "data_root", "image_dir",
                    "checkpoint_dir", "log_dir"}


# --------------------------------------------------------------------------- command line
def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=list(models.ARCHS), help="architecture")
    g.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    g.add_argument("--weights", default=None,
                   help="weight file to start from: ImageNet's (implies --pretrained), or one of this project's "
                        "checkpoints to fine-tune (its head kept when the objective is the same; the run is named "
                        "<model>_finetuned and records the checkpoint's path and weights digest)")
    g.add_argument("--zero-init-residual", action="store_true", help="zero the last BN of each block")
    g.add_argument("--two-eye", default=None, metavar="CHECKPOINT",
                   help="train the two-eye stage on this single-eye checkpoint: each eye graded from its own and its "
                        "partner's features (<patient>_left/_right), the encoder frozen and its features cached; "
                        "architecture, objective, image size and data are the checkpoint's; defaults then "
                        f"{' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in TWO_EYE_DEFAULTS.items())}")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None,
                   help="dataset folder (default: data/, or the synthetic demo set when data/ holds none)")
    g.add_argument("--image-dir", default=None,
                   help="image folder (default: found: the layout's own folders, images/, beside the table, "
                        "a sub-folder)")
    g.add_argument("--layout", default="auto", choices=["auto", *layouts.NAMES],
                   help="the dataset's layout (auto: recognised from the files in --data-root; see the README, "
                        "Public datasets)")
    g.add_argument("--image-size", type=int, default=None,
                   help="training resolution (default: 512, the demo set's own size on the demo)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out share, grouped by patient, of a dataset that publishes no test split (APTOS, "
                        "Messidor-2, a labels table)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="patient-grouped share of the training split to choose best.pt on (0: the layout's own "
                        "validation split, DDR's valid, else choose on test)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient-grouped splits")
    g.add_argument("--sampler", default="shuffle", choices=["shuffle", "balanced"],
                   help="balanced draws every grade equally often")
    g.add_argument("--no-augment", action="store_true", help="no random flips, rotation, zoom or colour")
    g.add_argument("--workers", type=int, default=None, help="loader processes per GPU (default: CPUs, at most 16)")
    g.add_argument("--skip-bad-images", action="store_true", help="warn and skip undecodable images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", default="ce", choices=list(objectives.OBJECTIVES),
                   help="the objective: ce, cross-entropy over the five grades (the lab's); mse, the grade regressed "
                        "with one output (Huang et al. 2023); ordinal, CORN ordinal regression (Shi et al. 2023)")
    g.add_argument("--select", default="acc", choices=["acc", "kappa"],
                   help="the metric that chooses best.pt, on the validation split when there is one, else on test "
                        "(kappa: what regression and ordinal objectives are chosen for)")
    g.add_argument("--epochs", type=int, default=10, help="epochs (the lab: 10 for ResNet18, 5 for ResNet50)")
    g.add_argument("--batch-size", type=int, default=32, help="images per GPU per step")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="batches summed into one optimiser step")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="SGD with Nesterov's momentum (Huang et al. 2023)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after the warm-up")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up from lr/100")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="with --loss ce")
    g.add_argument("--class-weighted", action="store_true",
                   help="with --loss ce: weight the loss by inverse grade frequency")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (fp16 with loss scaling on GPUs without bf16); default on for CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convolutions on tensor cores and oneDNN")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("output")
    g.add_argument("--run-name", default=None,
                   help="default: <model>_pretrained, <model>_scratch or <model>_finetuned (--weights CHECKPOINT), "
                        "then _mse or _ordinal for those --loss values (resnet50_pretrained_ordinal)")
    g.add_argument("--checkpoint-dir", default="checkpoints")
    g.add_argument("--log-dir", default="logs")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from this checkpoint (its flags are kept); auto: from this run's last.pt when "
                        "it exists, else start fresh (for preemptible jobs and torchrun --max-restarts)")
    g.add_argument("--overwrite", action="store_true",
                   help="start this run afresh over the checkpoints and logs of an earlier run of the same name")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the flags typed on the command line (abbreviations are off, so this is exact)."""
    by_option = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    return {by_option[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in by_option}


def check_args(args: argparse.Namespace) -> None:
    """One sentence for the first flag out of its range (floats must be finite: argparse takes inf and nan)."""
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "test_fraction",
                 "val_fraction"):
        if not math.isfinite(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, not {getattr(args, name)}")
    rules = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        # BatchNorm normalises a batch by its own mean and variance: one image has none to speak of (and
        # at 1x1 in layer4 none at all: "Expected more than 1 value per channel when training")
        (args.batch_size != 1, "--batch-size 1 cannot train: BatchNorm normalises each batch by its own "
                               "statistics and needs at least 2 images a batch; use 2 or more (32 is usual; "
                               "--grad-accum-steps sums small batches into a larger step)"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (args.momentum >= 0, "--momentum must not be negative"),
        (args.weight_decay >= 0, "--weight-decay must not be negative"),
        (args.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must lie in [0, 1)"),
        (0 < args.test_fraction < 1, fraction_sentence("--test-fraction", args.test_fraction)),
        (0 <= args.val_fraction < 1, "--val-fraction must lie in [0, 1)"),
        (args.image_size is None or args.image_size >= 32, "--image-size must be at least 32"),
        (args.workers is None or args.workers >= 0, "--workers must not be negative"),
        (not (args.overwrite and args.resume), "--overwrite starts a run afresh; it cannot go with --resume"),
        # a regression's target is the grade itself and CORN's are yes/no questions: there is no class
        # distribution to smooth, and no class loss to weight
        (args.loss == "ce" or not args.class_weighted, f"--class-weighted weighs cross-entropy's classes; --loss "
                                                       f"{args.loss} has none (use --sampler balanced to see rare "
                                                       "grades more often)"),
        (args.loss == "ce" or args.label_smoothing == 0, f"--label-smoothing smooths cross-entropy's target "
                                                         f"distribution; --loss {args.loss} has none"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    if args.run_name is not None:
        check_run_name(args.run_name)


def check_nesterov(args: argparse.Namespace) -> None:
    """--nesterov is SGD's (checked once a two-eye run has taken its encoder's flags and its default optimizer,
    adamw)."""
    if args.nesterov and args.optimizer != "sgd":
        raise UserError(f"--nesterov is a kind of SGD momentum; it cannot go with --optimizer {args.optimizer}"
                        + (" (the two-eye stage's default; add --optimizer sgd)" if args.two_eye else ""))
    if args.nesterov and args.momentum <= 0:
        raise UserError("--nesterov needs a momentum: --momentum 0 leaves none")


def resolve_args(argv: list[str]) -> tuple[argparse.Namespace, dict | None]:
    """The run's flags with every default filled in that the command line decides (the run name; with
    --resume auto, whether there is a checkpoint to go on from), and the checkpoint resumed from, if any.
    A resumed run's flags are the checkpoint's, changed only where RESUME_OVERRIDES allows."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    if args.two_eye and args.resume in (None, "auto"):
        args = with_encoder(args, explicit_flags(parser, argv), parser)
    check_nesterov(args)
    started_from = weights_origin(args.weights) if args.weights and Path(args.weights).exists() else None
    kind = "finetuned" if started_from else "pretrained" if is_pretrained(vars(args)) else "scratch"
    objective = "" if args.loss == "ce" else f"_{args.loss}"  # the lab's run keeps the lab's name
    args = argparse.Namespace(**{**vars(args), "run_name": args.run_name or f"{args.model}_{kind}{objective}",
                                 "started_from": started_from})
    if args.resume == "auto":
        last = Path(args.checkpoint_dir) / args.run_name / "last.pt"
        args.resume = str(last) if last.is_file() else None
    if args.resume is None:
        return args, None
    if not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume} does not exist (a missing checkpoint is never a fresh start; "
                        "--resume auto starts afresh when the run has none)")
    checkpoint = load_checkpoint(args.resume, "--resume")
    saved = checkpoint["config"]
    typed = explicit_flags(parser, argv)
    changed = sorted(d for d in typed - RESUME_OVERRIDES if getattr(args, d) != saved.get(d))
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(f"{flag} differs from the checkpoint's ({saved.get(changed[0])}); a resumed run keeps its "
                        f"flags except {', '.join(sorted('--' + f.replace('_', '-') for f in RESUME_OVERRIDES - {'resume'}))}")
    # a checkpoint from before a flag existed ran with that flag's default (--loss ce, --select acc)
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    merged = {**defaults, **saved, **{d: getattr(args, d) for d in typed & RESUME_OVERRIDES}, "resume": args.resume}
    # the data is where the checkpoint recorded it (absolute folders), unless typed: then it has moved
    merged.update({d: getattr(args, d) if d in typed else None for d in ("data_root", "image_dir")})
    base = run_base(Path(args.resume), saved)
    merged.update({d: str(base / saved[d]) for d in ("checkpoint_dir", "log_dir") if d not in typed})
    return argparse.Namespace(**merged), checkpoint


def with_encoder(args: argparse.Namespace, typed: set, parser) -> argparse.Namespace:
    """A two-eye run's flags: architecture, objective and image size the encoder's (typed otherwise: refused),
    TWO_EYE_DEFAULTS where not typed, and the run named <encoder run>_two_eye."""
    refused = sorted(d for d in typed & set(TWO_EYE_REFUSED) if getattr(args, d) != parser.get_default(d))
    if refused:
        flag = "--" + refused[0].replace("_", "-")
        raise UserError(f"{flag} cannot go with --two-eye: the two-eye stage takes the architecture, weights, size "
                        "and data splits of its encoder checkpoint and trains a small head on its cached features")
    path = input_file("--two-eye", args.two_eye)
    encoder = load_checkpoint(path, "--two-eye")
    twoeye.check_encoder(encoder, path)
    objective = objectives.of(encoder)
    if "loss" in typed and args.loss != objective.name:
        raise UserError(f"--loss {args.loss} differs from the encoder's objective ({objective.name}, {path}): the "
                        "two-eye stage refines the encoder's own head; leave --loss out or train an encoder with it")
    config = encoder["config"]
    merged = {**vars(args), "model": encoder["arch"], "loss": objective.name, "image_size": encoder["image_size"],
              "pretrained": is_pretrained(config), "two_eye": str(path.absolute()),
              **{k: v for k, v in TWO_EYE_DEFAULTS.items() if k not in typed},
              **{k: config.get(k, parser.get_default(k)) for k in ("layout", "test_fraction", "val_fraction",
                                                                    "split_seed", "channels_last", "amp")
                 if k not in typed}}
    merged["run_name"] = args.run_name or f"{config.get('run_name') or path.parent.name}_two_eye"
    return argparse.Namespace(**merged)


def run_base(checkpoint: Path, config: dict) -> Path:
    """The folder a resumed run's relative --checkpoint-dir and --log-dir lie in: where it started, found
    again from where its checkpoint lies (<base>/checkpoints/<run>/last.pt), so that a resume from another
    working folder, or of a project moved elsewhere, writes beside its checkpoint; else the working folder."""
    tail = Path(config["checkpoint_dir"]) / config["run_name"]
    folder = checkpoint.absolute().parent
    if not tail.is_absolute() and folder.parts[-len(tail.parts):] == tail.parts:
        return Path(*folder.parts[:-len(tail.parts)])
    return Path.cwd()


def with_image_size(args: argparse.Namespace, fundus: dataloader.FundusData) -> argparse.Namespace:
    """--image-size's default: 512, the lab's, or the demo set's own size on the demo set."""
    if args.image_size is not None:
        return args
    size = fundus.image_size() if fundus.layout == "demo" else 512
    return argparse.Namespace(**{**vars(args), "image_size": size})


# --------------------------------------------------------------------------- processes and devices
@dataclass
class Dist:
    """This process's place among torchrun's: rank and world size, globally and on this machine."""

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
        store = restart_store(env)
        where = {"store": store, "rank": env.rank, "world_size": env.world} if store else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None, **where)
    return env, device


def restart_store(env: Dist):
    """The key-value store the ranks meet in, set apart per torchrun restart; None: torch's own.

    torchrun shares its rendezvous store with the workers and keeps it across restarts, under the same
    keys: after `--max-restarts` restarted the job, ranks read each other's addresses of the previous
    attempt and gloo failed with 'Connection refused' in 7 of 12 trials here (pytorch/pytorch#135712).
    A prefix per attempt gives every attempt keys of its own (6 of 6 restarts went through)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world, is_master=False)
    return dist.PrefixStore(f"retina/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current batch, then stop with the last good checkpoint in place.

    Called by train_one_epoch after every batch. Alone, a signal stops at the next batch; under DDP the
    ranks agree (an all-reduce) only at the batches where they sync anyway, since a rank that stopped
    alone would leave the others waiting in their next all-reduce."""

    def __init__(self, env: Dist, device: torch.device):
        self.env, self.device = env, device
        self.signum = 0
        self.agreed = False  # under DDP: every rank has seen a stop request
        self.previous = {}

    def install(self) -> None:
        """From here on a signal stops training. Installed when training starts, after every pool of
        worker processes (the demo set's) has been started and ended."""
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        if self.signum:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self, sync: bool) -> bool:
        if not self.env.active:
            return bool(self.signum)
        if sync:
            flag = torch.tensor([self.signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = self.signum or int(flag.item())
            self.agreed = bool(flag.item())
        return self.agreed


# --------------------------------------------------------------------------- building blocks
def weights_origin(path) -> dict | None:
    """What --weights starts from when it is one of this project's checkpoints (fine-tuning a trained grader,
    on a clinic's camera say): its path, run, epoch, objective and the digests of the weights taken from it
    (weights_digest, the `model` a run starts from) and of the checkpoint (runtime.checkpoint_digest, what its
    evaluations are tied to); None for an ImageNet file (a plain state_dict). Kept in the run's config, so its
    checkpoint and logs/<run>.json say what it started from."""
    from runtime import read_torch_file, weights_digest

    state = read_torch_file("--weights", path)
    if not (isinstance(state, dict) and {"model", "arch", "config"} <= set(state)
            and isinstance(state["model"], dict)):
        return None
    return {"kind": "checkpoint", "path": str(Path(path).absolute()), "run_name": state["config"].get("run_name"),
            "arch": state["arch"], "epoch": state.get("epoch"), "objective": objectives.of(state).name,
            "two_eye": twoeye.is_two_eye(state), "weights_digest": weights_digest(state["model"]),
            "checkpoint_digest": checkpoint_digest(state)}


def started_from_text(origin: dict, head_kept: bool | None) -> str:
    """The log line of a run fine-tuned from one of this project's checkpoints."""
    what = "the encoder of two-eye checkpoint" if origin["two_eye"] else "checkpoint"
    return (f"started from {what} {origin['path']} (run {origin['run_name']}, epoch {origin['epoch']}, weights "
            f"{origin['checkpoint_digest'][:12]}): fine-tuned, not ImageNet weights; "
            + ("resumed" if head_kept is None else "its head kept (same objective)" if head_kept else
               f"a new head (its objective {origin['objective']}, this run's another)"))


def load_own_checkpoint_head(model: nn.Module, args, origin: dict) -> bool:
    """The head (fc) of the checkpoint --weights names, into `model` (models.load_pretrained leaves fc new),
    when its objective is this run's; then every weight is the checkpoint's, checked against the digest taken
    when the run was named (the file unchanged since). Returns whether the head was kept."""
    from runtime import weights_digest

    if origin["objective"] != objectives.get(args.loss).name:
        return False
    state = models._load_weight_file(Path(args.weights), "--weights")
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("fc.")}, strict=False)
    if weights_digest(model.state_dict()) != origin["weights_digest"]:
        raise UserError(f"--weights {args.weights} changed while this run read it (its weights digest differs "
                        "from the one read a moment before); run again when nothing writes it")
    return True


def build_model(args, env: Dist, log) -> tuple[nn.Module, str | None]:
    if not (args.pretrained or args.weights):
        torch.manual_seed(args.seed)
        return models.build_model(args.model, objectives.get(args.loss).outputs, args.zero_init_residual), None
    if env.active and not env.main:
        dist.barrier()  # rank 0 downloads into the hub cache first
    torch.manual_seed(args.seed)  # the new fc head is the same on every rank and every run
    model, source = models.load_pretrained(args.model, objectives.get(args.loss).outputs, args.weights,
                                           args.zero_init_residual,
                                           progress=env.main)
    if env.active and env.main:
        dist.barrier()
    origin = getattr(args, "started_from", None)
    if origin:  # a resumed run takes every weight from the checkpoint it resumes, whatever --weights holds now
        log(started_from_text(origin, None if args.resume else load_own_checkpoint_head(model, args, origin)))
    else:
        log(f"ImageNet weights: {source}")
    return model, source


def build_loaders(args, fundus: dataloader.FundusData, env: Dist, device: torch.device) -> dict:
    """DataLoaders of the splits: train (shuffled or balanced, distributed), test and val (sharded)."""
    workers = args.workers if args.workers is not None else dataloader.default_workers(env.local_world)

    def loader(table, train: bool):
        dataset = dataloader.FundusDataset(table, args.image_size, args.skip_bad_images,
                                           advice=dataloader.TRAINING_ADVICE)
        sampler = (dataloader.train_sampler(table.grades, args.sampler, env.world, env.rank, args.seed) if train
                   else dataloader.ShardSampler(len(table), env.world, env.rank))
        batch = args.batch_size if train else 2 * args.batch_size
        return dataloader.build_loader(dataset, batch, sampler, workers, device, train=train)

    loaders = {"train": loader(fundus.train, True), "test": loader(fundus.test, False)}
    if fundus.val:
        loaders["val"] = loader(fundus.val, False)
    return loaders


@dataclass
class Training:
    """Everything a run trains with, built once from the flags."""

    raw_model: nn.Module  # the weights, saved in checkpoints and used for evaluation
    model: nn.Module  # what the training step calls: DDP- and/or compile-wrapped raw_model
    eval_model: nn.Module
    loaders: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_transform: dataloader.BatchTransform
    eval_transform: dataloader.BatchTransform
    autocast_ctx: object
    amp_dtype: torch.dtype | None
    pretrained_source: str | None
    select: str = "acc"  # --select: the metric that chooses best.pt


def build_training(args, fundus: dataloader.FundusData, env: Dist, device: torch.device, log) -> Training:
    amp_dtype, fp16_scaling = precision(args.amp, device)
    raw_model, source = build_model(args, env, log)
    raw_model.to(device, memory_format=memory_format(args.channels_last))
    # Evaluation runs on the bare model: DDP's forward would broadcast buffers, a collective call
    # that hangs when ranks hold evaluation shards of different lengths.
    model, eval_model = raw_model, torch.compile(raw_model) if args.compile else raw_model
    if env.active:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model) if env.active else eval_model
    loaders = build_loaders(args, fundus, env, device)
    optimizer = optimisation.build_optimizer(args.optimizer, raw_model, args.lr, args.momentum, args.weight_decay,
                                           args.nesterov)
    steps_per_epoch = math.ceil(len(loaders["train"]) / args.grad_accum_steps)
    return Training(
        raw_model, model, eval_model, loaders, optimizer,
        optimisation.build_scheduler(optimizer, args.schedule, args.warmup_epochs, args.epochs, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=fp16_scaling),
        optimisation.build_criterion(fundus.train.grades, args.class_weighted, args.label_smoothing, device,
                                     objectives.get(args.loss)),
        dataloader.BatchTransform(device, augment=not args.no_augment, channels_last=args.channels_last),
        dataloader.BatchTransform(device, augment=False, channels_last=args.channels_last),
        autocast(device, amp_dtype), amp_dtype, source, args.select)


@dataclass
class Progress:
    """Where a run stands between epochs: what a checkpoint restores."""

    history: list = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = 0
    epochs_done: int = 0
    best_weights_digest: str | None = None  # runtime.weights_digest of best.pt: evaluations are matched to it


def resume(args, checkpoint: dict, training: Training, log) -> Progress:
    """The checkpoint's weights, optimiser, schedule, scaler and RNG states into `training`."""
    restore_model(training.raw_model, checkpoint, args.resume)
    restore_training(checkpoint, training.optimizer, training.scheduler, training.scaler)
    training.pretrained_source = checkpoint.get("pretrained_source")
    done = Progress(checkpoint["history"], checkpoint["best_metric"], checkpoint["best_epoch"], checkpoint["epoch"],
                    checkpoint.get("best_weights_digest"))
    log(f"resumed {args.resume} at epoch {done.epochs_done} (best {metric_text(checkpoint.get('best_metric_name'), done.best_metric)} "
        f"at epoch {done.best_epoch})")
    return done


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


def epoch_line(row: dict, epochs: int, best: bool) -> str:
    val = f" | val acc {row['val_acc']:6.2%} kappa {row['val_kappa']:.3f}" if "val_acc" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%} | "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2%} kappa {row['test_kappa']:.3f}{val} | "
            f"lr {row['lr']:.2e} | {row['seconds']:.1f}s {row['images_per_s']:.1f} img/s" + (" | best" if best else ""))


def write_epoch(checkpoint: dict, is_best: bool, run_dir: Path, log_dir: Path, env_info: dict,
                write_last: bool = True) -> None:
    """last.pt, then best.pt (a copy of it, when the epoch is the best), then the CSV and JSON logs, each
    replaced atomically. In this order a crash at any instant leaves the logs naming a best epoch that
    best.pt holds; last.pt may be ahead of both, and a resume from it brings them level (repair_outputs)."""
    if write_last:
        save_atomic(checkpoint, run_dir / "last.pt")
    if is_best:
        if write_last:
            copy_atomic(run_dir / "last.pt", run_dir / "best.pt")
        else:
            save_atomic(checkpoint, run_dir / "best.pt")
    run_name = checkpoint["config"]["run_name"]
    log_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(checkpoint["history"])
    write_text_atomic(log_dir / f"{run_name}.csv", frame.to_csv(index=False, float_format="%.6g"))
    summary = run_summary(checkpoint, env_info, run_dir)
    write_text_atomic(log_dir / f"{run_name}.json", json.dumps(summary, indent=2, default=str))


# --------------------------------------------------------------------------- the run folder
class RunLock:
    """checkpoints/<run>/.lock holds "<pid> <host>" while a train.py writes that run: a second one
    refuses to start. The lock of a process that died (SIGKILL, a node lost) is stale: its pid no
    longer runs on this host, and the next run takes it over (torchrun restarts rely on that)."""

    def __init__(self, run_dir: Path):
        self.path, self.held = run_dir / ".lock", False
        self.created = None  # the outermost folder acquire() created, removed again if left empty

    def acquire(self, run_name: str) -> None:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                with open(self.path, "x") as f:
                    f.write(mine + "\n")
            except FileExistsError:
                owner = self.path.read_text().split() if self.path.is_file() else []
                if owner and alive(owner):
                    raise UserError(f"run {run_name} is being trained by another train.py (pid {owner[0]} on "
                                    f"{owner[1] if len(owner) > 1 else 'this host'}, {self.path}); wait for it to "
                                    "end or choose another --run-name") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            self.held = self.path.read_text().strip() == mine  # another taking over at the same moment wins
            if self.held:
                return
        raise UserError(f"could not take the lock {self.path}; delete it if no train.py is writing this run")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        folder = self.path.parent  # a run refused before it wrote anything leaves no empty folders behind
        while self.created is not None and folder != self.created.parent:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote something
                break
            folder = folder.parent


def alive(owner: list[str]) -> bool:
    """Whether the process named in a lock may still run: on another host it can't be checked, so yes."""
    if len(owner) > 1 and owner[1] != socket.gethostname():
        return True
    return owner[0].isdigit() and process_alive(int(owner[0]))


def claim_run(args, resumed: dict | None) -> RunLock:
    """Before any work: the output folders writable, the run folder locked against a second train.py,
    an earlier run of the same name never overwritten unless asked (--overwrite), and the temporary
    files of a killed run removed. Rank 0 only; the others learn the outcome from it."""
    check_output("--checkpoint-dir", args.checkpoint_dir, folder=True)
    check_output("--log-dir", args.log_dir, folder=True)
    run_dir, log_dir = Path(args.checkpoint_dir) / args.run_name, Path(args.log_dir)
    logs = run_logs(log_dir, args.run_name)
    lock = RunLock(run_dir)
    lock.acquire(args.run_name)
    earlier = [run_dir / name for name in ("last.pt", "best.pt") if (run_dir / name).is_file()]
    if earlier and resumed is None:
        if not args.overwrite:
            lock.release()
            raise UserError(f"{run_dir} already holds a checkpoint of run {args.run_name}; continue it with "
                            f"--resume {shlex.quote(str(run_dir / 'last.pt'))} (or --resume auto), start another "
                            "with --run-name NAME, or replace it with --overwrite")
        for path in earlier + logs + evaluations_of(log_dir, args.run_name):
            path.unlink(missing_ok=True)
    for name in ("last.pt", "best.pt"):
        remove_leftovers(run_dir, name)
    for name in (f"{args.run_name}.csv", f"{args.run_name}.json"):
        remove_leftovers(log_dir, name)
    return lock


def run_logs(log_dir: Path, run_name: str) -> list[Path]:
    """<run>.csv and <run>.json, which --overwrite replaces; refused when either is another kind of file (a
    table the user keeps in the log folder under the run's name), so that nothing else is lost."""
    logs = [log_dir / f"{run_name}.csv", log_dir / f"{run_name}.json"]
    for path, kind in zip(logs, ("a run's per-epoch log of train.py", "a run's summary of train.py")):
        if path.is_file() and not OUTPUT_KINDS[kind](path):
            raise UserError(f"{path} is {what_file_is(path)}, not {kind}; --overwrite replaces only a run's own "
                            "files: move it away or choose another --run-name")
    return logs


def evaluations_of(log_dir: Path, run_name: str) -> list[Path]:
    """The evaluations of an earlier run of this name in the log folder, which --overwrite removes with it:
    every *_eval.json that names the run, the predictions files it lists there, and the run's Grad-CAM
    samples. Left in place, plot.py would join their numbers to the new run's (it refuses them, as stale, but
    the old numbers would still be all the folder holds)."""
    found = []
    for path in sorted(log_dir.glob("*_eval.json")) if log_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("run_name") != run_name:
            continue
        found.append(path)
        for key in ("predictions", "reference_predictions"):
            listed = Path(record.get(key) or "")
            if listed.name and listed.parent.resolve() == log_dir.resolve() and listed.is_file():
                found.append(listed)
    for path in sorted(log_dir.glob("*_cams.npz")) if log_dir.is_dir() else []:
        try:
            with np.load(path) as cams:
                named = str(cams["run_name"]) if "run_name" in cams else None
        except (OSError, ValueError, KeyError):
            continue
        if named == run_name or (named is None and path.name == f"{run_name}_cams.npz"):
            found.append(path)
    return found


def agree_on_claim(args, resumed, env: Dist) -> RunLock | None:
    """claim_run on rank 0, its verdict broadcast: every rank goes on, or every rank stops."""
    lock, error = None, None
    if env.main:
        try:
            lock = claim_run(args, resumed)
        except UserError as err:
            error = str(err)
    if env.active:
        verdict = [error]
        dist.broadcast_object_list(verdict, 0)
        error = verdict[0]
    if error is not None:
        if not env.main:
            sys.exit(EXIT_USER_ERROR)  # rank 0 prints the sentence
        raise UserError(error)
    return lock


def logged_epochs(csv_path: Path) -> int:
    """The epochs logs/<run>.csv holds whole: a row with empty cells (a file cut mid-row) is no epoch; -1
    when the file is missing or unreadable."""
    try:
        history = pd.read_csv(csv_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return -1
    columns = [c for c in LOG_COLUMNS if c in history.columns]
    if len(columns) < len(LOG_COLUMNS):
        return -1
    return int((~history[columns].isna().any(axis=1)).sum())


def repair_outputs(checkpoint: dict, run_dir: Path, log_dir: Path, env_info: dict, log) -> None:
    """A run killed while it wrote an epoch leaves last.pt ahead of best.pt (written second) or of the
    logs (written last); resuming from last.pt brings them level before anything else happens."""
    best, epoch = run_dir / "best.pt", checkpoint["epoch"]
    stale_best = checkpoint["best_epoch"] == epoch and (not best.is_file() or load_checkpoint(best)["epoch"] != epoch)
    summary = log_dir / f"{checkpoint['config']['run_name']}.json"
    stale_logs = (not summary.is_file() or json.loads(summary.read_text()).get("epochs_done") != epoch
                  or logged_epochs(summary.with_suffix(".csv")) != epoch)
    if stale_best or stale_logs:
        log(f"brought {'best.pt and ' if stale_best else ''}the logs level with epoch {epoch} of the checkpoint "
            "(the run had stopped while writing them)")
        write_epoch(checkpoint, stale_best, run_dir, log_dir, env_info, write_last=False)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, resumed = resolve_args(argv)
    env, device = setup(args)
    # flush: epoch lines must reach a log file or `| tee` as they happen, not when a buffer fills
    log = functools.partial(print, flush=True) if env.main else (lambda *a, **k: None)
    stop, lock = StopRequest(env, device), None
    try:
        lock = agree_on_claim(args, resumed, env)
        run(args, resumed, env, device, stop, log)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        if env.active and dist.is_initialized():
            dist.destroy_process_group()


def run(args, resumed: dict | None, env: Dist, device: torch.device, stop: StopRequest, log) -> None:
    """The whole run: data, model and optimiser, a resume if asked for, then the epochs."""
    if args.two_eye:
        return run_two_eye(args, resumed, env, device, stop, log)
    if resumed is None:
        fundus = dataloader.load_fundus_data(args.data_root, args.image_dir, args.test_fraction,
                                             args.val_fraction, args.split_seed, log=log, layout=args.layout)
    else:  # the run's own data, from any working folder
        fundus = dataloader.load_run_data(resumed["config"], resumed.get("data", {}), args.data_root,
                                          args.image_dir, log=log)
    dataloader.check_no_shared_photos(fundus)
    args = with_image_size(args, fundus)
    sizes = " ".join(f"{split} {len(table)}" for split, table in fundus.splits().items())
    counts = dataloader.class_counts(fundus.train.grades).tolist()
    left_out = "".join(f" | left out: {n} {reason}" for reason, n in fundus.excluded_counts().items())
    log(f"data: {fundus.layout} layout at {fundus.root} | {sizes} | train grades {counts}{left_out} | "
        f"{args.image_size}px" + (", raw photos cropped to the eye" if fundus.train.raw_photos else ""))
    for split, table in fundus.splits().items():
        held, referable = sorted(set(table.grades.tolist())), set((table.grades >= 2).tolist())
        if split != "train" and (len(held) == 1 or len(referable) == 1):
            log(f"note: the {split} split holds grade{'s' if len(held) > 1 else ''} {', '.join(map(str, held))} "
                "only: " + ("its kappa is undefined (logged as 0) and " if len(held) == 1 else "")
                + "its referable AUC is undefined without both referable and non-referable photos (logged empty)")
    training = build_training(args, fundus, env, device, log)
    env_info, run_dir = environment(device, env), Path(args.checkpoint_dir) / args.run_name
    done = resume(args, resumed, training, log) if resumed else Progress()
    if resumed and env.main:
        repair_outputs(resumed, run_dir, Path(args.log_dir), env_info, log)
    if done.epochs_done >= args.epochs:
        log(f"nothing to do: the checkpoint already holds epoch {done.epochs_done} of --epochs {args.epochs}")
        return
    log(f"run {args.run_name}: {args.model} on {env_info['device']} x{env.world} | "
        f"{ {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(training.amp_dtype, 'fp32')} | "
        f"{'channels_last' if args.channels_last else 'NCHW'} | batch {args.batch_size}x{env.world}"
        f"x{args.grad_accum_steps} | {training.loaders['train'].num_workers} workers")
    stop.install()
    try:
        for epoch in range(done.epochs_done + 1, args.epochs + 1):
            train_epoch(args, training, done, epoch, env, stop, log)
            if env.main:
                save_epoch(args, training, done, fundus.record(), env_info)
    except Stopped as stopped:
        last = run_dir / "last.pt"
        held = (f"{last} holds epoch {done.epochs_done}; resume with: python train.py --resume "
                f"{shlex.quote(str(last))}" if done.epochs_done else "no epoch had finished, so no checkpoint")
        log(f"{stopped}; {held}")
        sys.exit(128 + stop.signum)
    log(f"done: best {select(training)} {metric_text(select(training), done.best_metric)} at epoch {done.best_epoch}; "
        f"{run_dir}/best.pt, "
        f"{args.log_dir}/{args.run_name}.csv")


# --------------------------------------------------------------------------- the two-eye stage
def run_two_eye(args, resumed: dict | None, env: Dist, device: torch.device, stop: StopRequest, log) -> None:
    """The two-eye stage (twoeye.py): the encoder's features of every photo, once (cached in the run folder),
    then epochs of the small head over them, logged, checkpointed and resumed as an image run's epochs."""
    if env.active:
        raise UserError("--two-eye trains a small head on cached features in seconds; run it without torchrun")
    encoder_path = input_file("--two-eye", args.two_eye)
    encoder_checkpoint = load_checkpoint(encoder_path, "--two-eye")
    twoeye.check_encoder(encoder_checkpoint, encoder_path)
    if resumed and resumed["two_eye"]["encoder"]["weights_digest"] != checkpoint_digest(encoder_checkpoint):
        raise UserError(f"{encoder_path} holds other weights than the encoder this two-eye run started on (it was "
                        "trained again?); its head would not fit them: start the two-eye run afresh with --overwrite")
    fundus = two_eye_data(args, resumed, encoder_checkpoint, log)
    partners = {split: twoeye.partner_index(table.names) for split, table in fundus.splits().items()}
    twoeye.assert_pairs(partners["train"], f"the training split of {fundus.dataset or fundus.root}")
    log("two-eye: " + " | ".join(f"{split} {c['eyes']} eyes, {c['with_partner']} with their partner, {c['alone']} "
                                 "alone" for split, c in ((s, twoeye.pair_counts(p)) for s, p in partners.items())))
    encoder = evaluate.load_model(encoder_checkpoint, encoder_path, device)
    features = cached_features(args, encoder_checkpoint, encoder, fundus, device, log)
    objective = objectives.of(encoder_checkpoint)
    torch.manual_seed(args.seed)
    head = twoeye.build_head(encoder.cpu(), features["train"][torch.isfinite(features["train"]).all(1)])
    criterion = optimisation.build_criterion(fundus.train.grades, args.class_weighted, args.label_smoothing, CPU,
                                             objective)
    optimizer = optimisation.build_optimizer(args.optimizer, head, args.lr, args.momentum, args.weight_decay,
                                           args.nesterov)
    scheduler = optimisation.build_scheduler(optimizer, args.schedule, args.warmup_epochs, args.epochs,
                                             math.ceil(len(fundus.train) / args.batch_size))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # the head trains in fp32: the checkpoint keeps the format
    done = Progress()
    if resumed:
        head.load_state_dict(resumed["two_eye"]["head"])
        restore_training(resumed, optimizer, scheduler, scaler)
        done = Progress(resumed["history"], resumed["best_metric"], resumed["best_epoch"], resumed["epoch"],
                        resumed.get("best_weights_digest"))
        log(f"resumed {args.resume} at epoch {done.epochs_done}")
    run_dir, env_info = Path(args.checkpoint_dir) / args.run_name, environment(device, env)
    if resumed:
        repair_outputs(resumed, run_dir, Path(args.log_dir), env_info, log)
    grades = {split: torch.as_tensor(table.grades) for split, table in fundus.splits().items()}
    partner = {split: torch.as_tensor(p) for split, p in partners.items()}
    selected = f"{'val' if fundus.val is not None else 'test'}_{args.select}"
    record = {"checkpoint": str(encoder_path.absolute()), "run_name": encoder_checkpoint["config"].get("run_name"),
              "weights_digest": checkpoint_digest(encoder_checkpoint),
              "pairs": {split: twoeye.pair_counts(p) for split, p in partners.items()}}
    log(f"run {args.run_name}: two-eye head over {args.model} features ({head.own.in_features} per eye), "
        f"objective {objective.name}, on the CPU")
    stop.install()
    for epoch in range(done.epochs_done + 1, args.epochs + 1):
        stats = twoeye.train_epoch(head, features["train"], partner["train"], grades["train"], criterion, optimizer,
                                   scheduler, args.batch_size, args.seed * 1_000_003 + epoch * 1009,
                                   augment=not args.no_augment)
        results = {split: evaluate.split_numbers(twoeye.summaries(head, features[split], partner[split], objective),
                                                 grades[split], objective)
                   for split in fundus.splits() if split != "train"}
        log_epoch(args, done, epoch, stats, results, selected, log)
        extra = {"two_eye": {"head": head.state_dict(), "features": head.own.in_features, "hidden": twoeye.HIDDEN,
                             "encoder": record}}
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
        write_checkpoint(args, encoder_checkpoint["model"], state, done, selected, fundus.record(), env_info,
                         encoder_checkpoint.get("pretrained_source"), extra)
        if stop(True):
            log(f"stopped after epoch {epoch}; resume with: python train.py --resume "
                f"{shlex.quote(str(run_dir / 'last.pt'))}")
            sys.exit(128 + stop.signum)
    log(f"done: best {selected} {metric_text(selected, done.best_metric)} at epoch {done.best_epoch}; "
        f"{run_dir}/best.pt, {args.log_dir}/{args.run_name}.csv")


def two_eye_data(args, resumed: dict | None, encoder: dict, log) -> dataloader.FundusData:
    """The two-eye run's data: its own record when resumed, --data-root when typed (split by the encoder's
    flags), else the encoder's own data and splits, so that its validation split stays out of training."""
    if resumed is not None:
        return dataloader.load_run_data(resumed["config"], resumed.get("data", {}), args.data_root, args.image_dir,
                                        log=log)
    if args.data_root is not None:
        fundus = dataloader.load_fundus_data(args.data_root, args.image_dir, args.test_fraction, args.val_fraction,
                                             args.split_seed, log=log, layout=args.layout)
    else:
        fundus = dataloader.load_run_data(encoder["config"], encoder.get("data", {}), image_dir=args.image_dir, log=log)
    dataloader.check_no_shared_photos(fundus)
    return fundus


def cached_features(args, encoder_checkpoint: dict, encoder: nn.Module, fundus: dataloader.FundusData,
                    device: torch.device, log) -> dict:
    """Every split's encoder features, read from <run dir>/features.pt when it holds these very ones (the
    encoder's weights, the splits' names and grades, the size), else computed once and written there."""
    path = Path(args.checkpoint_dir) / args.run_name / "features.pt"
    key = {"encoder": checkpoint_digest(encoder_checkpoint), "image_size": args.image_size,
           "splits": {split: table.digest() for split, table in fundus.splits().items()}}
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            log(f"two-eye: encoder features from {path}")
            return cached["features"]
    start = time.perf_counter()
    config = encoder_checkpoint["config"]
    amp_dtype, _ = precision(config.get("amp"), device)
    transform = dataloader.BatchTransform(device, augment=False, channels_last=config.get("channels_last", True))
    workers = args.workers if args.workers is not None else dataloader.default_workers()
    features = {}
    for split, table in fundus.splits().items():
        dataset = dataloader.FundusDataset(table, args.image_size, args.skip_bad_images,
                                           evaluate.trained_on_ben_graham(encoder_checkpoint),
                                           advice=dataloader.TRAINING_ADVICE)
        loader = dataloader.build_loader(dataset, 2 * args.batch_size, dataloader.ShardSampler(len(table)), workers,
                                         device)
        features[split] = twoeye.compute_features(encoder, loader, transform, autocast(device, amp_dtype),
                                                  f"features {split}", not args.quiet)
    save_atomic({"key": key, "features": features}, path)
    log(f"two-eye: encoder features of {sum(len(f) for f in features.values())} photos in "
        f"{time.perf_counter() - start:.1f}s, cached in {path}")
    return features


def split_columns(split: str, result: dict) -> dict:
    return {f"{split}_loss": result["loss"], f"{split}_acc": result["acc"], f"{split}_kappa": result["kappa"]}


def save_epoch(args, training: Training, done: Progress, data_info: dict, env_info: dict) -> None:
    state = {"optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
             "scaler": training.scaler.state_dict()}
    write_checkpoint(args, training.raw_model.state_dict(), state, done, select(training), data_info, env_info,
                     training.pretrained_source)


def write_checkpoint(args, state_dict: dict, state: dict, done: Progress, selected: str, data_info: dict,
                     env_info: dict, pretrained_source: str | None, extra: dict | None = None) -> None:
    """The epoch's checkpoint (`extra`: the two-eye stage's head and encoder record) and logs, best.pt too when
    the epoch is the best; the best weights' digest covers everything that grades (runtime.checkpoint_digest)."""
    best = {"best_epoch": done.best_epoch, "best_metric": done.best_metric, "best_metric_name": selected,
            "best_weights_digest": done.best_weights_digest}
    checkpoint = make_checkpoint(state_dict, vars(args), data_info, done.epochs_done,
                                 done.history, best, state, pretrained_source)
    checkpoint.update(extra or {})
    if done.best_epoch == done.epochs_done:
        done.best_weights_digest = checkpoint["best_weights_digest"] = checkpoint_digest(checkpoint)
    write_epoch(checkpoint, done.best_epoch == done.epochs_done, Path(args.checkpoint_dir) / args.run_name,
                Path(args.log_dir), env_info)


def metric_text(name: str | None, value: float) -> str:
    """A selection metric as the epoch lines print it: accuracy in per cent, kappa as a number."""
    return f"{value:.3f}" if str(name).endswith("kappa") else f"{value:.2%}"


def select(training: Training) -> str:
    """The column that chooses best.pt (--select: accuracy or kappa), of the validation split when the run
    holds one out, else of the test split."""
    split = "val" if "val" in training.loaders else "test"
    return f"{split}_{training.select}"


def train_epoch(args, training: Training, done: Progress, epoch: int, env: Dist, stop: StopRequest, log) -> None:
    """One epoch of training, then the test (and val) split evaluated, the row logged into `done`."""
    show = env.main and not args.quiet
    training.loaders["train"].sampler.set_epoch(epoch)
    stats = optimisation.train_one_epoch(
        training.model, training.loaders["train"], training.train_transform, training.criterion, training.optimizer,
        training.scheduler, training.scaler, training.autocast_ctx, epoch,
        aug_seed=args.seed * 1_000_003 + epoch * 1009 + env.rank, accum_steps=args.grad_accum_steps,
        skip_bad_images=args.skip_bad_images, stop=stop, show=show)
    if env.active:
        # each rank's last forward updated its own BN statistics: evaluate with rank 0's, the ones saved
        for buffer in training.raw_model.buffers():
            dist.broadcast(buffer, 0)
    results = {split: evaluate.evaluate_split(training.eval_model, loader, training.eval_transform,
                                              training.autocast_ctx, training.criterion.objective, split, show)
               for split, loader in training.loaders.items() if split != "train"}
    log_epoch(args, done, epoch, stats, results, select(training), log)


def log_epoch(args, done: Progress, epoch: int, stats: dict, results: dict, selected: str, log) -> None:
    """The epoch's row (training stats, each evaluated split) into `done`, the best epoch by `selected`, the
    epoch line; the same for an image run and the two-eye stage."""
    row = {"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["acc"],
           **split_columns("test", results["test"]), "lr": stats["lr"], "seconds": stats["seconds"],
           "images_per_s": stats["images_per_s"], **(split_columns("val", results["val"]) if "val" in results else {}),
           AUC_COLUMN: results["test"]["referable_auc"]}
    skipped = {"training": stats["skipped"], **{f"the {split} split": r["skipped"] for split, r in results.items()}}
    done.history.append(row)
    done.epochs_done = epoch
    if row[selected] > done.best_metric:
        done.best_metric, done.best_epoch = row[selected], epoch
    log(epoch_line(row, args.epochs, done.best_epoch == epoch))
    if any(skipped.values()):
        log(f"skipped unreadable images in epoch {epoch} (--skip-bad-images): "
            + ", ".join(f"{n} in {where}" for where, n in skipped.items()))


if __name__ == "__main__":
    main()
