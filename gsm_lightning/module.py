"""``GSMModule``: a LightningModule that turns any backbone into a GBLR model and learns its structure.

Phase 1 (``phase1_epochs`` epochs): weights and structure (widths, locations) are trained; after every
real optimizer step the widths are soft-thresholded while the FLOPs ratio is above ``budget`` and
sigma is annealed per epoch.  Phase 2 (remaining epochs): the structure is frozen (hard boxcars,
integer widths, zero components dropped) and only the weights are fine-tuned.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

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

Task = Literal["classification", "lm"]
Method = Literal["gblr", "dense", "lowrank", "monarch", "blocksparse"]


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)


class GSMModule(LightningModule):
    """Train any backbone with GBLR layers under a FLOPs budget.

    Args:
        backbone: any ``nn.Module`` (in YAML: ``class_path`` + ``init_args``).  Classification
            backbones map images to logits; LM backbones map ``input_ids`` to logits ``(B, T, V)``.
        task: ``"classification"`` (cross-entropy with label smoothing, accuracy/top-5) or ``"lm"``
            (next-token loss, perplexity).
        num_classes: classes for the metrics (classification).
        budget: target FLOPs ratio of the converted layers, in (0, 1].
        include / exclude: glob or ``re:`` patterns of layers to convert (default: the backbone's
            ``gsm_default_include`` if it has one, else every linear layer).
        init: ``"random"`` (SVD of trunc-normal, ``width_init``) or ``"pretrained"`` (fit the backbone's
            own weights to the budget).
        method: ``"gblr"`` (learned structure), ``"dense"`` (no conversion) or a fixed baseline
            (``"lowrank"``, ``"monarch"``, ``"blocksparse"``) at the same budget.
        layer_kwargs: extra :class:`GBLRLinear` arguments (``rank_per_component``, ``width_init``, ...).
        fit_steps: fitting steps of the pretrained conversion.
        phase1_epochs: epochs of structure learning; the structure is frozen at the start of the next
            epoch.  ``0`` freezes before training starts.
        prox_lambda: proximal threshold ``lambda``; the shrink per step is ``lambda * lr_structure``.
        prox_start_step: optimizer steps before the shrink may start.
        structure_lr: learning rate of widths and locations (AdamW, betas (0, 0.999), no decay).
        sigma0 / sigma1 / sigma_start_epoch / sigma_end_epoch: sigma annealing (``None`` = pure
            Dirichlet); ``sigma_end_epoch`` defaults to ``phase1_epochs``.
        enforce_budget_at_freeze: project the widths onto the budget when freezing if phase 1 did not
            reach it (a warning says so).
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
        prox_lambda: float = 0.02,
        prox_start_step: int = 0,
        structure_lr: float = 5e-3,
        sigma0: float | None = 1.0,
        sigma1: float | None = 100.0,
        sigma_start_epoch: int = 0,
        sigma_end_epoch: int | None = None,
        enforce_budget_at_freeze: bool = True,
        label_smoothing: float = 0.1,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if task not in ("classification", "lm"):
            raise ValueError(f"unknown task {task!r}; expected 'classification' or 'lm'")
        if method not in ("gblr", "dense", "lowrank", "monarch", "blocksparse"):
            raise ValueError(f"unknown method {method!r}; expected gblr, dense, lowrank, monarch or blocksparse")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {budget!r}")
        if int(phase1_epochs) != phase1_epochs or phase1_epochs < 0:
            raise ValueError(f"phase1_epochs must be a non-negative integer, got {phase1_epochs}")
        if not prox_lambda >= 0 or not structure_lr > 0:
            raise ValueError(f"prox_lambda must be >= 0 and structure_lr > 0, got {prox_lambda}, {structure_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.backbone = backbone
        self.task = task
        self.budget = float(budget)
        self.phase1_epochs = int(phase1_epochs)
        self.sigma_schedule = SigmaSchedule(
            sigma0, sigma1, sigma_start_epoch,
            max(self.phase1_epochs, sigma_start_epoch) if sigma_end_epoch is None else sigma_end_epoch,
        )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.real_optimizer_steps = 0
        self._last_prox: dict[str, float] = {}

        if include is None:
            include = getattr(backbone, "gsm_default_include", None)
        if method == "gblr":
            self.report = gsmify(backbone, budget=budget, include=include, exclude=exclude, init=init,
                                 fit_steps=fit_steps, **(layer_kwargs or {}))
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
                                     init=init)
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
        if self.task == "lm":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._unpack(batch)
        logits = self(x)
        loss = self._loss(logits, y, self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx}, "
                f"global step {self.global_step}: lower the learning rates or check the data"
            )
        self.log("train/loss", loss, prog_bar=True)
        if self.task == "classification":
            self.train_acc(logits.detach(), y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self._unpack(batch)
        logits = self(x)
        loss = self._loss(logits, y, 0.0)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        if self.task == "classification":
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
    def configure_optimizers(self) -> Any:
        groups = param_groups(self, self.hparams.structure_lr)
        optimizer = self.optimizer_factory(groups)
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
        group = next(g for g in optimizer.param_groups if g.get("name") == "structure")
        self._last_prox = proximal_step(
            self.backbone, self.hparams.prox_lambda, group["lr"], self.budget,
            shrink=self.real_optimizer_steps > self.hparams.prox_start_step,
        )

    # ------------------------------------------------------------- phases
    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if self.hparams.method == "gblr" and max_epochs is not None and max_epochs >= 0 and self.phase1_epochs > max_epochs:
            raise ValueError(
                f"phase1_epochs={self.phase1_epochs} is beyond trainer.max_epochs={max_epochs}: the structure would never "
                "be frozen; lower phase1_epochs or raise max_epochs"
            )

    def on_train_epoch_start(self) -> None:
        if self.hparams.method != "gblr":
            return
        epoch = self.current_epoch
        if self.phase == 1 and epoch >= self.phase1_epochs:
            self.freeze_structure()
        if self.phase == 1:
            set_sigma(self.backbone, self.sigma_schedule(epoch))
        self.log("gsm/flops_ratio", self.flops_ratio(), on_step=False, on_epoch=True, prog_bar=True, sync_dist=False)

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
        if self.hparams.enforce_budget_at_freeze and flops_ratio(layers) > self.budget:
            before = flops_ratio(layers)
            project_model_to_budget(self.backbone, self.budget)
            warnings.warn(
                f"phase 1 ended at FLOPs ratio {before:.4f} above the budget {self.budget:g}; widths were projected "
                f"onto the budget before freezing (ratio now {flops_ratio(layers):.4f}). Raise prox_lambda or "
                "phase1_epochs to reach it by learning.", stacklevel=2)
        old = {m: (m.weight_in, m.weight_out, m.widths, m.locations) for m in layers}
        keeps = {}
        for m in layers:
            keeps[m] = m.active_components().nonzero().flatten()
            m.freeze_structure()
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
            m.widths.requires_grad_(not s["frozen"])
            m.locations.requires_grad_(not s["frozen"])
        ck_budget = checkpoint.get("hyper_parameters", {}).get("budget")
        if ck_budget is not None and not math.isclose(ck_budget, self.budget):
            warnings.warn(f"checkpoint was trained with budget {ck_budget:g}; this module targets {self.budget:g}. "
                          "The structure is restored from the checkpoint.", stacklevel=2)
        self.real_optimizer_steps = int(checkpoint.get("gsm_real_optimizer_steps", 0))
