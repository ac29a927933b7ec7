"""Distillation from a frozen dense teacher: the policy object of ``GSMModule(distillation=...)`` (plain PyTorch).

The teacher is, by default, the backbone's own dense weights copied before conversion.  It gets no gradients, stays
in eval mode on the student's device and is kept out of checkpoints (it is rebuilt from the same backbone on load)
unless ``keep_in_checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Distillation", "DistillLoss"]

DistillLoss = Literal["kl", "mse", "cosine"]


@dataclass
class Distillation:
    """How the student learns from the teacher.

    Args:
        loss: ``"kl"``: KL divergence of the softened class distributions (classification and ``lm`` logits), times
            ``temperature ** 2``; ``"mse"``: mean squared error of the outputs (embeddings, regression, hidden
            states); ``"cosine"``: ``1 - cos`` of the outputs along their last dimension (embedding models).
        weight: weight of the distillation loss.
        task_weight: weight of the task's own loss (on labels).  ``label_free`` sets it to 0.
        temperature: softening of ``"kl"``.
        label_free: the data has no labels (e.g. unlabelled text for an embedding model): the loss is the
            distillation loss alone and batches are passed to the model whole.
        keep_in_checkpoint: also save the teacher's weights in checkpoints (``checkpoint["gsm_teacher"]``); by default
            they are left out and the teacher is rebuilt from the backbone given to the module.
    """

    loss: DistillLoss = "kl"
    weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 1.0
    label_free: bool = False
    keep_in_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.loss not in ("kl", "mse", "cosine"):
            raise ValueError(f"unknown distillation loss {self.loss!r}; expected 'kl', 'mse' or 'cosine'")
        for name in ("weight", "task_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"distillation {name} must be a number >= 0, got {v!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature!r}")
        if self.weight == 0:
            raise ValueError("distillation weight is 0: the teacher would do nothing; drop `distillation` instead")

    @property
    def uses_labels(self) -> bool:
        return not self.label_free and self.task_weight > 0

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The distillation loss of ``student`` outputs against ``teacher`` outputs of the same shape."""
        if student.shape != teacher.shape:
            raise ValueError(f"the teacher's output {tuple(teacher.shape)} and the student's {tuple(student.shape)} "
                             "differ in shape: the teacher must be the same architecture (the backbone before "
                             "conversion) or at least map the same inputs to outputs of the same shape")
        s, t = student.float(), teacher.float()
        if self.loss == "kl":
            tau = float(self.temperature)
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            return F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                            reduction="batchmean") * tau * tau
        if self.loss == "mse":
            return F.mse_loss(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def make_teacher(backbone: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone`` (no gradients, eval mode): the dense teacher of a distillation."""
    import copy

    teacher = copy.deepcopy(backbone)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: Any) -> Tensor:
    out = teacher(x)
    return out.logits if hasattr(out, "logits") else out
