"""Structure recovery: teacher-student regression on teachers of known GBLR structure.

Each teacher ``y = W* x`` (see :mod:`gsm_lightning.data.teacher`) is learned by students at the teacher's
exact FLOPs (GBLR accounting): learned GBLR through ``GSMModule`` with its defaults, fixed low-rank,
Monarch, block-sparse, a random fixed GBLR structure, and dense.  All students get the same epochs,
optimizer and schedule.  Reported: relative test MSE (MSE over the targets' variance, noise-free test
targets), the FLOPs ratio reached by learning (at the end of phase 1, before any projection), the
projection the switch had to make, and the support IoU of GBLR students against the teacher.

    python benchmarks/structure_recovery.py                         # all teachers, 3 seeds, writes BENCHMARKS.md
    python benchmarks/structure_recovery.py --teachers low_rank --students gblr,lowrank --seeds 0
    python benchmarks/structure_recovery.py --gblr shrink=paper     # the paper's rule (ablations: any GSMModule arg)

One run is 5-20 s on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/structure_recovery.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from benchmarks.common import parse_overrides, write_section  # noqa: E402
from gsm_lightning.core.layer import gblr_layers  # noqa: E402
from gsm_lightning.data.teacher import (  # noqa: E402
    TEACHERS,
    TeacherStudentDataModule,
    Window,
    make_teacher,
    support_iou,
    windows_support,
)
from gsm_lightning.training.module import GSMModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("gblr", "lowrank", "monarch", "blocksparse", "random_gblr", "dense")
START, END = "<!-- recovery:start -->", "<!-- recovery:end -->"
ABL_START, ABL_END = "<!-- recovery-ablation:start -->", "<!-- recovery-ablation:end -->"
# Ablation variants of the gblr student: label -> GSMModule overrides (on top of the defaults).
VARIANTS = {
    "default": {},
    "paper": {"shrink": "paper"},
    "paper_l0.3": {"shrink": "paper", "prox_lambda": 0.3},
    "dual": {"tracking": "dual"},
    "no_energy": {"cut_weighting": "flops"},
    "density": {"cut_weighting": "density"},
    "density_energy": {"cut_weighting": "density_energy"},
    "uniform_cut": {"cut_weighting": "uniform"},
    "adam_widths": {"width_step": "adam"},
    "same_lr": {"width_lr_scale": 1.0, "structure_lr": 5e-3},
    "zero_locations": {"layer_kwargs": {"location_init": "zero"}},
    "no_sigma_anneal": {"sigma0": None, "sigma1": None},
    "init_0.02": {"layer_kwargs": {"init_std": 0.02}},  # the paper's factor scale (the default before 72a684b)
    "energy_power1": {"energy_power": 1.0},  # the default before energy_power 2
    # the plain energy cut, the default before cost_power 0.3 (2026-12-07)
    "cost_power0": {"rule": {"class_path": "gsm_lightning.learn.rules.BudgetRule", "init_args": {"cost_power": 0.0}}},
}



def student_support(module: GSMModule) -> torch.Tensor | None:
    named = gblr_layers(module.backbone)
    if not named:
        return None
    layer = named[0][1]
    w, loc = layer.int_widths(), layer.int_locations()
    active = layer.active_components()
    windows = [Window(int(loc[0, k]), int(w[0, k]), int(loc[1, k]), int(w[1, k])) for k in active.nonzero().flatten()]
    return windows_support(windows, layer.in_features, layer.out_features)


def run_one(teacher_name: str, student: str, seed: int, args: argparse.Namespace,
            gblr_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    teacher = make_teacher(teacher_name, seed=seed)
    budget = teacher.flops_ratio
    pl.seed_everything(seed, workers=True)
    data = TeacherStudentDataModule(teacher.weight, num_train=args.num_train, noise_std=args.noise_std,
                                    batch_size=args.batch_size, seed=seed)
    kwargs: dict[str, Any] = dict(task="regression", include=["0"], budget=budget, warmup_epochs=1.0,
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0))
    if student == "gblr":
        kwargs.update(method="gblr", phase1_epochs=args.phase1_epochs, **(gblr_overrides or {}))
    elif student == "random_gblr":
        k = min(teacher.in_features, teacher.out_features)
        width = budget * teacher.in_features * teacher.out_features / (k * (teacher.in_features + teacher.out_features))
        kwargs.update(method="gblr", phase1_epochs=0, layer_kwargs={"width_init": min(1.0, width), "location_init": "random"})
    elif student == "dense":
        kwargs.update(method="dense", budget=1.0)
    elif student == "blocksparse":  # the largest square blocks (32, 16, 8 or 4) of which one fits the budget
        size = next(b for b in (32, 16, 8, 4) if b * b <= budget * teacher.in_features * teacher.out_features)
        kwargs.update(method="blocksparse", layer_kwargs={"block_size": size})
    else:
        kwargs.update(method=student)
    backbone = nn.Sequential(nn.Linear(teacher.in_features, teacher.out_features, bias=False))
    module = GSMModule(backbone, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, deterministic=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - t0
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    sup = student_support(module) if student in ("gblr", "random_gblr") else None
    return {
        "teacher": teacher_name, "student": student, "seed": seed, "budget": budget,
        "rel_mse": float(result["test/rel_mse"]), "flops_ratio": float(module.flops_ratio()),
        "phase1_end_ratio": module.phase1_end_ratio, "projection": module.projection_delta,
        "iou": None if sup is None else support_iou(sup, teacher.support()),
        "projection_warned": any("projected onto the budget" in str(w.message) for w in caught),
        "fit_s": fit_s,
    }


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (teacher, student) with medians over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["teacher"], r["student"]), []).append(r)
    rows = []
    for (teacher, student), rs in groups.items():
        rows.append({"teacher": teacher, "student": student, "seeds": len(rs), "budget": rs[0]["budget"],
                     "rel_mse": _med([r["rel_mse"] for r in rs]), "rel_mse_max": max(r["rel_mse"] for r in rs),
                     "flops_ratio": _med([r["flops_ratio"] for r in rs]),
                     "phase1_end_ratio": _med([r["phase1_end_ratio"] for r in rs]),
                     "projection": _med([r["projection"] for r in rs]), "iou": _med([r["iou"] for r in rs])})
    return rows


def verdicts(rows: list[dict[str, Any]], noise_floor: float) -> dict[str, str]:
    """The issue's goals per teacher, from the median rows."""
    by = {(r["teacher"], r["student"]): r for r in rows}
    out = {}
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        g = by.get((teacher, "gblr"))
        if g is None:
            continue
        fixed = [by[(teacher, s)]["rel_mse"] for s in ("lowrank", "monarch", "blocksparse", "random_gblr")
                 if (teacher, s) in by]
        parts = []
        if teacher == "low_rank" and (teacher, "lowrank") in by:
            ok = g["rel_mse"] <= 10 * by[(teacher, "lowrank")]["rel_mse"] or g["rel_mse"] <= noise_floor
            parts.append(f"within 10x of low-rank: {'yes' if ok else 'NO'}")
        elif fixed:
            ok = g["rel_mse"] <= 0.5 * min(fixed) or g["rel_mse"] <= noise_floor
            parts.append(f"<= half the best fixed: {'yes' if ok else 'NO'} ({g['rel_mse']:.2e} vs {min(fixed):.2e})")
        end = g["phase1_end_ratio"]
        parts.append(f"budget by learning: {'yes' if end is not None and end <= g['budget'] + 0.02 else 'NO'}")
        out[teacher] = "; ".join(parts)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| teacher | budget | student | rel. test MSE (median; max) | FLOPs ratio end of phase 1 -> final | "
             "projection at switch | support IoU | seeds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        end = "" if r["phase1_end_ratio"] is None else f"{r['phase1_end_ratio']:.3f} -> "
        proj = "" if r["projection"] is None else f"{r['projection']:.3f}"
        iou = "" if r["iou"] is None else f"{r['iou']:.2f}"
        lines.append(f"| {r['teacher']} | {r['budget']:.3f} | {r['student']} | {r['rel_mse']:.2e}; {r['rel_mse_max']:.2e} "
                     f"| {end}{r['flops_ratio']:.3f} | {proj} | {iou} | {r['seeds']} |")
    return "\n".join(lines)



