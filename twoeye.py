"""The two-eye stage: an eye graded from its own features and its partner's, on a trained single-eye grader.

Both eyes of a patient usually share their grade (48 of 55 patients with both eyes in the shared EyePACS
sample; 219 of 295 in rahim_pairs), so the partner's photo is evidence about this one. Huang et al. (Diagnostics
2023, `fundus/fusion.py`) and the Kaggle 2015 winners (team o_O's blend, Ben Graham's second stage) both feed the
two eyes' features to a small second model over a frozen encoder. Here:

- the encoder is a single-eye checkpoint's ResNet, frozen; its pooled features (models.ResNet.features) are
  computed once per photo and cached, so the second stage trains in seconds on any machine;
- the head grades an eye as the encoder's own fc does, plus a correction a small MLP reads off both eyes'
  standardised features and a partner flag; the correction's last layer starts at zero, so the two-eye model
  starts as exactly its single-eye checkpoint and training can only move it where the partner helps;
- an eye without its partner in the split (or whose partner's photo is unreadable) is graded with the flag at
  0 and the partner's features at zero; training drops the partner of a share of eyes (PARTNER_DROPOUT) so
  that the head has learnt that case too. Every report counts the eyes graded alone.

Pairs come from the names: `<patient>_left` and `<patient>_right`, as EyePACS, the lab's files, the demo set
and rahim_pairs name them; the other public layouts publish no pairing (layouts.py).
"""
from __future__ import annotations

import re
import time

import numpy as np
import torch
from torch import nn

import dataloader
from runtime import UserError, progress

SIDE = re.compile(r"^(?P<patient>.+)_(?P<side>left|right)$", re.IGNORECASE)
HIDDEN = 256
DROPOUT = 0.5
# The share of training eyes shown without their partner each epoch: enough that the head learns to grade a
# lone eye (a patient photographed once, a partner's photo refused) as the single-eye model does.
PARTNER_DROPOUT = 0.25


# --------------------------------------------------------------------------- pairs
def partner_index(names: list[str]) -> np.ndarray:
    """For each image, the index of the same patient's other eye in the same list (-1: none there)."""
    where = {}
    for i, name in enumerate(names):
        match = SIDE.match(name)
        if match:
            where.setdefault((match["patient"], match["side"].lower()), i)
    partner = np.full(len(names), -1, dtype=np.int64)
    for (patient, side), i in where.items():
        other = where.get((patient, "right" if side == "left" else "left"))
        if other is not None:
            partner[i] = other
    return partner


def pair_counts(partner: np.ndarray) -> dict:
    """How many eyes are graded with their partner and how many alone."""
    paired = int((partner >= 0).sum())
    return {"eyes": len(partner), "with_partner": paired, "alone": len(partner) - paired}


# --------------------------------------------------------------------------- the model
class TwoEyeHead(nn.Module):
    """raw outputs of an eye = own(features) + mix([standardised eye, standardised partner x flag, flag])."""

    def __init__(self, features: int, outputs: int, hidden: int = HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        self.own = nn.Linear(features, outputs)
        self.mix = nn.Sequential(nn.Linear(2 * features + 1, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, outputs))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, eye: torch.Tensor, partner: torch.Tensor, has_partner: torch.Tensor) -> torch.Tensor:
        flag = has_partner.to(eye.dtype).view(-1, 1)
        standard = lambda f: (f - self.mean) / self.std  # noqa: E731
        mixed = torch.cat([standard(eye), standard(partner) * flag, flag], dim=1)
        return self.own(eye) + self.mix(mixed)


def build_head(encoder: nn.Module, train_features: torch.Tensor) -> TwoEyeHead:
    """A head whose own part is the encoder's fc and whose standardisation is the training features'."""
    head = TwoEyeHead(encoder.fc.in_features, encoder.fc.out_features)
    head.own.load_state_dict(encoder.fc.state_dict())
    head.mean.copy_(train_features.mean(0))
    std = train_features.std(0)
    # a feature (nearly) constant on the training photos, a channel the ReLU keeps at 0 there, must not blow up
    # where another photo lights it: its scale is floored at a tenth of the features' mean spread
    head.std.copy_(std.clamp_min(0.1 * float(std.mean()) + 1e-6))
    return head


class TwoEyeModel(nn.Module):
    """Encoder and head together: (eye photo, partner photo, partner flag) -> the eye's raw outputs. What
    evaluate.py runs, export.py exports and Grad-CAM looks through."""

    def __init__(self, encoder: nn.Module, head: TwoEyeHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, eye: torch.Tensor, partner: torch.Tensor, has_partner: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(eye), self.encoder.features(partner), has_partner)


def is_two_eye(checkpoint: dict) -> bool:
    return "two_eye" in checkpoint


