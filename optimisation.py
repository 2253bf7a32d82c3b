"""How the weights are fitted: optimiser, learning-rate schedule, loss, and one training epoch.

train.py runs `train_one_epoch` every epoch; bench.py times the very same function.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import dataloader
import objectives
from runtime import RunFailed, progress

# Batches between host syncs: the progress bar's text, the non-finite-loss check and, under DDP, the
# ranks' agreement on a stop request each wait for the GPU, so they happen together and rarely.
SYNC_EVERY = 20


class Diverged(RunFailed):
    """The loss became NaN or infinite."""


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False):
    """--optimizer sgd (the lab's: momentum, L2 weight decay; --nesterov: Nesterov's momentum, as Huang et al.
    2023 train) or adamw (decoupled weight decay)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up from 1/100, then cosine decay to 0 at `total` (or constant), per optimiser step."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def build_scheduler(optimizer, schedule: str, warmup_epochs: float, epochs: int, steps_per_epoch: int):
    """lr_factor per optimiser step over the whole run, as a LambdaLR (its state goes into checkpoints)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))


class Criterion:
    """The objective's training loss with the run's settings: criterion(outputs, grades) -> mean loss."""

    def __init__(self, objective: objectives.Objective, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        self.objective, self.weight, self.label_smoothing = objective, weight, label_smoothing

    def __call__(self, out: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(out, grades, self.label_smoothing, self.weight)

    def grade(self, out: torch.Tensor) -> torch.Tensor:
        """The objective's grade of raw outputs (what the training accuracy counts)."""
        return self.objective.grade(self.objective.summarise(out.detach()))


def build_criterion(train_grades: np.ndarray, class_weighted: bool, label_smoothing: float,
                    device: torch.device, objective: objectives.Objective = objectives.OBJECTIVES["ce"]) -> Criterion:
    """The objective's loss; for cross-entropy with class_weighted each grade weighs the inverse of its share
    of the training split (n / (5 * count)), so that 73 % of grade 0 no longer dominate the loss (train.py
    refuses the two cross-entropy settings for the other objectives)."""
    weight = None
    if class_weighted:
        counts = dataloader.class_counts(train_grades).astype(np.float64)
        weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                              device=device)
    return Criterion(objective, weight, label_smoothing)


def train_one_epoch(model: nn.Module, loader, transform, criterion, optimizer, scheduler, scaler, autocast_ctx,
                    epoch: int, *, aug_seed: int, accum_steps: int = 1, skip_bad_images: bool = False,
                    stop: Callable[[bool], bool] = lambda sync: False, show: bool = False) -> dict:
    """One pass over `loader`: augmentation on the device, forward under `autocast_ctx`, loss, backward,
    and an optimiser and scheduler step every `accum_steps` batches. Owns the per-batch work only; the
    caller sets the sampler's epoch and decides what happens between epochs.

    `aug_seed` seeds the augmentation (a resumed epoch draws what the uninterrupted one did). `stop(sync)`
    is asked after every batch, `sync` True every SYNC_EVERY batches; True ends the epoch (Stopped). With
    skip_bad_images, unreadable images (grade -1) are dropped and counted, and a batch left with fewer
    than two is skipped. Under DDP the totals are summed over ranks. Returns loss, acc, seconds,
    images_per_s, skipped and the last lr."""
    model.train()
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    generator = torch.Generator(device=device).manual_seed(aug_seed)
    loss_sum, correct = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(2))
    skipped, bad_batch = torch.zeros((), device=device), torch.full((), -1, device=device, dtype=torch.int64)
    batches, seen, pending, start = len(loader), 0, False, time.perf_counter()
    bar = progress(loader, batches, f"epoch {epoch} train", show)
    for i, (images, grades) in enumerate(bar):
        images, grades = images.to(device, non_blocking=True), grades.to(device, non_blocking=True)
        step_now, usable = (i + 1) % accum_steps == 0 or i + 1 == batches, True
        if skip_bad_images:
            keep = grades >= 0
            skipped += (~keep).sum()
            usable = int(keep.sum()) >= 2
            images, grades = (images[keep], grades[keep]) if usable else (images, grades.clamp_min(0))
        if usable or distributed:  # under DDP a skipped batch still joins the gradient all-reduce, weighing 0
            logits, loss = backward(model, transform(images, generator), grades, criterion, scaler, autocast_ctx,
                                    1 / accum_steps if usable else 0.0, step_now, distributed)
            pending = True
        if usable:
            bad_batch = torch.where((bad_batch < 0) & ~torch.isfinite(loss), i + 1, bad_batch)
            loss_sum += loss.double() * len(grades)
            correct += (criterion.grade(logits) == grades).sum()
            seen += len(grades)
        if step_now:
            optimiser_step(optimizer, scheduler, scaler, pending)
            pending = False
        at_sync = (i + 1) % SYNC_EVERY == 0 or i + 1 == batches
        if at_sync:
            check_finite(bad_batch, epoch, batches, optimizer)
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, seen):.3f}", refresh=False)
        if stop(at_sync):
            raise Stopped(epoch, i + 1, batches)
    totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device, dtype=torch.float64),
                          skipped.double()])
    return epoch_totals(totals, start, device, distributed, optimizer)


def optimiser_step(optimizer, scheduler, scaler, has_gradient: bool) -> None:
    """The optimiser's step, then the schedule's. A window of skipped batches has no gradient to step with
    (and fp16's scaler would fail on it); the schedule goes on regardless, as in the uninterrupted run."""
    if has_gradient:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
        scheduler.step()


def backward(model, x, grades, criterion, scaler, autocast_ctx, weight: float, step_now: bool,
             distributed: bool):
    """Forward and backward of one batch, its loss scaled by `weight` (1 / accumulation steps; 0 for a
    skipped batch under DDP, run in eval mode so that BatchNorm's statistics stay as they are). Between
    optimiser steps DDP's gradient all-reduce waits (no_sync). Returns the logits and the unscaled loss."""
    sync = contextlib.nullcontext() if step_now or not distributed else model.no_sync()
    if weight == 0:
        model.eval()
    with sync:
        with autocast_ctx:
            logits = model(x)
            loss = criterion(logits, grades)
        scaler.scale(loss * weight).backward()
    model.train()
    return logits.detach(), loss.detach()


def check_finite(bad_batch: torch.Tensor, epoch: int, batches: int, optimizer) -> None:
    if bad_batch.item() >= 0:
        lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        raise Diverged(f"the loss became non-finite in epoch {epoch}, batch {bad_batch.item()} of {batches}; "
                       f"lower --lr (now {lr:g}) or check the data")


def epoch_totals(totals: torch.Tensor, start: float, device: torch.device, distributed: bool, optimizer) -> dict:
    """The epoch's numbers, summed over ranks under DDP."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if distributed:
        dist.all_reduce(totals)
    loss_sum, correct, seen, skipped = totals.tolist()
    return {"loss": loss_sum / max(1, seen), "acc": correct / max(1, seen), "seconds": seconds,
            "images_per_s": seen / seconds, "skipped": int(skipped), "lr": optimizer.param_groups[0]["lr"]}


class Stopped(Exception):
    """A stop request (Ctrl-C, SIGTERM) ended the epoch after `batch` of `batches`."""

    def __init__(self, epoch: int, batch: int, batches: int):
        super().__init__(f"stopped during epoch {epoch} (batch {batch} of {batches})")
        self.epoch, self.batch, self.batches = epoch, batch, batches
