"""What a grader is trained to output, and how that output becomes numbers: one definition per objective.

- `ce`: the lab's five-way softmax under cross-entropy.
- `mse`: the grade regressed with one output under mean squared error (Huang et al., Diagnostics 2023, found
  it beats cross-entropy on kappa for ResNet-50 on EyePACS; the Kaggle 2015 winners regressed the grade too).
- `ordinal`: CORN (Shi, Cao and Raschka, "Deep neural networks for rank-consistent ordinal regression based on
  conditional probabilities", Pattern Analysis and Applications 2023): four outputs, each the logit of
  P(grade > k | grade >= k); their running product is P(grade > k), monotone by construction, so five grade
  probabilities follow. Chosen over CORAL because CORAL's rank consistency needs ordered biases it does not
  enforce, and CORN's does not.

Each objective says, once: its head size, its training loss, its *summary* (what test-time augmentation
averages and an exported file outputs: the five grade probabilities, or the regressed grade), and from a
summary its continuous score, its grade, the score of each screening question, and its probabilities where it
has them. Training logs, evaluate.py, TTA, --images, Grad-CAM, export.py and plot.py all go through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runtime import NUM_GRADES, UserError

# The regression's grade: the score cut half-way between grades (Huang et al.; the Kaggle winners then tuned
# these four cuts for kappa on held-out images, which evaluate.py reports as kappa_tuned).
DEFAULT_CUTS = (0.5, 1.5, 2.5, 3.5)
GRADE_VALUES = torch.arange(NUM_GRADES, dtype=torch.float32)


@dataclass(frozen=True)
class Objective:
    name: str
    outputs: int  # width of the model's last layer (fc)
    probabilities: bool  # whether its summary is the five grade probabilities (else the regressed grade)
    description: str

    # ------------------------------------------------------------------ training
    def loss(self, out: torch.Tensor, grades: torch.Tensor, label_smoothing: float = 0.0,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of a batch's raw outputs (mean over the batch)."""
        if self.name == "ce":
            return F.cross_entropy(out, grades, weight=weight, label_smoothing=label_smoothing)
        if self.name == "mse":
            return F.mse_loss(out[:, 0].float(), grades.float())
        return corn_loss(out.float(), grades)

    # ------------------------------------------------------------------ raw output -> summary
    def summarise(self, out: torch.Tensor) -> torch.Tensor:
        """What test-time augmentation averages and an exported file outputs, float32: the softmax (ce), the
        five grade probabilities from the conditional ones (ordinal), or the regressed grade [N, 1] (mse).
        Averaging ordinal's grade probabilities is averaging its P(grade >= k), a linear map of them."""
        out = out.float()
        if self.name == "ce":
            return F.softmax(out, dim=1)
        if self.name == "mse":
            return out[:, :1]
        conditional = torch.sigmoid(out)  # P(grade > k | grade >= k), k = 0..3
        at_least = [torch.ones_like(conditional[:, :1])]  # P(grade >= k), k = 0..4
        for k in range(conditional.shape[1]):  # a product of 4, unrolled: ONNX has CumSum but no CumProd
            at_least.append(at_least[-1] * conditional[:, k:k + 1])
        at_least.append(torch.zeros_like(conditional[:, :1]))
        return torch.cat(at_least[:-1], dim=1) - torch.cat(at_least[1:], dim=1)

    def summary_width(self) -> int:
        return NUM_GRADES if self.probabilities else 1

    # ------------------------------------------------------------------ summary -> numbers
    def score(self, summary: torch.Tensor) -> torch.Tensor:
        """The continuous grade: the expected grade of the probabilities, or the regressed grade itself."""
        if not self.probabilities:
            return summary[:, 0]
        return summary @ GRADE_VALUES.to(summary.device, summary.dtype)

    def grade(self, summary: torch.Tensor) -> torch.Tensor:
        """The grade: argmax (ce), the count of P(grade >= k) over one half (ordinal, CORN's rule), the score
        cut at DEFAULT_CUTS (mse)."""
        if self.name == "ce":
            return summary.argmax(1)
        if self.name == "ordinal":
            return (at_least(summary)[:, 1:] > 0.5).sum(1)
        cuts = torch.tensor(DEFAULT_CUTS, device=summary.device, dtype=summary.dtype)
        return (summary[:, :1] > cuts).sum(1)

    def screening_score(self, summary: torch.Tensor, grade_at_least: int) -> torch.Tensor:
        """The score of 'this grade or worse?': the probability mass there, or the regressed grade (ROC AUC and
        operating points need an order, not a probability)."""
        if not self.probabilities:
            return summary[:, 0]
        return at_least(summary)[:, grade_at_least]

    def eval_loss(self, summary: torch.Tensor, grades: torch.Tensor) -> float:
        """The training loss recomputed from summaries (what an evaluation has after TTA): the mean negative log
        likelihood of the true grade (ce), CORN's loss of the conditional probabilities (ordinal), the mean
        squared error (mse). Equal to `loss` of the raw outputs up to rounding (tests/test_objectives.py)."""
        if not len(grades):
            return float("nan")
        if self.name == "mse":
            return float(F.mse_loss(summary[:, 0].double(), grades.double()))
        probs = summary.double().clamp_min(1e-12)
        if self.name == "ce":
            return float(F.nll_loss(probs.log(), grades))
        ge = at_least(summary.double()).clamp_min(1e-12)  # P(grade >= k), k = 0..4
        tasks = torch.arange(NUM_GRADES - 1)
        asked = grades[:, None] >= tasks[None, :]  # CORN's task k is asked of the images of grade >= k
        passed = grades[:, None] > tasks[None, :]
        log_yes = ge[:, 1:].log() - ge[:, :-1].log()  # log P(grade > k | grade >= k)
        log_no = probs[:, :-1].log() - ge[:, :-1].log()  # log P(grade = k | grade >= k)
        terms = torch.where(passed, log_yes, log_no)
        return float(-(terms * asked).sum() / asked.sum())

    def numbers(self, summary: np.ndarray) -> dict:
        """Everything the metrics need of a set of summaries, as numpy: grade, score, the screening scores, the
        probabilities (None for the regression)."""
        t = torch.as_tensor(np.asarray(summary, dtype=np.float64))
        return {"grade": self.grade(t).numpy(), "score": self.score(t).numpy(),
                "screening": {g: self.screening_score(t, g).numpy() for g in (2, 3)},
                "probs": t.numpy() if self.probabilities else None}

    def cam_signal(self, out: torch.Tensor, grade: torch.Tensor) -> torch.Tensor:
        """The scalar per image whose gradient Grad-CAM follows: the logit of the predicted grade (ce, the lab's
        Grad-CAM), the regressed grade (mse), the expected grade (ordinal): where the photo raises the grade."""
        if self.name == "ce":
            return out.gather(1, grade.view(-1, 1))
        if self.name == "mse":
            return out[:, :1]
        return self.score(self.summarise(out)).view(-1, 1)


