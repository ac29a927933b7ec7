"""``GSMModule``: a LightningModule that turns any backbone into a GBLR model and learns its structure.

Phase 1 (``phase1_epochs`` epochs): weights and structure (widths, locations) are trained; after every
real optimizer step a structure rule moves the widths toward the FLOPs ``budget`` (``shrink="budget"``:
:class:`~gsm_lightning.budget_learner.BudgetLearner`, a cut onto a target path of the FLOPs ratio;
``shrink="paper"``: the paper's soft threshold while the ratio is above the budget) and sigma is
annealed per epoch.  Phase 2 (remaining epochs): the structure is frozen (hard boxcars,
integer widths, zero components dropped) and only the weights are fine-tuned.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from .align import side_alignment
from .budget_learner import BudgetLearner, CutWeighting, Tracking, WidthStep
from .conversion import gsmify
from .proximal import (
    SigmaSchedule,
    cosine_warmup_lambda,
    flops_ratio,
    gblr_layers,
    param_groups,
    project_model_to_budget,
    proximal_step,
    set_sigma,
)

__all__ = ["GSMModule"]

Task = Literal["classification", "lm", "regression"]
Shrink = Literal["budget", "paper"]


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from this module that points at the first frame outside
    gsm_lightning, torch and lightning: the caller's own code (e.g. their ``trainer.fit`` line)."""
    import lightning
    import lightning_utilities

    skip = tuple(os.path.dirname(m.__file__) for m in (sys.modules[__package__], torch, lightning, lightning_utilities, os))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


Method = Literal["gblr", "dense", "lowrank", "monarch", "blocksparse"]


def _rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, Python) as tensors and plain Python values, so that
    checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)


