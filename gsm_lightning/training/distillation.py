"""Distillation from a frozen dense teacher: the policy object of ``GSMModule(distillation=...)`` (plain PyTorch).

The teacher is, by default, the backbone's own dense weights copied before conversion.  It gets no gradients, stays
in eval mode on the student's device and is kept out of checkpoints (it is rebuilt from the same backbone on load)
unless ``keep_in_checkpoint``.

Besides the outputs, the student can match the teacher's hidden states (``Distillation(hidden=[...])``): the outputs of
the modules whose names match the patterns, in the student and in the teacher, compared per token
(:class:`HiddenStates`), as TinyBERT and MiniLM's own distillation do.  They give every block a target of its own
instead of one signal at the end.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Distillation", "DistillLoss", "HiddenLoss", "HiddenStates"]

DistillLoss = Literal["kl", "mse", "cosine"]
HiddenLoss = Literal["rel_mse", "cosine"]


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
        hidden: also match hidden states: ``fnmatch`` patterns of module names of the backbone (whole names; ``*``
            also crosses dots), e.g. ``["model.encoder.layer.?"]`` for the six blocks of a BERT-style encoder.  The
            output of each matched module (its first tensor, when it returns a tuple) is compared with the output
            of the teacher's module of the same name, per token; positions the batch's ``attention_mask`` marks as
            padding are left out.  Empty (default): outputs only.
        hidden_loss: ``"rel_mse"``: ``sum ||s - t||^2 / sum ||t||^2`` over the tokens (the squared error relative to
            the teacher's, so blocks of different scale weigh alike); ``"cosine"``: mean ``1 - cos`` per token.
        hidden_weight: weight of the hidden-state loss (the mean over the matched modules).
    """

    loss: DistillLoss = "kl"
    weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 1.0
    label_free: bool = False
    keep_in_checkpoint: bool = False
    hidden: list[str] = field(default_factory=list)
    hidden_loss: HiddenLoss = "rel_mse"
    hidden_weight: float = 1.0

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
        if isinstance(self.hidden, str):
            self.hidden = [self.hidden]
        if not isinstance(self.hidden, (list, tuple)) or not all(isinstance(p, str) and p for p in self.hidden):
            raise ValueError(f"distillation hidden must be a list of module-name patterns, got {self.hidden!r}")
        self.hidden = list(self.hidden)
        if self.hidden_loss not in ("rel_mse", "cosine"):
            raise ValueError(f"unknown hidden_loss {self.hidden_loss!r}; expected 'rel_mse' or 'cosine'")
        w = self.hidden_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"distillation hidden_weight must be a number >= 0, got {w!r}")

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


def _first_tensor(out: Any, name: str) -> Tensor:
    """The hidden state a module returned: the tensor itself, the first tensor of a tuple/list, or a model output's
    ``last_hidden_state``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    state = getattr(out, "last_hidden_state", None)
    if isinstance(state, Tensor):
        return state
    raise TypeError(f"distillation hidden: module {name!r} returned {type(out).__name__}, which holds no tensor to "
                    "match; choose modules that return a tensor (or a tuple starting with one)")


class HiddenStates:
    """Records the outputs of same-named modules of a student and its teacher for one step, and compares them.

    Hooks are registered by :meth:`begin` and removed by :meth:`end`, around each step: nothing stays attached to
    the models (so they pickle and deepcopy as without it) and a module replaced between steps (a freeze, a
    checkpoint load) is found again by name.  For eager training: a ``torch.compile``-d backbone would see new hooks
    at every step.

    Args:
        patterns: ``fnmatch`` patterns of module names (whole names).
        loss: ``"rel_mse"`` or ``"cosine"`` (see :class:`Distillation`).

    Examples::

        hs = HiddenStates(["blocks.*"], "rel_mse")
        hs.begin(student, teacher)
        try:
            out, ref = student(x), teacher(x)
            loss = hs.loss(token_mask)
        finally:
            hs.end()
    """

    def __init__(self, patterns: list[str], loss: HiddenLoss = "rel_mse") -> None:
        self.patterns = list(patterns)
        self.loss_kind = loss
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self.names: list[str] = []

    def match(self, model: nn.Module | dict[str, nn.Module]) -> list[str]:
        """Names of the modules of ``model`` (or of a ``{name: module}`` map of it) the patterns match."""
        modules = model if isinstance(model, dict) else dict(model.named_modules())
        names = [n for n in modules if n and any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]
        if not names:
            some = [n for n in modules if n][:8]
            raise ValueError(f"distillation hidden patterns {self.patterns!r} match no module of the backbone; module "
                             f"names look like {some}: give whole names or patterns of them (fnmatch, e.g. "
                             "'encoder.layer.?')")
        return names

    def begin(self, student: nn.Module, teacher: nn.Module) -> None:
        self.end()
        smods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
        names = self.match(smods)
        missing = [n for n in names if n not in tmods]
        if missing:
            raise ValueError(f"distillation hidden: the teacher has no module {missing[0]!r}; the teacher must be the "
                             "backbone before conversion (same module names)")
        self.names = names
        for n in names:
            self._handles.append(smods[n].register_forward_hook(self._recorder(self.student, n)))
            self._handles.append(tmods[n].register_forward_hook(self._recorder(self.teacher, n)))

    @staticmethod
    def _recorder(store: dict[str, Tensor], name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            store[name] = _first_tensor(out, name)
        return hook

    def end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.student, self.teacher, self.names = {}, {}, []

    def loss(self, token_mask: Tensor | None = None) -> Tensor:
        """Mean over the matched modules of the per-token loss between what student and teacher recorded this step.
        ``token_mask`` ``(B, T)``: count only its positions, for hidden states ``(B, T, H)``."""
        missing = [n for n in self.names if n not in self.student or n not in self.teacher]
        if missing:
            raise RuntimeError(f"distillation hidden: module {missing[0]!r} did not run in the student's or the "
                               "teacher's forward; match modules that every forward goes through")
        terms = []
        for n in self.names:
            s, t = self.student[n].float(), self.teacher[n].float().detach()
            if s.shape != t.shape:
                raise ValueError(f"distillation hidden: module {n!r} gave {tuple(s.shape)} in the student and "
                                 f"{tuple(t.shape)} in the teacher")
            if s.dim() == 0:
                raise ValueError(f"distillation hidden: module {n!r} returned a scalar; match modules with "
                                 "per-sample outputs")
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            if token_mask is not None and token_mask.numel() == s.shape[0]:
                keep = token_mask.reshape(-1).to(s.device).bool()
                s, t = s[keep], t[keep]
            if self.loss_kind == "rel_mse":
                terms.append((s - t).square().sum() / t.square().sum().clamp_min(1e-12))
            else:
                terms.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
        return torch.stack(terms).mean()
