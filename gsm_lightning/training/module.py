"""``GSMModule``: a LightningModule that turns any backbone into a GBLR model and learns its structure.

Phase 1 (``phase1_epochs`` epochs): weights and structure (widths, locations) are trained; after every
real optimizer step the injected structure rule moves the widths toward the FLOPs ``budget``
(:class:`~gsm_lightning.learn.rules.BudgetRule`, the default: a cut onto a target path of the FLOPs ratio;
:class:`~gsm_lightning.learn.rules.PaperRule`: the paper's soft threshold while the ratio is above the budget) and
sigma is annealed.  Phase 2 (remaining epochs): the structure is frozen (hard boxcars,
integer widths, zero components dropped) and only the weights are fine-tuned.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from dataclasses import asdict, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..core.align import side_alignment
from ..core.calibration import padding_mask
from ..core.conversion_spec import Conversion
from ..core.flops import flops_ratio
from ..core.layer import GBLRLinear, gblr_layers
from ..core.mask_batch import prepare_masks, release_masks
from ..learn.groups import param_groups
from ..learn.proximal import project_model_to_budget
from ..learn.rules import StructureRule, build_rule
from ..learn.schedules import SigmaSchedule, cosine_warmup_lambda, set_sigma
from ..learn.switch import PhaseSwitch
from .distillation import Distillation, HiddenStates, make_teacher, teacher_outputs
from .legacy import split_legacy_kwargs

__all__ = ["GSMModule"]

Task = Literal["classification", "lm", "regression", "embedding"]


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from this module that points at the first frame outside
    gsm_lightning, torch and lightning: the caller's own code (e.g. their ``trainer.fit`` line)."""
    import lightning
    import lightning_utilities

    skip = tuple(os.path.dirname(m.__file__) for m in (sys.modules[__name__.split(".")[0]], torch, lightning, lightning_utilities, os))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


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


