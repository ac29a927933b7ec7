"""Proof that the training-loop tests bite: break the package on purpose and check that the tests fail.

Each mutation below replaces one exact snippet of one file of ``gsm_lightning`` (it must occur exactly once, else the
mutation is reported as stale) in a temporary copy of the repository (``gsm_lightning/``, ``tests/``,
``benchmarks/``, ``pyproject.toml``; the working tree is never touched), then runs its chosen tests in that copy with pytest.  The
mutation is *killed* when pytest reports failing tests (exit status 1).  Before any mutation, the union of the chosen
tests runs on an unmutated copy and must pass, so a kill is the mutation's doing.

Run from the repository root (about 10 minutes on 2 busy CPU cores)::

    python tests/mutation/run_mutations.py                 # all mutations, then the kill-rate table
    python tests/mutation/run_mutations.py --list          # names and what each one breaks
    python tests/mutation/run_mutations.py --only no_learner_step switch_rerandomises_factors

The exit status is 0 when every mutation was killed.  ``python -m pytest -m slow tests/test_mutations.py`` runs it as a
test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TL = "tests/test_training_loop.py"
RESUME = "tests/test_resume.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files and -k selections


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("no_learner_step", "the learner/proximal step never runs during training", "gsm_lightning/training/module.py",
             "        self.real_optimizer_steps += 1\n        if self.phase != 1:\n            return\n",
             "        self.real_optimizer_steps += 1\n        if True:\n            return\n",
             (TL, "-k", "reaches_the_budget")),
    Mutation("learner_never_cuts", "the budget learner takes width steps but never cuts onto the path",
             "gsm_lightning/learn/budget_learner.py",
             "        if cut and (tau > 0 or (self.tracking",
             "        if False and (tau > 0 or (self.tracking",
             (TL, "-k", "reaches_the_budget")),
    Mutation("structure_lr_zero", "the structure group's learning rate is 0 (no width steps, locations frozen)",
             "gsm_lightning/learn/groups.py",
             '{"params": structure, "lr": structure_lr,',
             '{"params": structure, "lr": 0.0 * structure_lr,',
             (TL, "-k", "reaches_the_budget")),
    Mutation("prox_start_step_ignored", "shrinks and cuts start at the first step whatever the rule's start_step says",
             "gsm_lightning/training/module.py",
             "        active = self.real_optimizer_steps > self.rule.start_step\n",
             "        active = True\n",
             (TL, "-k", "prox_start_step")),
    Mutation("switch_rerandomises_factors", "the phase switch re-randomises the kept factors", "gsm_lightning/core/layer.py",
             "        self.weight_in.copy_(w_in)\n",
             "        self.weight_in.copy_(torch.randn_like(w_in) * w_in.std())\n",
             (TL, "-k", "switch_keeps")),
    Mutation("switch_drops_adam_state", "the Adam state of the kept components is dropped at the switch",
             "gsm_lightning/training/module.py",
             "                    if state:\n",
             "                    if False:\n",
             (TL, "-k", "switch_keeps")),
    Mutation("switch_keeps_wrong_adam_rows", "the kept Adam rows are the first K' instead of the kept components",
             "gsm_lightning/training/module.py",
             "(v[keep].clone() if torch.is_tensor(v)",
             "(v[:keep.numel()].clone() if torch.is_tensor(v)",
             (TL, "-k", "switch_keeps")),
    Mutation("frozen_not_flop_routed", "frozen layers are not routed through the FLOP-counted operator",
             "gsm_lightning/infer/flop_count.py",
             "\nset_frozen_route(_counted_route)\n",
             "\nset_frozen_route(None)\n",
             ("tests/test_flop_count.py", "-k", "routes")),
    Mutation("conversion_fit_keeps_structure", "the pretrained-conversion fit never moves widths/locations",
             "gsm_lightning/core/layer.py",
             '{"params": [self.widths, self.locations], "lr": structure_lr, "weight_decay": 0.0}',
             '{"params": [self.widths, self.locations], "lr": 0.0, "weight_decay": 0.0}',
             ("tests/test_conversion.py", "-k", "moves_widths")),
    Mutation("no_rank0_broadcast", "the switch no longer broadcasts rank 0's structure under DDP",
             "gsm_lightning/training/module.py",
             "        if trainer is not None and trainer.world_size > 1:\n",
             "        if False:\n",
             ("tests/test_ddp.py", "-k", "rank0")),
    Mutation("no_ddp_rewrap", "DDP is not re-wrapped after the switch replaced the parameters",
             "gsm_lightning/training/module.py",
             "            self._rewrap_ddp(trainer)\n",
             "            pass\n",
             ("tests/test_ddp.py", "-k", "agree")),
    Mutation("warmup_off_by_one", "the default schedule's warmup starts at 0 instead of 1/warmup",
             "gsm_lightning/learn/schedules.py",
             "            return (step + 1) / warmup_steps\n",
             "            return step / warmup_steps\n",
             (TL, "-k", "default_schedule")),
    Mutation("lm_labels_not_shifted", "a bare input_ids LM batch is not shifted into next-token labels",
             "gsm_lightning/training/module.py",
             "        return ids[:, :-1], labels[:, 1:]\n",
             "        return ids[:, :-1], labels[:, :-1]\n",
             (TL, "-k", "lm_task")),
    Mutation("budget_warning_lost", "a checkpoint of another budget loads without the warning",
             "gsm_lightning/training/module.py",
             '        checkpoint["gsm_budget"] = self.budget\n',
             "",
             (TL, "-k", "another_budget")),
    Mutation("loader_state_ignored", "the resumable loader ignores the state it is given", "gsm_lightning/data/datamodules.py",
             '        epoch, position = state.get("epoch"), int(state.get("batches", 0))\n',
             '        return\n        epoch, position = state.get("epoch"), int(state.get("batches", 0))\n',
             (RESUME, "-k", "mid_epoch")),
    Mutation("loader_state_not_applied_on_resume", "the workaround for Lightning #20550 is gone (states dropped)",
             "gsm_lightning/training/module.py",
             "            fit_loop._load_combined_loader_states()\n",
             "            pass\n",
             (RESUME, "-k", "mid_epoch")),
    Mutation("rng_not_restored", "the random state is not restored on a mid-epoch resume", "gsm_lightning/training/module.py",
             "        if states is not None and mid_epoch:\n",
             "        if False:\n",
             (RESUME, "-k", "mid_epoch")),
    Mutation("learner_state_not_checkpointed", "the budget learner's state is not saved in checkpoints",
             "gsm_lightning/training/module.py",
             '            checkpoint["gsm_learner"] = state\n',
             "            pass\n",
             (RESUME, "-k", "mid_epoch")),
    Mutation("energy_power_ignored", "the cut's energy weight is not raised to energy_power (the old rule, power 1)",
             "gsm_lightning/learn/budget_learner.py",
             "        if self.energy_power != 1.0:\n",
             "        if False:\n",
             ("tests/test_structure_recovery.py", "-k", "full_recipe")),
    Mutation("freeze_align_ignored", "the phase switch freezes on the unit grid whatever freeze_align says",
             "gsm_lightning/training/module.py",
             "            m.freeze_structure(align=align)\n",
             "            m.freeze_structure()\n",
             ("tests/test_module.py", "-k", "freeze_align")),
    Mutation("whole_model_check_ignored", "optimize_inference keeps the per-layer choice when the whole model is slower",
             "gsm_lightning/infer/inference.py",
             "        if report.model_ratio > 1.0 - float(min_model_gain):\n",
             "        if False:\n",
             ("tests/test_inference.py", "-k", "whole_model")),
    Mutation("rank_padding_dropped", "CompactGBLR(rank_multiple=8) builds unpadded blocks",
             "gsm_lightning/infer/compact.py",
             "            pad = padded_rank(rows.numel(), self.rank_multiple) - rows.numel()\n",
             "            pad = 0\n",
             ("tests/test_inference.py", "-k", "rank_padding")),
    Mutation("teacher_order_ignores_epoch", "the teacher-student order no longer depends on the epoch",
             "gsm_lightning/data/teacher.py",
             "        for _ in range(self.epoch):\n",
             "        for _ in range(0):\n",
             (RESUME, "-k", "teacher_student")),
    Mutation("distillation_dropped", "the teacher's loss is computed but not added to the training loss",
             "gsm_lightning/training/module.py",
             "        loss = d.weight * d(out, target)\n",
             "        loss = 0.0 * d(out, target)\n",
             ("tests/test_distillation.py", "-k", "label_free or resumes")),
    Mutation("teacher_trains", "the teacher is a registered submodule: trained, checkpointed, switched to train mode",
             "gsm_lightning/training/module.py",
             '        object.__setattr__(self, "teacher", make_teacher(backbone) if distillation is not None else None)\n',
             '        self.teacher = make_teacher(backbone) if distillation is not None else None\n',
             ("tests/test_distillation.py", "-k", "frozen_dense")),
    Mutation("calibration_ignored", "the calibrated conversion collects statistics but converts without them",
             "gsm_lightning/training/module.py",
             "        self._convert(calibration=stats)\n",
             "        self._convert()\n",
             ("tests/test_distillation.py", "-k", "runs_in_setup")),
    Mutation("teacher_not_broadcast", "under DDP each rank distils from its own copy of the backbone",
             "gsm_lightning/training/module.py",
             "        if self.teacher is not None and self.trainer.world_size > 1:\n",
             "        if False:\n",
             ("tests/test_ddp.py", "-k", "teacher")),
)


def copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gsm_lightning", "tests", "benchmarks"):  # benchmarks: the full-recipe recovery test runs its run_one
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def apply(mutation: Mutation, dest: Path) -> None:
    path = dest / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise LookupError(f"{mutation.path}: the snippet to mutate occurs {count} times (expected once)")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_pytest(dest: Path, args: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow or not slow", *args]
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def check_copy_is_imported(dest: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(dest)}
    out = subprocess.run([sys.executable, "-c", "import gsm_lightning; print(gsm_lightning.__file__)"], cwd=dest,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(dest.resolve()):
        raise RuntimeError(f"the copy in {dest} is not the package imported there ({out})")


def union_of_tests(mutations: list[Mutation]) -> tuple[str, ...]:
    """One pytest invocation covering every selection: the files, and their -k expressions or-ed."""
    files = list(dict.fromkeys(m.tests[0] for m in mutations))
    expressions = list(dict.fromkeys(m.tests[i + 1] for m in mutations for i, a in enumerate(m.tests) if a == "-k"))
    return (*files, "-k", " or ".join(f"({k})" for k in expressions))


def main(argv: list[str] | None = None) -> dict[str, str] | None:
    """Run the mutations; returns ``{name: "killed" | "SURVIVED" | "error (...)"}`` (``None`` for ``--list``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    opts = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not opts.only or m.name in opts.only]
    if opts.list:
        for m in MUTATIONS:
            print(f"{m.name:36s} {m.what}\n{'':36s} {m.path}; tests: {' '.join(m.tests)}")
        return None
    unknown = set(opts.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")

    work = Path(tempfile.mkdtemp(prefix="gsm_mutations_"))
    results: dict[str, str] = {}
    rows: list[tuple[str, str, float, str]] = []
    try:
        base = work / "baseline"
        copy_repo(base)
        check_copy_is_imported(base)
        for m in chosen:  # every snippet must exist in the current sources before anything runs
            apply(m, _scratch_copy_of(m, base, work))
        start = time.monotonic()
        code, log = run_pytest(base, union_of_tests(chosen), opts.timeout)
        if code != 0:
            print(log)
            raise SystemExit(f"the selected tests fail without any mutation (pytest exit status {code}): fix them first")
        print(f"baseline: the selected tests pass unmutated ({time.monotonic() - start:.0f} s)", flush=True)
        for m in chosen:
            dest = work / m.name
            if dest.exists():
                shutil.rmtree(dest)
            copy_repo(dest)
            apply(m, dest)
            start = time.monotonic()
            code, log = run_pytest(dest, m.tests, opts.timeout)
            status = {0: "SURVIVED", 1: "killed"}.get(code, f"error ({'timeout' if code == -1 else f'exit {code}'})")
            results[m.name] = status
            rows.append((m.name, status, time.monotonic() - start, " ".join(m.tests)))
            print(f"{m.name:36s} {status:10s} {rows[-1][2]:5.0f} s", flush=True)
            if code not in (0, 1):
                print(log)
            if not opts.keep:
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    killed = sum(s == "killed" for s in results.values())
    print("\n| mutation | result | seconds | tests |\n|---|---|---|---|")
    for name, status, secs, tests in rows:
        print(f"| {name} | {status} | {secs:.0f} | `{tests}` |")
    print(f"\nkill rate: {killed}/{len(results)}")
    return results


def _scratch_copy_of(m: Mutation, base: Path, work: Path) -> Path:
    """A throwaway copy of the one file ``m`` mutates, to check that its snippet is there."""
    scratch = work / "scratch" / m.name
    (scratch / m.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / m.path, scratch / m.path)
    return scratch


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome is None or (outcome and all(s == "killed" for s in outcome.values())) else 1)