def ablation(args: argparse.Namespace) -> None:
    labels = args.ablation.split(",")
    unknown = [lab for lab in labels if lab not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown ablation variant(s) {unknown}; choose from {list(VARIANTS)}")
    results = []
    t0 = time.perf_counter()
    for teacher in args.teachers.split(","):
        for label in labels:
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_one(teacher, "gblr", seed, args, VARIANTS[label])
                r["variant"] = label
                print(json.dumps(r), flush=True)
                results.append(r)
    total_s = time.perf_counter() - t0
    cmd = "python benchmarks/structure_recovery.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "args": vars(args), "total_s": total_s,
                                               "results": results}, indent=1))
    write_ablation(results, labels, cmd, total_s, args)


def write_ablation(results: list[dict[str, Any]], labels: list[str], cmd: str, total_s: float,
                   args: argparse.Namespace) -> None:
    teachers = list(dict.fromkeys(r["teacher"] for r in results))
    lines = ["| variant | overrides | " + " | ".join(teachers) + " | teachers at budget by learning |",
             "|---|---|" + "---|" * len(teachers) + "---|"]
    for label in labels:
        cells, reached = [], 0
        for t in teachers:
            rs = [r for r in results if r["variant"] == label and r["teacher"] == t]
            rel = _med([r["rel_mse"] for r in rs])
            end = _med([r["phase1_end_ratio"] for r in rs])
            iou = _med([r["iou"] for r in rs])
            ok = end is not None and end <= rs[0]["budget"] + 0.02
            reached += ok
            cells.append(f"{rel:.1e} / {iou:.2f}{'' if ok else f' / end {end:.2f}'}")
        over = ", ".join(f"{k}={v}" for k, v in VARIANTS[label].items()) or "GSMModule defaults"
        lines.append(f"| {label} | {over} | " + " | ".join(cells) + f" | {reached}/{len(teachers)} |")
    text = (f"### Ablation of the learner (gblr student only)\n\nCommand: `{cmd}` ({total_s / 60:.1f} min of "
            f"ablation runs, {args.threads} thread(s) each); seeds {args.seeds}, same recipe as above; the default row is "
            "the gblr student of the full run.  \nEach cell: median relative test "
            "MSE / support IoU; `end` = FLOPs ratio at the end of phase 1 when it missed the budget by more than 0.02 "
            "(the switch then projects).\n\n" + "\n".join(lines))
    print(text)
    if args.write_md:
        write_section(text, ROOT / "BENCHMARKS.md", ABL_START, ABL_END)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default=",".join(TEACHERS))
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--phase1-epochs", type=int, default=30)
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise-std", type=float, default=0.01)
    p.add_argument("--gblr", nargs="*", default=[], metavar="KEY=VALUE", help="GSMModule overrides for the gblr student")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--write-md", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--ablation", default=None, metavar="LABELS",
                   help=f"run only the gblr student under these variants (comma list of {', '.join(VARIANTS)}) and "
                        "write the ablation table")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="build the table from --json files of earlier runs (e.g. teachers split over processes; "
                        "later files win for the same teacher, student and seed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ablation:
        ablation(args)
        return
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        if any("variant" in r for run in runs for r in run["results"]):  # ablation runs
            # rows of full runs join as the "default" variant, for the ablation's teachers and seeds
            abl = [r for run in runs for r in run["results"] if "variant" in r]
            keep = {(r["teacher"], r["seed"]) for r in abl}
            default = [dict(r, variant="default") for run in runs for r in run["results"]
                       if "variant" not in r and r["student"] == "gblr" and (r["teacher"], r["seed"]) in keep]
            results = default + abl
            labels = list(dict.fromkeys(r["variant"] for r in results))
            cmd = "; ".join(run["command"] for run in runs) + "; python benchmarks/structure_recovery.py " + " ".join(sys.argv[1:])
            abl_runs = [run for run in runs if any("variant" in r for r in run["results"])]
            args.seeds = abl_runs[0]["args"]["seeds"]
            args.threads = abl_runs[0]["args"]["threads"]
            write_ablation(results, labels, cmd, sum(run["total_s"] for run in abl_runs), args)
            return
        # later files win for the same (teacher, student, seed): rerun one student and merge it over a full run
        merged = {(r["teacher"], r["student"], r["seed"]): r for run in runs for r in run["results"]}
        results = list(merged.values())
        total_s = sum(run["total_s"] for run in runs)
        args.gblr = runs[0]["args"]["gblr"]
        for key in ("epochs", "phase1_epochs", "num_train", "noise_std", "lr", "batch_size", "threads"):
            setattr(args, key, runs[0]["args"][key])
        cmd = "; ".join(run["command"] for run in runs) + "; python benchmarks/structure_recovery.py " + " ".join(sys.argv[1:])
    else:
        overrides = parse_overrides(args.gblr)
        results = []
        t0 = time.perf_counter()
        for teacher in args.teachers.split(","):
            for student in args.students.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    r = run_one(teacher, student, seed, args, overrides)
                    print(json.dumps(r), flush=True)
                    results.append(r)
        total_s = time.perf_counter() - t0
        cmd = "python benchmarks/structure_recovery.py " + " ".join(sys.argv[1:])
    rows = summarize(results)
    noise_floor = args.noise_std**2  # per-output variance of the teacher is 1
    text = table(rows)
    judged = verdicts(rows, noise_floor)
    print(text)
    for teacher, verdict in judged.items():
        print(f"{teacher}: {verdict}")
    if args.json and not args.merge:
        Path(args.json).write_text(json.dumps({"command": cmd.strip(), "args": vars(args), "total_s": total_s,
                                               "results": results, "rows": rows, "verdicts": judged}, indent=1))
    if args.write_md:
        header = (f"## Structure recovery (teacher-student regression)\n\nCommand: `{cmd.strip()}` "
                  f"({total_s / 60:.1f} min of runs, {args.threads} thread(s) each, torch {torch.__version__}).  \n"
                  f"{args.epochs} epochs for every student ({args.phase1_epochs} of structure learning for gblr), "
                  f"{args.num_train} training pairs with noise std {args.noise_std:g} (noise floor of the relative MSE "
                  f"~{noise_floor:.0e}), AdamW lr {args.lr:g} wd 0, warmup + cosine, batch {args.batch_size}; gblr = "
                  f"GSMModule defaults{' + ' + ' '.join(args.gblr) if args.gblr else ''}.\n")
        verdict_text = "\n".join(f"- **{t}**: {v}" for t, v in judged.items())
        write_section(header + "\n" + text + "\n\nGoals (from the medians):\n\n" + verdict_text, ROOT / "BENCHMARKS.md",
                      START, END)


if __name__ == "__main__":
    main()