def at_least(summary: torch.Tensor) -> torch.Tensor:
    """P(grade >= k) for k = 0..4 from five grade probabilities (column 0 is 1)."""
    return summary.flip(1).cumsum(1).flip(1)


def corn_loss(logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """CORN's loss (Shi et al. 2023, eq. 4; coral_pytorch.losses.corn_loss): task k is the binary question
    'grade > k?' asked only of the images of grade >= k (the conditional training subsets), the binary
    cross-entropy summed over every task's subset and divided by the subsets' total size. Written as one masked
    sum instead of a loop over tasks: no data-dependent shapes, so torch.compile and DDP see one graph."""
    tasks = torch.arange(logits.shape[1], device=logits.device)
    asked = (grades[:, None] >= tasks[None, :]).to(logits.dtype)
    passed = (grades[:, None] > tasks[None, :]).to(logits.dtype)
    terms = passed * F.logsigmoid(logits) + (1 - passed) * F.logsigmoid(-logits)
    return -(terms * asked).sum() / asked.sum()


OBJECTIVES = {
    "ce": Objective("ce", NUM_GRADES, True, "cross-entropy over the five grades (the lab's)"),
    "mse": Objective("mse", 1, False, "the grade regressed with one output, mean squared error (Huang et al. 2023)"),
    "ordinal": Objective("ordinal", NUM_GRADES - 1, True, "CORN ordinal regression, P(grade > k) (Shi et al. 2023)"),
}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}") from None


def of(checkpoint: dict) -> Objective:
    """A checkpoint's (or an exported file's record's) objective: checkpoints from before objectives are `ce`."""
    name = checkpoint.get("objective") or checkpoint.get("config", {}).get("loss") or "ce"
    objective = get(name)
    head = checkpoint.get("num_classes", objective.outputs)
    if head != objective.outputs:
        raise UserError(f"the checkpoint says objective {name} (a head of {objective.outputs}) but has a head of "
                        f"{head}; it was not written by this project's train.py")
    return objective