def head_of(checkpoint: dict, path) -> TwoEyeHead:
    """A two-eye checkpoint's head with its weights; weights of another shape are one sentence."""
    record = checkpoint["two_eye"]
    head = TwoEyeHead(record["features"], checkpoint["num_classes"], record.get("hidden", HIDDEN))
    try:
        head.load_state_dict(record["head"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: its two-eye head does not fit its record ({str(err).splitlines()[0][:160]})") from None
    return head


# --------------------------------------------------------------------------- photos in pairs
class PairDataset(torch.utils.data.Dataset):
    """Each image of a table with its partner's: ((eye, partner, flag), grade). A partner that is missing or
    unreadable (with --skip-bad-images) leaves the flag at 0 and the eye's own photo in its place."""

    def __init__(self, images: dataloader.FundusDataset, partner: np.ndarray):
        self.images, self.partner = images, partner

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        eye, grade = self.images[index]
        other, has = eye, 0.0
        if self.partner[index] >= 0:
            image, partner_grade = self.images[int(self.partner[index])]
            if partner_grade >= 0:
                other, has = image, 1.0
        return (eye, other, has), grade


def collate_pairs(batch: list) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """PairDataset items as ((eyes, partners, flags), grades), the photos batched as collate_fundus does."""
    eyes, grades = dataloader.collate_fundus([(eye, grade) for (eye, _, _), grade in batch])
    partners, _ = dataloader.collate_fundus([(other, grade) for (_, other, _), grade in batch])
    flags = torch.tensor([has for (_, _, has), _ in batch], dtype=torch.float32)
    return (eyes, partners, flags), grades


def pair_loader(dataset: dataloader.FundusDataset, partner: np.ndarray, batch_size: int, workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of pairs in table order (evaluation)."""
    pairs = PairDataset(dataset, partner)
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, num_workers=workers, collate_fn=collate_pairs,
                                       pin_memory=device.type == "cuda",
                                       worker_init_fn=dataloader.worker_signals if workers else None)


# --------------------------------------------------------------------------- features, once
@torch.inference_mode()
def compute_features(encoder: nn.Module, loader, transform, autocast_ctx, desc: str, show: bool) -> torch.Tensor:
    """Pooled features [N, D] float32 of a loader's images (its order), the encoder in eval mode; rows of
    unreadable images (grade -1) are NaN."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for images, grades in progress(loader, len(loader), desc, show):
        with autocast_ctx:
            features = encoder.features(transform(images.to(device, non_blocking=True))).float().cpu()
        features[grades < 0] = float("nan")
        out.append(features)
    return torch.cat(out)


# --------------------------------------------------------------------------- the second stage's epoch
def inputs(features: torch.Tensor, partner: torch.Tensor, index: torch.Tensor,
           drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eye, partner, flag) features of the images at `index`; `drop` marks partners hidden for training."""
    mate = partner[index]
    has = mate >= 0
    if drop is not None:
        has &= ~drop
    other = torch.where(has.view(-1, 1), features[mate.clamp_min(0)], torch.zeros_like(features[index]))
    return features[index], torch.nan_to_num(other), has.float()


def train_epoch(head: TwoEyeHead, features: torch.Tensor, partner: torch.Tensor, grades: torch.Tensor, criterion,
                optimizer, scheduler, batch_size: int, seed: int, augment: bool) -> dict:
    """One pass over the training eyes in a seeded order (a resumed epoch draws what the uninterrupted one
    did), hiding PARTNER_DROPOUT of the partners when augmenting. Returns loss, acc, seconds, images_per_s,
    skipped and the last lr, as optimisation.train_one_epoch does."""
    head.train()
    generator = torch.Generator().manual_seed(seed)
    usable = torch.nonzero(grades >= 0).flatten()
    order = usable[torch.randperm(len(usable), generator=generator)]
    drops = torch.rand(len(order), generator=generator) < PARTNER_DROPOUT
    start, loss_sum, correct = time.perf_counter(), 0.0, 0
    for begin in range(0, len(order), batch_size):
        index = order[begin:begin + batch_size]
        if len(index) < 2:  # the head has no BatchNorm, but one eye's gradient is a poor step: as the image loop
            continue
        out = head(*inputs(features, partner, index, drops[begin:begin + batch_size] if augment else None))
        loss = criterion(out, grades[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(index)
        correct += int((criterion.grade(out) == grades[index]).sum())
    seconds = time.perf_counter() - start
    seen = max(1, len(order))
    return {"loss": loss_sum / seen, "acc": correct / seen, "seconds": seconds, "images_per_s": seen / seconds,
            "skipped": int((grades < 0).sum()), "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def summaries(head: TwoEyeHead, features: torch.Tensor, partner: torch.Tensor, objective) -> torch.Tensor:
    """The objective's summaries of every eye of a split, from cached features (NaN rows stay NaN)."""
    head.eval()
    index = torch.arange(len(features))
    return objective.summarise(head(*inputs(features, partner, index)))


def check_encoder(checkpoint: dict, path) -> None:
    """The encoder must be a single-eye checkpoint: a two-eye one has no features of its own to read."""
    if is_two_eye(checkpoint):
        raise UserError(f"--two-eye {path} is itself a two-eye checkpoint; name the single-eye checkpoint it was "
                        f"trained on ({checkpoint['two_eye']['encoder']['checkpoint']})")


def assert_pairs(partner: np.ndarray, where: str) -> None:
    if not (partner >= 0).any():
        raise UserError(f"--two-eye: {where} pairs no patient's two eyes (names <patient>_left and "
                        "<patient>_right), so the two-eye stage has nothing to learn; it needs a layout that "
                        "names both eyes (EyePACS, the lab's, the demo set)")