def _as(cls: type, value: Any, name: str) -> Any:
    """An instance of the dataclass ``cls`` from an instance, a mapping of its fields (as checkpoints store it) or
    None (its defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict) or hasattr(value, "keys"):
        try:
            return cls(**dict(value))
        except TypeError as e:
            raise ValueError(f"{name}: {e} (the fields of {cls.__name__} are "
                             f"{', '.join(f.name for f in fields(cls))})") from None
    raise ValueError(f"{name} must be a {cls.__name__} or a mapping of its fields, got {value!r}")


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
            variance of the targets) or ``"embedding"`` (outputs are vectors, e.g. sentence embeddings: the loss is the
            distillation loss, or ``1 - cos`` to ``(x, y)`` targets; logs ``val/cosine``).
        num_classes: classes for the metrics (classification).
        budget: target FLOPs ratio of the converted layers, in (0, 1].
        conversion: which layers become structured, as what (``method``: ``gblr``, ``dense`` or a fixed baseline),
            from which weights (``init``): a :class:`~gsm_lightning.core.conversion_spec.Conversion` (in YAML, its
            fields: ``conversion: {include: [...], init: pretrained}``).
        rule: the structure rule of phase 1, a :class:`~gsm_lightning.learn.rules.StructureRule` (in YAML
            ``class_path`` + ``init_args``).  Default: :class:`~gsm_lightning.learn.rules.BudgetRule`;
            :class:`~gsm_lightning.learn.rules.PaperRule` reproduces the paper's recipe.
        sigma: the sigma annealing of the Gaudi masks, a :class:`~gsm_lightning.learn.schedules.SigmaSchedule`
            (``sigma0`` until ``start_epoch``, then linear to ``sigma1`` at ``end_epoch``, updated after every
            optimizer step; ``end_epoch: null`` (default) = the start of the last phase-1 epoch; ``null`` sigmas =
            pure Dirichlet).
        phase1_epochs: epochs of structure learning; the structure is frozen at the start of the next
            epoch.  ``0`` freezes before training starts.
        switch: what the phase switch does besides freezing, a :class:`~gsm_lightning.learn.switch.PhaseSwitch`
            (``enforce_budget``: project onto the budget if phase 1 missed it; ``align``: snap windows to tiles).
        distillation: learn from a frozen dense teacher, the backbone's own weights copied before conversion (a
            :class:`~gsm_lightning.training.distillation.Distillation`: loss ``kl`` / ``mse`` / ``cosine``, weight,
            temperature, ``label_free``).  The teacher gets no gradients, stays in eval mode on the module's device
            and is kept out of checkpoints unless asked for.
        label_smoothing: for classification.
        optimizer: optimizer callable (LightningCLI ``OptimizerCallable``); default AdamW(lr 5e-4, wd 0.05).
        lr_scheduler: scheduler callable; default: linear warmup (``warmup_epochs``) then cosine, per step.
        warmup_epochs: warmup of the default scheduler.
        **legacy: the flat arguments of earlier versions (``include``, ``shrink``, ``prox_lambda``, ``sigma0``,
            ``freeze_align``, ...), translated into the objects above with a ``DeprecationWarning``
            (:func:`~gsm_lightning.training.legacy.split_legacy_kwargs`), so that old code and old checkpoints load.

    Examples::

        GSMModule(timm_model, num_classes=1000, budget=0.3,
                  conversion=Conversion(include=["blocks.*.attn.qkv", "blocks.*.mlp.fc*"]),
                  rule=BudgetRule(path_fraction=0.3), sigma=SigmaSchedule(1.0, 100.0, start_epoch=5))
    """

    #: phase 1 computes the masks of all layers in one call per mask length before each training forward
    #: (:func:`~gsm_lightning.core.mask_batch.prepare_masks`; the same masks and gradients, fewer kernel launches);
    #: ``False`` computes them layer by layer, as before (kept for the benchmark's comparison)
    batch_masks: bool = True
    #: at the start of each phase-1 epoch, components empty on both sides are dropped from the layers (they add
    #: nothing, get no gradient and never come back: :meth:`GBLRLinear.drop_empty_components`), with their optimizer
    #: and rule state, so the rest of phase 1 stops updating and gathering them; ``False`` keeps them to the switch
    drop_empty: bool = True
    _dropped_epoch: int = -1  # the epoch whose start dropped them (a resume within that epoch does not drop again)

    def __init__(
        self,
        backbone: nn.Module,
        task: Task = "classification",
        num_classes: int | None = None,
        budget: float = 0.3,
        conversion: Conversion | None = None,
        rule: StructureRule | None = None,
        sigma: SigmaSchedule | None = None,
        phase1_epochs: int = 1,
        switch: PhaseSwitch | None = None,
        distillation: Distillation | None = None,
        label_smoothing: float = 0.1,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_epochs: float = 0.0,
        **legacy: Any,
    ) -> None:
        super().__init__()
        if legacy:
            conversion, rule, sigma, switch = split_legacy_kwargs(legacy, conversion, rule, sigma, switch,
                                                                  stacklevel=_user_stacklevel())
        conversion = _as(Conversion, conversion, "conversion")
        sigma = _as(SigmaSchedule, sigma, "sigma")
        switch = _as(PhaseSwitch, switch, "switch")
        rule = build_rule(rule)
        if task not in ("classification", "lm", "regression", "embedding"):
            raise ValueError(f"unknown task {task!r}; expected 'classification', 'lm', 'regression' or 'embedding'")
        distillation = None if distillation is None else _as(Distillation, distillation, "distillation")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {budget!r}")
        if int(phase1_epochs) != phase1_epochs or phase1_epochs < 0:
            raise ValueError(f"phase1_epochs must be a non-negative integer, got {phase1_epochs}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        # The policies are stored as plain configs (checkpoints stay loadable with weights_only=True, and
        # load_from_checkpoint rebuilds them from these dicts).
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "conversion", "rule", "sigma", "switch",
                                          "distillation", "legacy"])
        self.hparams.update(conversion=conversion.config(), rule=rule.config(), sigma=asdict(sigma),
                            switch=switch.config(), distillation=asdict(distillation) if distillation else None)
        for name in legacy:  # stored in the new form above, not as the flat names
            self.hparams.pop(name, None)
        self.backbone = backbone
        self.task = task
        self.budget = float(budget)
        self.phase1_epochs = int(phase1_epochs)
        self.conversion = conversion
        self.method = conversion.method
        self.rule = rule
        self.rule.bind(self.budget)
        self.switch = switch
        self.label_smoothing = float(label_smoothing)
        self.warmup_epochs = float(warmup_epochs)
        self.sigma_schedule = sigma.resolved(self.phase1_epochs)
        self._steps_per_epoch: float = 0.0  # optimizer steps per epoch, for the per-step sigma (configure_optimizers)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.real_optimizer_steps = 0
        self._last_prox: dict[str, float] = {}
        # FLOPs ratio when phase 1 ended (before any projection) and how much the projection moved it.
        self.phase1_end_ratio: float | None = None
        self.projection_delta: float | None = None

        self.distillation = distillation
        # the dense teacher: a frozen copy made before conversion, held outside the module tree (not in state_dict,
        # not wrapped by DDP, not switched to train mode); _apply moves it with the module
        object.__setattr__(self, "teacher", make_teacher(backbone) if distillation is not None else None)
        self._hidden = (HiddenStates(distillation.hidden, distillation.hidden_loss)
                        if distillation is not None and distillation.hidden else None)
        self._hidden_value: Tensor | None = None
        if self._hidden is not None:
            self._hidden.match(backbone)  # a pattern that matches nothing is named now, not at the first step
        self.report = None
        # A calibrated conversion needs data: it runs in setup() (or convert(batches)), before the optimizer exists.
        self.converted = conversion.calibration is None
        if self.converted:
            self._convert()
        self._setup_metrics(num_classes)

    def _convert(self, calibration: Any = None, skeleton: bool = False, layer_budgets: Any = None) -> None:
        conversion = self.conversion
        self._converted(conversion.apply(self.backbone, self._conversion_budget(), self.rule.layer_defaults(conversion.init),
                                         calibration=calibration, skeleton=skeleton, layer_budgets=layer_budgets))

    def _conversion_budget(self) -> float:
        """The FLOPs ratio the conversion fits at: the budget, or above it for a pretrained GBLR conversion whose rule
        starts wider (:meth:`~gsm_lightning.learn.rules.StructureRule.conversion_budget`)."""
        if self.method != "gblr" or self.conversion.init != "pretrained":
            return self.budget
        start = float(self.rule.conversion_budget(self.budget))
        if not self.budget <= start <= 1:
            raise ValueError(f"{type(self.rule).__name__}.conversion_budget({self.budget:g}) = {start:g}: a conversion "
                             "starts between the budget and 1")
        return start

    def _converted(self, report: Any) -> None:
        conversion = self.conversion
        self.report = report
        self.converted = True
        if self.method == "gblr" and conversion.init == "random":
            initial = self.report.flops_ratio
            if self.budget > initial + 1e-9:
                raise ValueError(
                    f"target FLOPs ratio (budget) {self.budget:g} is above the initial ratio {initial:.4f} of the "
                    "converted layers; structure learning only shrinks widths: lower the budget or start wider "
                    "(conversion.layer_kwargs.width_init)"
                )

    @torch.no_grad()
    def convert(self, batches: Any = None) -> None:
        """Run the pending calibrated conversion on ``batches`` (training batches as the data module yields them;
        their inputs go through the dense backbone).  ``setup`` calls it with the first ``conversion.calibration.
        batches`` batches of the data module's training loader; call it yourself to convert without a Trainer."""
        from ..core.calibration import collect_input_stats, convert_sequentially

        if self.converted:
            raise RuntimeError("this module's backbone is already converted")
        cal = self.conversion.calibration
        if batches is None:
            raise ValueError("a calibrated conversion needs batches: GSMModule.convert(batches)")
        names = self.conversion.layer_names(self.backbone)
        if not names:
            raise ValueError(f"the conversion's include patterns {self.conversion.include_for(self.backbone)!r} select no "
                             "linear layer of the backbone: nothing to calibrate")
        forward = lambda model, batch: model(self._unpack(batch)[0])  # noqa: E731
        token_mask = padding_mask if cal.mask_padding else None
        allocation = self.conversion.allocation
        measured = not isinstance(allocation, str)
        # a measured allocation and a sequential conversion run the batches again
        batches = list(batches) if measured or cal.sequential else batches
        stats = budgets = None
        if measured or not cal.sequential or allocation == "global":  # the dense model's statistics
            stats = collect_input_stats(self.backbone, batches, layers=names, forward=forward, diagonal=cal.diagonal,
                                        token_mask=token_mask)
        if measured:
            budgets = allocation.layer_budgets(self.backbone, self._conversion_budget(), stats, batches, forward)
        if not cal.sequential:
            self._convert(calibration=stats, layer_budgets=budgets)
            return
        if allocation == "global":  # the ranks are chosen on the dense model, then fitted group by group
            budgets = self.conversion.global_layer_budgets(self.backbone, self._conversion_budget(), stats)
        stats = None  # freed: each group is fitted on its own statistics in the partly converted model
        defaults = self.rule.layer_defaults(self.conversion.init)
        reports = convert_sequentially(
            self.backbone, batches, names,
            lambda student, group, group_stats: self.conversion.apply(
                student, self._conversion_budget(), defaults, calibration=group_stats, layer_budgets=budgets,
                names=group),
            forward=forward, diagonal=cal.diagonal, damp=cal.damp, token_mask=token_mask)
        report = dataclasses.replace(reports[0], layers=[layer for r in reports for layer in r.layers])
        if allocation == "global":
            report.allocation = "global"
        self._converted(report)

    def setup(self, stage: str) -> None:
        if self.converted:
            return
        trainer = self._trainer
        if stage == "fit" and trainer is not None and trainer.ckpt_path:
            self._convert(skeleton=True)  # resuming: the weights and structure come from the checkpoint
            return
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            raise ValueError("conversion.calibration runs training batches through the dense model before converting: "
                             "give the Trainer a datamodule (trainer.fit(module, datamodule=...)), or call "
                             "module.convert(batches) before fitting")
        import itertools

        from lightning.pytorch.utilities import move_data_to_device

        device = trainer.strategy.root_device
        self.backbone.to(device)
        count = self.conversion.calibration.batches
        batches = (move_data_to_device(b, device) for b in itertools.islice(iter(datamodule.train_dataloader()), count))
        self.convert(batches)

    def structure_state(self) -> dict[str, Any]:
        """The run's numbers besides its layers, for the structure scalars and reports: the budget, the rule's current
        target (phase 1), the FLOPs ratio phase 1 ended at and the projection at the switch."""
        return {"budget": self.budget, "target_path": self.rule.target() if self.phase == 1 else None,
                "phase1_end_ratio": self.phase1_end_ratio, "projection_delta": self.projection_delta}

    @property
    def learner(self):
        """The :class:`~gsm_lightning.learn.budget_learner.BudgetLearner` of a :class:`BudgetRule` (None for other
        rules)."""
        return getattr(self.rule, "learner", None)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> GSMModule:
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "teacher", None) is not None:
            self.teacher._apply(fn)
        return self

    # ------------------------------------------------------------ metrics
    def _setup_metrics(self, num_classes: int | None) -> None:
        import torchmetrics

        if self.task == "embedding":
            return
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
        return 1 if self.method == "gblr" and not self.structure_frozen else 2

    def flops_ratio(self) -> float:
        """FLOPs-weighted ratio of the converted layers (GBLR or baselines) to their dense versions."""
        if self.method == "gblr":
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
        if self.distillation is not None and self.distillation.label_free:
            return batch, None
        if self.task == "embedding" and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("task='embedding' without labels needs a teacher: set distillation: {loss: cosine, "
                             "label_free: true}, or give (inputs, target embeddings) batches")
        if self.task != "lm":
            return batch[0], batch[1]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        labels = batch.get("labels", ids) if isinstance(batch, dict) else ids
        return ids[:, :-1], labels[:, 1:]

    def _objective(self, x: Any, out: Tensor, y: Any, smoothing: float) -> tuple[Tensor, Tensor | None]:
        """(loss, teacher outputs or None): the task loss on labels and/or the distillation loss to the teacher."""
        d = self.distillation
        if d is None:
            return self._loss(out, y, smoothing), None
        target = teacher_outputs(self.teacher, x)
        loss = d.weight * d(out, target)
        if self._hidden is not None and self._hidden.names and d.hidden_weight > 0:
            hidden = self._hidden.loss(padding_mask(x))
            self._hidden_value = hidden.detach()
            loss = loss + d.hidden_weight * hidden
        if d.uses_labels and y is not None:
            loss = loss + d.task_weight * self._loss(out, y, smoothing)
        return loss, target

    def _loss(self, logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
        if self.task == "embedding":
            return (1 - F.cosine_similarity(logits.float(), y.float(), dim=-1)).mean()
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
        structure_lr = lrs.get("structure", self.rule.structure_lr)
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
        prepared = 0
        try:
            # phase 1: every layer's masks in one call per mask length (core.mask_batch), used by this forward
            if self.batch_masks and self.method == "gblr" and not self.structure_frozen:
                prepared = prepare_masks(self.backbone)
            if self._hidden is not None:
                self._hidden.begin(self.backbone, self.teacher)
            logits = self(x)
            if self.method == "gblr" and not self.structure_frozen:
                self.rule.observe_output(logits)  # a rule's own backward from the output (SensitivityRule)
            loss, _ = self._objective(x, logits, y, self.label_smoothing)
        except FloatingPointError as e:  # a GBLR layer's non-finite structure: add the rates and the likely cause
            raise FloatingPointError(f"{e} ({self._non_finite_hint(x)})") from None
        finally:
            if prepared:
                release_masks(self.backbone)
            if self._hidden is not None:
                self._hidden.end()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx}, "
                f"global step {self.global_step}: {self._non_finite_hint(x)}"
            )
        self.log("train/loss", loss, prog_bar=True)
        if self._hidden is not None and self._hidden_value is not None:
            self.log("train/hidden_loss", self._hidden_value)
        if self.task == "classification" and y is not None:
            self.train_acc(logits.detach(), y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self._unpack(batch)
        self._check_labels(y)
        if self._hidden is not None:
            self._hidden.begin(self.backbone, self.teacher)
        try:
            logits = self(x)
            loss, target = self._objective(x, logits, y, 0.0)
        finally:
            if self._hidden is not None:
                self._hidden.end()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        if self._hidden is not None and self._hidden_value is not None:
            self.log(f"{stage}/hidden_loss", self._hidden_value, sync_dist=True)
        if self.task == "embedding":
            ref = target if target is not None else y
            cos = F.cosine_similarity(logits.float(), ref.float(), dim=-1).mean()
            self.log(f"{stage}/cosine", cos, prog_bar=stage == "val", sync_dist=True,
                     batch_size=logits.shape[0])
        elif y is None:
            pass  # label-free: the distillation loss is the only measure
        elif self.task == "regression":
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
        if self.task == "embedding":
            return self(x)
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
        widths_apart = self.rule.moves_widths
        self._steps_per_epoch = self._phase1_steps() / self.phase1_epochs if self.phase1_epochs else 0.0
        groups = param_groups(self, self.rule.structure_lr, widths_apart=widths_apart)
        self.rule.start(self._phase1_steps())
        self.rule.attach(self.backbone)
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
        warmup = int(round(self.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_warmup_lambda(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs once per REAL optimizer step (not per micro-batch, not on AMP-skipped steps)."""
        self.real_optimizer_steps += 1
        if self.phase != 1:
            return
        group = next((g for g in optimizer.param_groups if g.get("name") == "structure"), optimizer.param_groups[0])
        active = self.real_optimizer_steps > self.rule.start_step
        self._last_prox = self.rule.step(self.backbone, group["lr"], active=active)
        self._anneal_sigma()

    def sigma_epoch(self) -> float:
        """Position in the sigma schedule: optimizer steps so far in epochs (the epoch index when the steps per
        epoch are unknown, e.g. before fit or with an iterable dataset)."""
        if self._steps_per_epoch > 0:
            return self.real_optimizer_steps / self._steps_per_epoch
        return float(self.current_epoch) if self._trainer is not None else 0.0

    def _anneal_sigma(self) -> None:
        if self.method == "gblr" and self.phase == 1:
            set_sigma(self.backbone, self.sigma_schedule(self.sigma_epoch()))

    # ------------------------------------------------------------- phases
    def on_fit_start(self) -> None:
        if self.teacher is not None and self.trainer.world_size > 1:
            # one teacher for all ranks (rank 0's), as DDP gives the student rank 0's weights
            with torch.no_grad():
                for t in [*self.teacher.parameters(), *self.teacher.buffers()]:
                    t.copy_(self.trainer.strategy.broadcast(t.detach().clone(), src=0))
        max_epochs = self.trainer.max_epochs
        if self.method == "gblr" and max_epochs is not None and max_epochs >= 0 and self.phase1_epochs > max_epochs:
            raise ValueError(
                f"phase1_epochs={self.phase1_epochs} is beyond trainer.max_epochs={max_epochs}: the structure would never "
                "be frozen; lower phase1_epochs or raise max_epochs"
            )
        if (self.method == "gblr" and max_epochs is not None and 0 < max_epochs == self.phase1_epochs
                and self.phase == 1):
            warnings.warn(
                f"phase1_epochs={self.phase1_epochs} equals trainer.max_epochs={max_epochs}: the structure is frozen at "
                f"the start of epoch {self.phase1_epochs}, which this run never reaches, so it ends in phase 1 (soft "
                f"masks, FLOPs ratio not projected onto the budget {self.budget:g}, no phase-2 fine-tuning). Raise "
                "max_epochs above phase1_epochs, or call module.freeze_structure() after fit",
                stacklevel=_user_stacklevel())

    def on_train_epoch_end(self) -> None:
        """Collapse guard: warn (once per layer) when structure learning drove a layer to 0 FLOPs."""
        if self.method != "gblr" or self.phase != 1:
            return
        warned = self.__dict__.setdefault("_collapse_warned", set())
        dead = [n for n, m in gblr_layers(self.backbone, include_frozen=False) if n not in warned and m.flops() == 0]
        if not dead:
            return
        warned.update(dead)
        rule = self.rule.describe()
        warnings.warn(
            f"epoch {self.current_epoch}: GBLR layer(s) {', '.join(repr(n) for n in dead[:8])}"
            f"{' ...' if len(dead) > 8 else ''} fell to 0 FLOPs (every component has zero width: the layer only adds "
            f"its bias). Likely cause: {rule} is too high, or the budget {self.budget:g} is too low for these layers. "
            "Lower structure_lr, raise the budget, or exclude the layers", stacklevel=_user_stacklevel())

    def on_train_epoch_start(self) -> None:
        if self.method != "gblr":
            return
        epoch = self.current_epoch
        if self.phase == 1 and epoch >= self.phase1_epochs:
            try:
                self.freeze_structure()
            except FloatingPointError as e:  # a non-finite structure at the switch: the rates and the likely cause
                raise FloatingPointError(f"{e} ({self._non_finite_hint()})") from None
        elif self.phase == 1 and self.drop_empty and epoch > self._dropped_epoch:
            self._dropped_epoch = epoch
            self.drop_empty_components()
        self._anneal_sigma()
        self.log("gsm/epoch_start_flops_ratio", self.flops_ratio(), on_step=False, on_epoch=True, prog_bar=True, sync_dist=False)

    @torch.no_grad()
    def drop_empty_components(self) -> int:
        """Drop the components empty on both sides from every layer still learning its structure
        (:meth:`GBLRLinear.drop_empty_components`: the function and every gradient stay as they are), with their rows
        of the optimizer's state and the rule's per-component state; DDP re-wrapped for the new parameters.  Nothing
        is dropped when the rule keeps per-component state it cannot drop (``rule.drop_components`` returns False).
        Returns the number of components dropped."""
        named = gblr_layers(self.backbone, include_frozen=False)
        self._broadcast_structure([m for _, m in named])  # the same components on every rank
        sizes = {name: m.num_components for name, m in named}
        found = {name: keep for name, m in named if (keep := m.live_components()) is not None and keep.numel() > 0}
        if not found or not self.rule.drop_components(found, sizes):
            return 0
        old, keeps = {}, {}
        for name, m in named:
            if name in found:
                old[m] = (m.weight_in, m.weight_out, m.widths, m.locations)
                keeps[m] = m.drop_empty_components()
        self._replace_parameters(old, keeps, structure_kept=True)
        return sum(sizes[name] - int(keep.numel()) for name, keep in found.items())

    @torch.no_grad()
    def freeze_structure(self) -> None:
        """Phase switch: identical structure on every rank (broadcast from rank 0), budget enforced,
        hard boxcars, zero components dropped; optimizer groups updated in place (Adam state of kept
        components carried over), DDP re-wrapped for the new parameters."""
        layers = [m for _, m in gblr_layers(self.backbone, include_frozen=False)]
        if not layers:
            return
        self._broadcast_structure(layers)
        self.rule.finish(self.backbone)
        before = flops_ratio(layers)
        self.phase1_end_ratio, self.projection_delta = before, 0.0
        if self.switch.enforce_budget and before > self.budget:
            project_model_to_budget(self.backbone, self.budget)
            after = flops_ratio(layers)
            self.projection_delta = before - after
            if self.projection_delta > 0.02:
                hint = self.rule.hint_for_projection()
                warnings.warn(
                    f"phase 1 ended at FLOPs ratio {before:.4f}, above the budget {self.budget:g}: the widths were "
                    f"projected onto the budget before freezing (ratio {before:.4f} -> {after:.4f}, a cut of "
                    f"{self.projection_delta:.4f} the learner did not make). To reach it by learning, {hint}.",
                    stacklevel=_user_stacklevel())
        align = self.switch.align
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
        self._replace_parameters(old, keeps)

    def _broadcast_structure(self, layers: list[GBLRLinear]) -> None:
        """Under DDP, rank 0's widths, locations and sigma on every rank (a no-op in one process)."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            for m in layers:
                for t in (m.widths, m.locations, m.sigma):
                    t.copy_(trainer.strategy.broadcast(t.detach().clone(), src=0))

    def _replace_parameters(self, old: dict, keeps: dict, structure_kept: bool = False) -> None:
        """After layers replaced their parameters (``old[m]`` -> ``m``'s, components ``keeps[m]`` kept): the optimizers
        take the new ones with the kept state (:meth:`_update_optimizers`) and DDP is re-wrapped around them."""
        trainer = self._trainer
        if trainer is not None and getattr(trainer, "strategy", None) is not None and trainer.optimizers:
            self._update_optimizers(trainer.optimizers, old, keeps, structure_kept)
            self._rewrap_ddp(trainer)

    def _update_optimizers(self, optimizers: list, old: dict, keeps: dict, structure_kept: bool = False) -> None:
        """Put each layer's new parameters in place of ``old`` ones in the optimizers, with the state of the kept
        components (rows ``keeps[m]`` of the factors; columns of the widths and locations with ``structure_kept``,
        which are dropped from the optimizers otherwise: frozen)."""
        for opt in optimizers:
            replace: dict[int, tuple[nn.Parameter, nn.Parameter | None, Tensor | None, int]] = {}
            for m, (w_in, w_out, widths, locs) in old.items():
                replace[id(w_in)] = (w_in, m.weight_in, keeps[m], 0)
                replace[id(w_out)] = (w_out, m.weight_out, keeps[m], 0)
                replace[id(widths)] = (widths, m.widths if structure_kept else None, keeps[m], 1)
                replace[id(locs)] = (locs, m.locations if structure_kept else None, keeps[m], 1)
            for group in opt.param_groups:
                new_params = []
                for p in group["params"]:
                    if id(p) not in replace:
                        new_params.append(p)
                        continue
                    old_p, new_p, keep, dim = replace[id(p)]
                    state = opt.state.pop(old_p, None)
                    if new_p is None:
                        continue
                    if state:
                        opt.state[new_p] = {
                            k: (v.index_select(dim, keep) if torch.is_tensor(v) and v.shape == old_p.shape else v)
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
        checkpoint["gsm_dropped_epoch"] = self._dropped_epoch
        checkpoint["gsm_phase1"] = {"end_ratio": self.phase1_end_ratio, "projection_delta": self.projection_delta}
        # The budget also in a key of our own: load_from_checkpoint(..., budget=x) overwrites the checkpoint's
        # hyper_parameters with x before on_load_checkpoint sees them.
        checkpoint["gsm_budget"] = self.budget
        state = self.rule.state_dict()
        if state:
            checkpoint["gsm_learner"] = state
        checkpoint["gsm_rng"] = _rng_states()
        if self.distillation is not None and self.distillation.keep_in_checkpoint:
            checkpoint["gsm_teacher"] = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild every GBLR layer for the checkpoint's structure before the weights load."""
        if not self.converted:  # a calibrated module loaded from a checkpoint: its layers come from the file
            self._convert(skeleton=True)
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
            m.restore_structure(s)
        ck_budget = checkpoint.get("gsm_budget", checkpoint.get("hyper_parameters", {}).get("budget"))
        if ck_budget is not None and not math.isclose(ck_budget, self.budget):
            warnings.warn(f"checkpoint was trained with budget {ck_budget:g}; this module targets {self.budget:g}. "
                          "The structure is restored from the checkpoint.", stacklevel=_user_stacklevel())
        self.real_optimizer_steps = int(checkpoint.get("gsm_real_optimizer_steps", 0))
        self._dropped_epoch = int(checkpoint.get("gsm_dropped_epoch", -1))
        phase1 = checkpoint.get("gsm_phase1", {})
        self.phase1_end_ratio, self.projection_delta = phase1.get("end_ratio"), phase1.get("projection_delta")
        if self.teacher is not None and "gsm_teacher" in checkpoint:
            self.teacher.load_state_dict(checkpoint["gsm_teacher"])
        if "gsm_learner" in checkpoint:
            self.rule.load_state_dict(checkpoint["gsm_learner"])
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