class GSMModule(LightningModule):
    """Train any backbone with GBLR layers under a FLOPs budget.

    Args:
        backbone: any ``nn.Module`` (in YAML: ``class_path`` + ``init_args``).  Classification
            backbones map images to logits; LM backbones map ``input_ids`` to logits ``(B, T, V)``.
        task: ``"classification"`` (cross-entropy with label smoothing, accuracy/top-5), ``"lm"``
            (next-token loss, perplexity) or ``"regression"`` (MSE on ``(x, y)`` tensors, for
            teacher-student and distillation; logs ``val/mse`` and ``val/rel_mse`` = MSE over the
            variance of the targets).
        num_classes: classes for the metrics (classification).
        budget: target FLOPs ratio of the converted layers, in (0, 1].
        include / exclude: glob or ``re:`` patterns of layers to convert (default: the backbone's
            ``gsm_default_include`` if it has one, else every linear layer).
        init: ``"random"`` (SVD of trunc-normal, ``width_init``) or ``"pretrained"`` (fit the backbone's
            own weights to the budget).
        method: ``"gblr"`` (learned structure), ``"dense"`` (no conversion) or a fixed baseline
            (``"lowrank"``, ``"monarch"``, ``"blocksparse"``) at the same budget.
        layer_kwargs: extra :class:`GBLRLinear` arguments (``rank_per_component``, ``width_init``, ...); for a
            baseline ``method``, :func:`~gsm_lightning.baselines.baselinify` options (``rank``, ``nblocks``,
            ``block_size``).  With
            ``init="random"`` and ``shrink="budget"``, ``location_init`` defaults to ``"uniform"`` and ``init_std``
            to ``"fan_in"``.
        fit_steps: fitting steps of the pretrained conversion.
        phase1_epochs: epochs of structure learning; the structure is frozen at the start of the next
            epoch.  ``0`` freezes before training starts.
        shrink: the structure rule of phase 1.  ``"budget"`` (default): a
            :class:`~gsm_lightning.budget_learner.BudgetLearner` cuts the widths onto a cosine path of
            the FLOPs ratio from its start to ``budget`` over the first ``path_fraction`` of phase 1,
            then holds it.  ``"paper"``: the paper's ``clamp(softshrink(w, prox_lambda * lr), 0, 1)``
            while the ratio is above the budget (reproduces the reference recipe).
        path_fraction: part of phase 1 over which the ``"budget"`` path reaches the budget.
        width_step: ``"side_rms"`` (default; widths step by their gradient over one running RMS per
            layer side, moved by the learner) or ``"adam"`` (per-coordinate, by the optimizer).  Only
            for ``shrink="budget"``; the paper's rule always uses Adam.
        cut_weighting: where the ``"budget"`` cut falls: ``"energy"`` (FLOPs units, weak components
            faster; default), ``"density"`` (FLOPs units, components with little energy per FLOP faster),
            ``"density_energy"`` (density along the path, energy once the budget is held), ``"flops"``
            (FLOPs units) or ``"uniform"``.
        energy_start: part of phase 1 after which the energy weighting applies.
        energy_power: exponent of the energy weight ``clip(mean_e / e_k, 0.1, 100) ** p``, clipped again
            (default 2). 2 pulls harder toward a few strong components than 1: it meets every
            structure-recovery goal, the low-rank teacher included, where 1 misses that one (BENCHMARKS.md).
        width_lr_scale: the ``side_rms`` width step uses ``width_lr_scale * structure_lr`` (scheduled like
            every group); locations keep ``structure_lr``.
        tracking: ``"project"`` (default: the exact cut onto the path) or ``"dual"`` (a soft threshold adapted
            by feedback, a Lagrange multiplier; for ablations).
        prox_lambda: threshold of ``shrink="paper"``; the shrink per step is ``lambda * lr_structure``.
        prox_start_step: optimizer steps before any shrink or cut may start.
        structure_lr: learning rate of the structure group (AdamW, betas (0, 0.999), no decay): locations, and
            widths unless ``width_step="side_rms"``.  Default ``2.5e-3`` for ``shrink="budget"`` (slow
            locations, widths at ``width_lr_scale`` times it) and ``5e-3`` (the paper's) for ``"paper"``.
        sigma0 / sigma1 / sigma_start_epoch / sigma_end_epoch: sigma annealing (``None`` = pure
            Dirichlet): sigma0 until ``sigma_start_epoch``, then linear to sigma1 at ``sigma_end_epoch``, updated
            after every optimizer step (epochs may be fractional).  ``sigma_end_epoch`` defaults to the start of
            the last phase-1 epoch (``phase1_epochs - 1``; the end of phase 1 when it is one epoch long), so
            sigma1 is reached in phase 1 and the last phase-1 epoch trains near the boxcars it freezes to.
        enforce_budget_at_freeze: project the widths onto the budget when freezing if phase 1 did not
            reach it (a last resort: a warning gives the numbers when it moves the ratio by more than 0.02).
        freeze_align: snap every window's start and width to multiples of ``freeze_align`` at the phase
            switch (a side of length ``n`` to ``gcd(n, freeze_align)``; a warning names the layers that cannot take
            the full tile), so that frozen layers map onto aligned tiles for :class:`~gsm_lightning.compact.CompactGBLR`.
            No side's total width rises (largest-remainder rounding, :mod:`gsm_lightning.align`), so the FLOPs
            ratio stays at or below the one reached; phase 2 fine-tunes on the aligned windows.  1 (default): off.
        label_smoothing: for classification.
        optimizer: optimizer callable (LightningCLI ``OptimizerCallable``); default AdamW(lr 5e-4, wd 0.05).
        lr_scheduler: scheduler callable; default: linear warmup (``warmup_epochs``) then cosine, per step.
        warmup_epochs: warmup of the default scheduler.
    """

    def __init__(
        self,
        backbone: nn.Module,
        task: Task = "classification",
        num_classes: int | None = None,
        budget: float = 0.3,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        init: Literal["random", "pretrained"] = "random",
        method: Method = "gblr",
        layer_kwargs: dict[str, Any] | None = None,
        fit_steps: int = 300,
        phase1_epochs: int = 1,
        shrink: Shrink = "budget",
        path_fraction: float = 0.4,
        width_step: WidthStep = "side_rms",
        cut_weighting: CutWeighting = "energy",
        energy_start: float = 0.1,
        energy_power: float = 2.0,
        width_lr_scale: float = 4.0,
        tracking: Tracking = "project",
        prox_lambda: float = 0.02,
        prox_start_step: int = 0,
        structure_lr: float | None = None,
        sigma0: float | None = 1.0,
        sigma1: float | None = 100.0,
        sigma_start_epoch: float = 0,
        sigma_end_epoch: float | None = None,
        enforce_budget_at_freeze: bool = True,
        freeze_align: int = 1,
        label_smoothing: float = 0.1,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if task not in ("classification", "lm", "regression"):
            raise ValueError(f"unknown task {task!r}; expected 'classification', 'lm' or 'regression'")
        if shrink not in ("budget", "paper"):
            raise ValueError(f"unknown shrink {shrink!r}; expected 'budget' (budget-tracking learner) or 'paper'")
        for name, frac in (("path_fraction", path_fraction), ("energy_start", energy_start)):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
                raise ValueError(f"{name} must be a fraction of phase 1 in [0, 1], got {frac!r}")
        if method not in ("gblr", "dense", "lowrank", "monarch", "blocksparse"):
            raise ValueError(f"unknown method {method!r}; expected gblr, dense, lowrank, monarch or blocksparse")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {budget!r}")
        if int(phase1_epochs) != phase1_epochs or phase1_epochs < 0:
            raise ValueError(f"phase1_epochs must be a non-negative integer, got {phase1_epochs}")
        if structure_lr is None:
            structure_lr = 2.5e-3 if shrink == "budget" else 5e-3
            self.hparams.structure_lr = structure_lr
        if not prox_lambda >= 0 or not structure_lr > 0:
            raise ValueError(f"prox_lambda must be >= 0 and structure_lr > 0, got {prox_lambda}, {structure_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if isinstance(freeze_align, bool) or not isinstance(freeze_align, int) or freeze_align < 1:
            raise ValueError(f"freeze_align must be an integer >= 1 (a tile size such as 8, 16 or 32; 1 = off), "
                             f"got {freeze_align!r}")
        self.backbone = backbone
        self.task = task
        self.budget = float(budget)
        self.phase1_epochs = int(phase1_epochs)
        if sigma_end_epoch is None:
            sigma_end_epoch = max(self.phase1_epochs - 1 if self.phase1_epochs > 1 else self.phase1_epochs,
                                  sigma_start_epoch)
        self.sigma_schedule = SigmaSchedule(sigma0, sigma1, sigma_start_epoch, sigma_end_epoch)
        self._steps_per_epoch: float = 0.0  # optimizer steps per epoch, for the per-step sigma (configure_optimizers)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.real_optimizer_steps = 0
        self._last_prox: dict[str, float] = {}
        # FLOPs ratio when phase 1 ended (before any projection) and how much the projection moved it.
        self.phase1_end_ratio: float | None = None
        self.projection_delta: float | None = None
        # path_steps / energy_start_step are set from the trainer's step count in configure_optimizers.
        self.learner = (BudgetLearner(self.budget, path_steps=0, width_step=width_step, cut_weighting=cut_weighting,
                                      width_lr_scale=width_lr_scale, tracking=tracking, energy_power=energy_power)
                        if shrink == "budget" else None)

        if include is None:
            include = getattr(backbone, "gsm_default_include", None)
        if method == "gblr":
            layer_kwargs = dict(layer_kwargs or {})
            if init == "random" and shrink == "budget":
                # Evenly spaced windows give the learner every offset to choose from, and factors at the
                # LeCun scale (the SVD of a 1/sqrt(in)-std matrix) train far better than the paper's 0.02
                # (BENCHMARKS.md: Fashion-MNIST and teacher-student ablations); the paper's recipe
                # (shrink='paper') keeps the reference's zero locations and 0.02.
                layer_kwargs.setdefault("location_init", "uniform")
                layer_kwargs.setdefault("init_std", "fan_in")
            self.report = gsmify(backbone, budget=budget, include=include, exclude=exclude, init=init,
                                 fit_steps=fit_steps, **layer_kwargs)
            initial = self.report.flops_ratio
            if init == "random" and self.budget > initial + 1e-9:
                raise ValueError(
                    f"target FLOPs ratio (budget) {self.budget:g} is above the initial ratio {initial:.4f} of the "
                    "converted layers; structure learning only shrinks widths: lower the budget or start wider "
                    "(layer_kwargs.width_init)"
                )
        elif method != "dense":
            from .baselines import baselinify

            self.report = baselinify(backbone, method=method, budget=budget, include=include, exclude=exclude,
                                     init=init, **(layer_kwargs or {}))
        else:
            self.report = None
        self._setup_metrics(num_classes)

    # ------------------------------------------------------------ metrics
    def _setup_metrics(self, num_classes: int | None) -> None:
        import torchmetrics

        if self.task == "classification":
            if num_classes is None or num_classes < 2:
                raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
            top5 = min(5, num_classes)
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
            self.val_top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=top5)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
            self.test_top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=top5)
        elif self.task == "regression":
            from .metrics import RelativeMSE

            self.val_rel_mse = RelativeMSE()
            self.test_rel_mse = RelativeMSE()
        else:
            from torchmetrics.text import Perplexity

            self.val_ppl = Perplexity(ignore_index=-100)
            self.test_ppl = Perplexity(ignore_index=-100)

    # ---------------------------------------------------------- structure
    @property
    def gblr_layers(self):
        return gblr_layers(self.backbone)

    @property
    def structure_frozen(self) -> bool:
        layers = self.gblr_layers
        return bool(layers) and all(m.is_frozen for _, m in layers)

    @property
    def phase(self) -> int:
        """1 while structure is learned, 2 once it is frozen (also 2 for baselines/dense)."""
        return 1 if self.hparams.method == "gblr" and not self.structure_frozen else 2

    def flops_ratio(self) -> float:
        """FLOPs-weighted ratio of the converted layers (GBLR or baselines) to their dense versions."""
        if self.hparams.method == "gblr":
            return flops_ratio(m for _, m in self.gblr_layers)
        return self.report.flops_ratio if self.report is not None else 1.0

    # ------------------------------------------------------------ forward
    def forward(self, x: Any) -> Tensor:
        out = self.backbone(x)
        if hasattr(out, "logits"):  # HF model outputs
            out = out.logits
        return out

    def _unpack(self, batch: Any) -> tuple[Any, Tensor]:
        """(inputs, targets) with targets aligned to the model's outputs.

        Classification: ``(images, labels)``.  LM: ``(input_ids, labels)`` with labels already shifted
        (``labels[:, t]`` is the target of ``logits[:, t]``, as the WikiText data module yields), or a
        HF-style dict / bare ``input_ids`` tensor whose labels are the inputs shifted by one here."""
        if self.task != "lm":
            return batch[0], batch[1]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        labels = batch.get("labels", ids) if isinstance(batch, dict) else ids
        return ids[:, :-1], labels[:, 1:]

    def _loss(self, logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
        if self.task == "regression":
            if logits.shape != y.shape:
                raise ValueError(f"regression: the model's output {tuple(logits.shape)} and the target "
                                 f"{tuple(y.shape)} must have the same shape")
            return F.mse_loss(logits.float(), y.float())
        if self.task == "lm":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)

    def _check_labels(self, y: Any) -> None:
        """Classification labels must be below ``num_classes`` (else the loss fails deep inside, or on a GPU
        with a device-side assert)."""
        if self.task != "classification" or not isinstance(y, Tensor) or y.is_floating_point() or not y.numel():
            return
        n, top = self.hparams.num_classes, int(y.max())
        if top >= n:
            raise ValueError(f"the data has label {top} but num_classes={n} (labels must be in [0, {n - 1}]): set "
                             f"num_classes (model.num_classes) to the data's number of classes, at least {top + 1}, "
                             "and give the backbone as many outputs")

    def _non_finite_hint(self, x: Any = None) -> str:
        """Current learning rates and which parameters are non-finite, for a NaN/inf error during training."""
        opts = self._trainer.optimizers if self._trainer is not None else []
        lrs: dict[str, float] = {}
        for g in (opts[0].param_groups if opts else []):
            lrs.setdefault(str(g.get("name", "group")), float(g["lr"]))
        weight_lr = next((lr for name, lr in lrs.items() if name not in ("structure", "widths")), None)
        structure_lr = lrs.get("structure", self.hparams.structure_lr)
        rates = (f"learning rates now: weights {weight_lr:.4g}, structure {structure_lr:.4g}" if weight_lr is not None
                 else f"structure learning rate {structure_lr:.4g}")
        bad = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        bad_weights = [n for n in bad if not n.endswith((".widths", ".locations"))]
        if bad_weights:
            cause = (f"non-finite weights ({', '.join(bad_weights[:4])}{' ...' if len(bad_weights) > 4 else ''}): "
                     "lower the weight learning rate (optimizer lr) first")
        elif bad:
            big = max((float(p.detach().abs().max()) for n, p in self.named_parameters()
                       if p.numel() and not n.endswith((".widths", ".locations"))), default=0.0)
            cause = (f"the weights have grown to |w| = {big:.3g} and their gradient overflowed into the structure: "
                     "lower the weight learning rate (optimizer lr)" if big > 1e3 else
                     f"only the structure (widths/locations) is non-finite, the weights are moderate (|w| <= {big:.3g}): "
                     "lower structure_lr")
        elif isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            cause = "the input batch holds NaN/inf: check the data"
        else:
            cause = "every parameter and input is finite, so the outputs overflowed: lower the weight learning rate"
        return f"{rates}; {cause}"

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._unpack(batch)
        self._check_labels(y)
        try:
            logits = self(x)
        except FloatingPointError as e:  # a GBLR layer's non-finite structure: add the rates and the likely cause
            raise FloatingPointError(f"{e} ({self._non_finite_hint(x)})") from None
        loss = self._loss(logits, y, self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx}, "
                f"global step {self.global_step}: {self._non_finite_hint(x)}"
            )
        self.log("train/loss", loss, prog_bar=True)
        if self.task == "classification":
            self.train_acc(logits.detach(), y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self._unpack(batch)
        self._check_labels(y)
        logits = self(x)
        loss = self._loss(logits, y, 0.0)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        if self.task == "regression":
            rel = getattr(self, f"{stage}_rel_mse")
            rel(logits, y)
            self.log(f"{stage}/mse", loss, sync_dist=True)
            self.log(f"{stage}/rel_mse", rel, prog_bar=stage == "val")
        elif self.task == "classification":
            acc, top5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_top5")
            acc(logits, y)
            top5(logits, y)
            self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
            self.log(f"{stage}/acc_top5", top5)
        else:
            ppl = getattr(self, f"{stage}_ppl")
            ppl(logits.float(), y)
            self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x["input_ids"] if isinstance(x, dict) else x)

    # --------------------------------------------------------- optimizers
    def _phase1_steps(self) -> int:
        """Real optimizer steps of phase 1, from the trainer's estimate."""
        trainer = self._trainer
        if trainer is None:
            return 0
        total = trainer.estimated_stepping_batches
        max_epochs = trainer.max_epochs
        if not math.isfinite(total) or not max_epochs or max_epochs < 1:
            per_epoch = max(1, int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches)) \
                if math.isfinite(trainer.num_training_batches) else 1
        else:
            per_epoch = total / max_epochs
        return int(round(per_epoch * self.phase1_epochs))

    def configure_optimizers(self) -> Any:
        widths_apart = self.learner is not None and self.learner.moves_widths
        self._steps_per_epoch = self._phase1_steps() / self.phase1_epochs if self.phase1_epochs else 0.0
        groups = param_groups(self, self.hparams.structure_lr, widths_apart=widths_apart)
        if self.learner is not None:
            phase1 = self._phase1_steps()
            self.learner.path_steps = int(round(self.hparams.path_fraction * phase1))
            self.learner.energy_start_step = int(round(self.hparams.energy_start * phase1))
        optimizer = self.optimizer_factory(groups)
        names = {g.get("name") for g in optimizer.param_groups}
        if self.phase == 1 and "structure" not in names:
            warnings.warn(
                "the optimizer has no param group named 'structure': the widths and locations are not trained by the "
                "paper's recipe and the learning rate of the structure rule falls back to the first group's. Build the "
                "optimizer from the groups GSMModule passes (e.g. `optimizer: {class_path: torch.optim.AdamW}`), "
                "keeping their names", stacklevel=_user_stacklevel())
        if widths_apart and "widths" not in names:
            raise ValueError("width_step='side_rms' needs the 'widths' param group (lr 0) GSMModule passes to the "
                             "optimizer; keep the groups as given or use width_step='adam'")
        optimizer.register_step_post_hook(self._after_optimizer_step)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(round(self.hparams.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_warmup_lambda(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs once per REAL optimizer step (not per micro-batch, not on AMP-skipped steps)."""
        self.real_optimizer_steps += 1
        if self.phase != 1:
            return
        group = next((g for g in optimizer.param_groups if g.get("name") == "structure"), optimizer.param_groups[0])
        active = self.real_optimizer_steps > self.hparams.prox_start_step
        if self.learner is not None:
            self._last_prox = self.learner.step(self.backbone, group["lr"], cut=active)
        else:
            self._last_prox = proximal_step(self.backbone, self.hparams.prox_lambda, group["lr"], self.budget,
                                            shrink=active)
        self._anneal_sigma()

    def sigma_epoch(self) -> float:
        """Position in the sigma schedule: optimizer steps so far in epochs (the epoch index when the steps per
        epoch are unknown, e.g. before fit or with an iterable dataset)."""
        if self._steps_per_epoch > 0:
            return self.real_optimizer_steps / self._steps_per_epoch
        return float(self.current_epoch) if self._trainer is not None else 0.0

    def _anneal_sigma(self) -> None:
        if self.hparams.method == "gblr" and self.phase == 1:
            set_sigma(self.backbone, self.sigma_schedule(self.sigma_epoch()))

    # ------------------------------------------------------------- phases
    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if self.hparams.method == "gblr" and max_epochs is not None and max_epochs >= 0 and self.phase1_epochs > max_epochs:
            raise ValueError(
                f"phase1_epochs={self.phase1_epochs} is beyond trainer.max_epochs={max_epochs}: the structure would never "
                "be frozen; lower phase1_epochs or raise max_epochs"
            )
        if (self.hparams.method == "gblr" and max_epochs is not None and 0 < max_epochs == self.phase1_epochs
                and self.phase == 1):
            warnings.warn(
                f"phase1_epochs={self.phase1_epochs} equals trainer.max_epochs={max_epochs}: the structure is frozen at "
                f"the start of epoch {self.phase1_epochs}, which this run never reaches, so it ends in phase 1 (soft "
                f"masks, FLOPs ratio not projected onto the budget {self.budget:g}, no phase-2 fine-tuning). Raise "
                "max_epochs above phase1_epochs, or call module.freeze_structure() after fit",
                stacklevel=_user_stacklevel())

    def on_train_epoch_end(self) -> None:
        """Collapse guard: warn (once per layer) when structure learning drove a layer to 0 FLOPs."""
        if self.hparams.method != "gblr" or self.phase != 1:
            return
        warned = self.__dict__.setdefault("_collapse_warned", set())
        dead = [n for n, m in gblr_layers(self.backbone, include_frozen=False) if n not in warned and m.flops() == 0]
        if not dead:
            return
        warned.update(dead)
        rule = (f"structure_lr={self.hparams.structure_lr:g} (widths step at {self.hparams.width_lr_scale:g}x it)"
                if self.learner is not None else
                f"structure_lr={self.hparams.structure_lr:g} with prox_lambda={self.hparams.prox_lambda:g}")
        warnings.warn(
            f"epoch {self.current_epoch}: GBLR layer(s) {', '.join(repr(n) for n in dead[:8])}"
            f"{' ...' if len(dead) > 8 else ''} fell to 0 FLOPs (every component has zero width: the layer only adds "
            f"its bias). Likely cause: {rule} is too high, or the budget {self.budget:g} is too low for these layers. "
            "Lower structure_lr, raise the budget, or exclude the layers", stacklevel=_user_stacklevel())

    def on_train_epoch_start(self) -> None:
        if self.hparams.method != "gblr":
            return
        epoch = self.current_epoch
        if self.phase == 1 and epoch >= self.phase1_epochs:
            self.freeze_structure()
        self._anneal_sigma()
        self.log("gsm/epoch_start_flops_ratio", self.flops_ratio(), on_step=False, on_epoch=True, prog_bar=True, sync_dist=False)

    @torch.no_grad()
    def freeze_structure(self) -> None:
        """Phase switch: identical structure on every rank (broadcast from rank 0), budget enforced,
        hard boxcars, zero components dropped; optimizer groups updated in place (Adam state of kept
        components carried over), DDP re-wrapped for the new parameters."""
        layers = [m for _, m in gblr_layers(self.backbone, include_frozen=False)]
        if not layers:
            return
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            for m in layers:
                for t in (m.widths, m.locations, m.sigma):
                    t.copy_(trainer.strategy.broadcast(t.detach().clone(), src=0))
        before = flops_ratio(layers)
        self.phase1_end_ratio, self.projection_delta = before, 0.0
        if self.hparams.enforce_budget_at_freeze and before > self.budget:
            project_model_to_budget(self.backbone, self.budget)
            after = flops_ratio(layers)
            self.projection_delta = before - after
            if self.projection_delta > 0.02:
                hint = ("raise prox_lambda or phase1_epochs, or use shrink='budget'" if self.learner is None
                        else "lower path_fraction or raise phase1_epochs")
                warnings.warn(
                    f"phase 1 ended at FLOPs ratio {before:.4f}, above the budget {self.budget:g}: the widths were "
                    f"projected onto the budget before freezing (ratio {before:.4f} -> {after:.4f}, a cut of "
                    f"{self.projection_delta:.4f} the learner did not make). To reach it by learning, {hint}.",
                    stacklevel=_user_stacklevel())
        align = int(self.hparams.get("freeze_align", 1))
        if align > 1:
            tiles = {name: (side_alignment(m.in_features, align), side_alignment(m.out_features, align), m)
                     for name, m in gblr_layers(self.backbone, include_frozen=False)}
            partial = [f"{name} ({m.in_features}x{m.out_features}: {a_in}/{a_out})"
                       for name, (a_in, a_out, m) in tiles.items() if min(a_in, a_out) < align]
            if partial:
                warnings.warn(f"freeze_align={align}: these layers have a side not divisible by {align} and are aligned "
                              f"to gcd(side, {align}) instead (input/output tile): {', '.join(partial)}",
                              stacklevel=_user_stacklevel())
        old = {m: (m.weight_in, m.weight_out, m.widths, m.locations) for m in layers}
        keeps = {}
        for m in layers:
            keeps[m] = m.active_components().nonzero().flatten()
            m.freeze_structure(align=align)
        if trainer is not None and getattr(trainer, "strategy", None) is not None and trainer.optimizers:
            self._update_optimizers(trainer.optimizers, old, keeps)
            self._rewrap_ddp(trainer)

    def _update_optimizers(self, optimizers: list, old: dict, keeps: dict) -> None:
        for opt in optimizers:
            replace: dict[int, tuple[nn.Parameter, nn.Parameter | None, Tensor | None]] = {}
            for m, (w_in, w_out, widths, locs) in old.items():
                replace[id(w_in)] = (w_in, m.weight_in, keeps[m])
                replace[id(w_out)] = (w_out, m.weight_out, keeps[m])
                replace[id(widths)] = (widths, None, None)
                replace[id(locs)] = (locs, None, None)
            for group in opt.param_groups:
                new_params = []
                for p in group["params"]:
                    if id(p) not in replace:
                        new_params.append(p)
                        continue
                    old_p, new_p, keep = replace[id(p)]
                    state = opt.state.pop(old_p, None)
                    if new_p is None:
                        continue
                    if state:
                        opt.state[new_p] = {
                            k: (v[keep].clone() if torch.is_tensor(v) and v.shape == old_p.shape else v)
                            for k, v in state.items()
                        }
                    new_params.append(new_p)
                group["params"] = new_params

    @staticmethod
    def _rewrap_ddp(trainer: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

    # --------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gsm_structure"] = {name: m.structure() for name, m in self.gblr_layers}
        checkpoint["gsm_real_optimizer_steps"] = self.real_optimizer_steps
        checkpoint["gsm_phase1"] = {"end_ratio": self.phase1_end_ratio, "projection_delta": self.projection_delta}
        # The budget also in a key of our own: load_from_checkpoint(..., budget=x) overwrites the checkpoint's
        # hyper_parameters with x before on_load_checkpoint sees them.
        checkpoint["gsm_budget"] = self.budget
        if self.learner is not None:
            checkpoint["gsm_learner"] = self.learner.state_dict()
        checkpoint["gsm_rng"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild every GBLR layer for the checkpoint's structure before the weights load."""
        stored = checkpoint.get("gsm_structure")
        if stored is None:
            return
        mine = dict(self.gblr_layers)
        missing, extra = sorted(set(stored) - set(mine)), sorted(set(mine) - set(stored))
        if missing or extra:
            raise ValueError(
                "checkpoint structure does not match this model's GBLR layers: "
                f"in checkpoint only: {missing[:8]}; in model only: {extra[:8]} "
                "(was it trained with other include/exclude patterns or another backbone?)"
            )
        for name, s in stored.items():
            m = mine[name]
            shape = (s["in_features"], s["out_features"], s["rank_per_component"])
            if shape != (m.in_features, m.out_features, m.rank_per_component):
                raise ValueError(f"checkpoint layer '{name}' has in/out/rank {shape}, "
                                 f"model has {(m.in_features, m.out_features, m.rank_per_component)}")
            if s["num_components"] != m.num_components:
                m._resize(s["num_components"])
            m.frozen.fill_(bool(s["frozen"]))
            m._frozen_flag = bool(s["frozen"])
            m.widths.requires_grad_(not s["frozen"])
            m.locations.requires_grad_(not s["frozen"])
        ck_budget = checkpoint.get("gsm_budget", checkpoint.get("hyper_parameters", {}).get("budget"))
        if ck_budget is not None and not math.isclose(ck_budget, self.budget):
            warnings.warn(f"checkpoint was trained with budget {ck_budget:g}; this module targets {self.budget:g}. "
                          "The structure is restored from the checkpoint.", stacklevel=_user_stacklevel())
        self.real_optimizer_steps = int(checkpoint.get("gsm_real_optimizer_steps", 0))
        phase1 = checkpoint.get("gsm_phase1", {})
        self.phase1_end_ratio, self.projection_delta = phase1.get("end_ratio"), phase1.get("projection_delta")
        if self.learner is not None and "gsm_learner" in checkpoint:
            self.learner.load_state_dict(checkpoint["gsm_learner"])
        # The random state (dropout, drop-path, augmentation), which Lightning does not checkpoint: set when the
        # resumed fit starts training (on_train_start), not here, so that loading a checkpoint has no side effect.
        trainer = self._trainer
        self._rng_to_restore = (checkpoint.get("gsm_rng") if trainer is not None and trainer.state.fn == "fit"
                                else None)

    def on_train_start(self) -> None:
        """On resume: the train loader's place in the epoch and the random state, so that the resumed fit trains on
        the same batches with the same dropout as the run that saved the checkpoint."""
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        fit_loop = self.trainer.fit_loop
        pending = bool(getattr(fit_loop, "_combined_loader_states_to_load", None))
        if states is None and not pending:
            return
        # The random state S was saved after a batch (mid-epoch: the epoch's loader iterator exists and has drawn its
        # seed) or at an epoch end (the next epoch's iterator draws its seed from S): set S after, resp. before,
        # re-creating the iterator.
        mid_epoch = fit_loop.restarted_mid_epoch
        if states is not None and not mid_epoch:
            _set_rng_states(states)
        if pending and fit_loop.restarting:
            # Lightning applies the saved loader states only where it first builds the train loader, and
            # configure_optimizers (estimated_stepping_batches) builds it before the loops are restored, so the states
            # would be dropped (Lightning issue #20550): apply them here, then re-create the iterator from them.
            fit_loop._load_combined_loader_states()
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)
        if states is not None and mid_epoch:
            _set_rng_states(states)
