"""How the weights are fitted: optimiser, learning-rate schedule, loss, and one training epoch.

train.py runs `train_one_epoch` every epoch; bench.py times the very same function.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import dataloader
from runtime import RunFailed, progress

# Batches between host syncs: the progress bar's text, the non-finite-loss check and, under DDP, the
# ranks' agreement on a stop request each wait for the GPU, so they happen together and rarely.
SYNC_EVERY = 20


class Diverged(RunFailed):
    """The loss became NaN or infinite."""


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float):
    """--optimizer sgd (the lab's: momentum, L2 weight decay) or adamw (decoupled weight decay)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
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


def build_criterion(train_grades: np.ndarray, class_weighted: bool, label_smoothing: float,
                    device: torch.device) -> nn.Module:
    """Cross-entropy; with class_weighted each grade weighs the inverse of its share of the training split
    (n / (5 * count)), so that 73 % of grade 0 no longer dominate the loss."""
    weight = None
    if class_weighted:
        counts = dataloader.class_counts(train_grades).astype(np.float64)
        weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                              device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def train_one_epoch(model: nn.Module, loader, transform, criterion, optimizer, scheduler, scaler, autocast_ctx,
                    epoch: int, *, aug_seed: int, accum_steps: int = 1, skip_bad_images: bool = False,
                    stop: Callable[[bool], bool] = lambda sync: False, show: bool = False) -> dict:
    """One pass over `loader`: augmentation on the device, forward under `autocast_ctx`, loss, backward,
    and an optimiser and scheduler step every `accum_steps` batches. Owns the per-batch work only: the
    caller sets the sampler's epoch, and decides what happens between epochs.

    `aug_seed` seeds the device-side augmentation (so a resumed epoch draws what the uninterrupted one
    did). `stop(sync)` is asked after every batch, `sync` True every SYNC_EVERY batches; when it says
    True the epoch ends by raising Stopped. With skip_bad_images, images whose grade is -1 (unreadable,
    see FundusDataset) are dropped and counted. Under DDP (model wrapped in DistributedDataParallel, a
    process group initialised) accumulating batches skip the gradient all-reduce and the totals are
    summed over ranks. Returns loss, acc, seconds, images_per_s, skipped and the last lr."""
    model.train()
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    generator = torch.Generator(device=device).manual_seed(aug_seed)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct, seen, skipped = (torch.zeros((), device=device, dtype=torch.int64) for _ in range(3))
    bad_batch = torch.full((), -1, device=device, dtype=torch.int64)
    batches = len(loader)
    start = time.perf_counter()
    bar = progress(loader, batches, f"epoch {epoch} train", show)
    for i, (images, grades) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        grades = grades.to(device, non_blocking=True)
        if skip_bad_images:
            keep = grades >= 0
            skipped += (~keep).sum()
            images, grades = images[keep], grades[keep]
        x = transform(images, generator)
        step_now = (i + 1) % accum_steps == 0 or i + 1 == batches
        sync = contextlib.nullcontext() if step_now or not distributed else model.no_sync()
        with sync:
            with autocast_ctx:
                logits = model(x)
                loss = criterion(logits, grades)
            scaler.scale(loss / accum_steps).backward()
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        bad_batch = torch.where((bad_batch < 0) & ~torch.isfinite(loss.detach()), i + 1, bad_batch)
        loss_sum += loss.detach().double() * len(grades)
        correct += (logits.argmax(1) == grades).sum()
        seen += len(grades)
        at_sync = (i + 1) % SYNC_EVERY == 0 or i + 1 == batches
        if at_sync:
            if bad_batch.item() >= 0:
                lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
                raise Diverged(f"the loss became non-finite in epoch {epoch}, batch {bad_batch.item()} of {batches}; "
                               f"lower --lr (now {lr:g}) or check the data")
            bar.set_postfix(loss=f"{loss_sum.item() / max(1, seen.item()):.3f}", refresh=False)
        if stop(at_sync):
            raise Stopped(epoch, i + 1, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct.double(), seen.double(), skipped.double()])
    if distributed:
        dist.all_reduce(totals)
    loss_total, correct_total, seen_total, skipped_total = totals.tolist()
    return {"loss": loss_total / max(1, seen_total), "acc": correct_total / max(1, seen_total),
            "seconds": seconds, "images_per_s": seen_total / seconds, "skipped": int(skipped_total),
            "lr": optimizer.param_groups[0]["lr"]}


class Stopped(Exception):
    """A stop request (Ctrl-C, SIGTERM) ended the epoch after `batch` of `batches`."""

    def __init__(self, epoch: int, batch: int, batches: int):
        super().__init__(f"stopped during epoch {epoch} (batch {batch} of {batches})")
        self.epoch, self.batch, self.batches = epoch, batch, batches
