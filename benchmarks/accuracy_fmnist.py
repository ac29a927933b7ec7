"""Accuracy at a FLOPs budget on real data: Fashion-MNIST, small ViT and MLP-Mixer,
dense vs low-rank vs Monarch vs GBLR (learned structure, two-phase), same recipe, epochs and seeds.

    python benchmarks/accuracy_fmnist.py                 # the full sweep (about an hour on 2 CPU cores)
    python benchmarks/accuracy_fmnist.py --quick         # a smoke run on a few hundred images

On 2 cores it is fastest to run the two models as two single-threaded processes, then merge:

    python benchmarks/accuracy_fmnist.py --models vit --threads 1 --json docs/acc_vit.json --no-report &
    python benchmarks/accuracy_fmnist.py --models mixer --threads 1 --json docs/acc_mixer.json --no-report; wait
    python benchmarks/accuracy_fmnist.py --report docs/acc_vit.json docs/acc_mixer.json

Writes a markdown table into BENCHMARKS.md (between the accuracy markers), the raw results to
docs/accuracy_fmnist.json and an accuracy-vs-FLOPs plot to docs/accuracy_vs_flops.png.
Needs Debian's dataset-fashion-mnist (or --root pointing to the idx .gz files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/accuracy_fmnist.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from benchmarks.common import bootstrap_mean_ci, machine_info, parse_overrides, write_section  # noqa: E402
from gsm_lightning.core.baselines import rank_for_budget  # noqa: E402
from gsm_lightning.core.conversion_spec import Conversion  # noqa: E402
from gsm_lightning.data import FashionMNISTDataModule  # noqa: E402
from gsm_lightning.io.structure_io import load_structure, save_structure, set_structure  # noqa: E402
from gsm_lightning.models import MLPMixer, ViT  # noqa: E402
from gsm_lightning.training.module import GSMModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"


def backbone(name: str) -> torch.nn.Module:
    if name == "vit":
        return ViT(image_size=28, patch_size=4, in_chans=1, num_classes=10, dim=96, depth=4, heads=4, mlp_ratio=2.0,
                   pool="mean")
    if name == "mixer":
        return MLPMixer(image_size=28, patch_size=4, in_chans=1, num_classes=10, dim=96, depth=4, token_mlp_dim=64,
                        channel_mlp_dim=384)
    raise ValueError(f"unknown model {name!r}")


def converted_params(module: GSMModule) -> int:
    """Stored nonzero parameters of the converted layers (weights + biases), analytic."""
    if module.report is None:
        return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                   for n, m in module.backbone.named_modules()
                   if isinstance(m, torch.nn.Linear) and n in set(_targets(module)))
    return sum(module.backbone.get_submodule(n).params() for n in module.report.names)


def _targets(module: GSMModule) -> list[str]:
    return _targets_of(module.backbone)


def _targets_of(net: torch.nn.Module) -> list[str]:
    from gsm_lightning.core.conversion import select_linear_layers

    return select_linear_layers(net, include=net.gsm_default_include)



def fixed_structure(module: GSMModule, source: str, model: str, budget: float, seed: int) -> dict:
    """The structure for ``--gblr-fixed``: ``lowrank`` (every converted layer at the low-rank baseline's rank, full
    width) or the file saved by ``--structures`` in the folder ``source``."""
    if source != "lowrank":
        return load_structure(Path(source) / f"structures_fmnist_{model}_b{budget:g}_s{seed}.json")
    layers = {}
    for name in module.report.names:
        m = module.backbone.get_submodule(name)
        k = rank_for_budget(m.in_features, m.out_features, budget)
        layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank_per_component": 1,
                        "widths": [[m.in_features] * k, [m.out_features] * k], "locations": [[0] * k, [0] * k]}
    return {"layers": layers}


def learned_ratios(structure: dict) -> dict[str, float]:
    """Each stored layer's FLOPs ratio ``r * sum(w_in + w_out) / (in * out)`` (widths on the grid), at least the cost
    of one rank-1 component so that every layer keeps a fixed structure."""
    out = {}
    for name, rec in structure["layers"].items():
        n_in, n_out, r = rec["in_features"], rec["out_features"], rec["rank_per_component"]
        w_in, w_out = rec["widths"]
        flops = r * sum(a + b for a, b in zip(w_in, w_out) if a > 0 and b > 0)
        out[name] = min(1.0, max(flops, n_in + n_out) / (n_in * n_out))
    return out


def run_one(model: str, method: str, budget: float, seed: int, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, workers=True)
    data = FashionMNISTDataModule(root=args.root, batch_size=args.batch_size, seed=seed, val_size=0,
                                  train_subset=args.train_subset, test_subset=args.test_subset, augment=False)
    gblr = parse_overrides(args.gblr) if method == "gblr" else {}
    fixed = method in ("lowrank", "monarch", "blocksparse")
    # Fixed structures round their rank or block count down; --baseline-budget-scale lets them train above the
    # cell's budget (so that their FLOPs are not below GBLR's), reported in the cell's row and paired with it.
    train_budget = budget * args.baseline_budget_scale if fixed else budget
    if args.prox_lambda is not None:
        gblr.setdefault("prox_lambda", args.prox_lambda)
    kwargs = dict(
        num_classes=10, budget=train_budget if method != "dense" else 1.0, method=method,
        init=args.baseline_init if fixed else "random",
        phase1_epochs=args.phase1_epochs if method == "gblr" else 0,
        structure_lr=args.structure_lr, sigma0=1.0, sigma1=100.0, sigma_start_epoch=0, label_smoothing=0.1,
        warmup_epochs=args.warmup_epochs,
        layer_kwargs={k: v for k, v in (("width_init", args.gblr_width_init),
                                        ("location_init", args.gblr_location_init)) if v is not None},
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.05),
    )
    if isinstance(gblr.get("rule"), dict):  # a rule object replaces the flat rule arguments: --structure-lr goes in it
        lr = kwargs.pop("structure_lr")
        if lr is not None:
            gblr["rule"].setdefault("init_args", {}).setdefault("structure_lr", lr)
    kwargs.update(gblr)  # --gblr KEY=VALUE overrides the recipe's own settings (sigma0, ...)
    net = backbone(model)
    if fixed and args.baseline_allocation:
        # the per-layer FLOPs the GBLR run of the same model, budget and seed learned (the allocation without the
        # structure): each layer's rank (blocks) at that layer's learned ratio
        learned = load_structure(Path(args.baseline_allocation) / f"structures_fmnist_{model}_b{budget:g}_s{seed}.json")
        kwargs.pop("layer_kwargs")
        kwargs["conversion"] = Conversion(method=kwargs.pop("method"), init=kwargs.pop("init"),
                                          layer_budgets={n: min(1.0, r * args.baseline_budget_scale)
                                                         for n, r in learned_ratios(learned).items()})
    if method == "dense" and args.dense_init == "fan_in":
        # The layers GBLR would convert, re-drawn at GBLR's default scale (trunc-normal, std 1/sqrt(in)):
        # separates the init scale from the structure in the comparison.
        with torch.no_grad():
            for name in _targets_of(net):
                lin = net.get_submodule(name)
                std = lin.in_features ** -0.5
                torch.nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
    if method == "gblr" and args.gblr_fixed:
        kwargs["phase1_epochs"] = 0  # frozen at the first epoch: the stored structure, trained from a fresh init
    module = GSMModule(net, **kwargs)
    if method == "gblr" and args.gblr_fixed:
        set_structure(module.backbone, fixed_structure(module, args.gblr_fixed, model, budget, seed))
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - t0
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    if args.structures and method == "gblr" and module.phase == 2:
        out = Path(args.structures) / f"structures_fmnist_{model}_b{budget:g}_s{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_structure(module.backbone, out, source=f"benchmarks/accuracy_fmnist.py ({model}, budget {budget:g}, "
                       f"seed {seed}, {args.epochs} epochs, {args.train_subset} images)", test_acc=float(result["test/acc"]))
    return {
        "model": model, "method": method if not args.label else f"{method}[{args.label}]",
        "budget": budget if method != "dense" else 1.0, "seed": seed,
        "test_acc": float(result["test/acc"]), "flops_ratio": float(module.flops_ratio()),
        "phase1_end_ratio": module.phase1_end_ratio, "projection": module.projection_delta,
        "converted_params": int(converted_params(module)), "epoch_s": fit_s / args.epochs,
        **({"train_budget": train_budget} if train_budget != budget else {}),
    }


def table(results: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["method"], r["budget"]), []).append(r)
    lines = ["| model | method | budget | test acc % (median over seeds) | seeds | FLOPs ratio (converted layers) "
             "| params (converted layers) | s / epoch |", "|---|---|---|---|---|---|---|---|"]
    for (model, method, budget), rs in groups.items():
        accs = [100 * r["test_acc"] for r in rs]
        lines.append(
            f"| {model} | {method} | {budget:g} | {statistics.median(accs):.2f}"
            f"{'' if len(accs) == 1 else f' ({min(accs):.2f}-{max(accs):.2f})'} | {len(rs)} "
            f"| {statistics.median(r['flops_ratio'] for r in rs):.3f} "
            f"| {int(statistics.median(r['converted_params'] for r in rs)):,} "
            f"| {statistics.median(r['epoch_s'] for r in rs):.1f} |")
    return "\n".join(lines)


def pivot(results: list[dict]) -> str:
    """Median test accuracy per method (rows, ablation labels included) and model x budget (columns); dense rows
    fill every budget column of their model."""
    cells = sorted({(r["model"], r["budget"]) for r in results if r["method"].split("[")[0] != "dense"},
                   key=lambda c: (c[0] != "vit", c[0], c[1]))
    methods = list(dict.fromkeys(r["method"] for r in results))
    head = "| method | " + " | ".join(f"{m} {100 * b:g} %" for m, b in cells) + " |"
    lines = [head, "|---" * (len(cells) + 1) + "|"]
    for method in methods:
        row = []
        for model, budget in cells:
            accs = [100 * r["test_acc"] for r in results if r["method"] == method and r["model"] == model
                    and (r["budget"] == budget or method.split("[")[0] == "dense")]
            row.append(f"{statistics.median(accs):.2f}" if accs else "")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired(results: list[dict], reference: str = "gblr") -> str:
    """``reference`` minus every other method of the same model and budget, seed by seed (the seed draws the same
    data order and init for every method), with the mean's 95 % bootstrap interval over seeds."""
    by = {(r["model"], r["method"], r["budget"], r["seed"]): r for r in results}
    lines = [f"| model | budget | {reference} minus | seeds | per seed (points) | mean [95 % bootstrap] |",
             "|---|---|---|---|---|---|"]
    for model, budget in sorted({(r["model"], r["budget"]) for r in results if r["method"] == reference}):
        for method in dict.fromkeys(r["method"] for r in results if r["model"] == model and r["method"] != reference):
            dense = method.split("[")[0] == "dense"
            pairs = [(by[(model, reference, budget, s)], by[(model, method, 1.0 if dense else budget, s)])
                     for (mo, me, b, s) in by if mo == model and me == reference and b == budget
                     and (model, method, 1.0 if dense else budget, s) in by]
            if len(pairs) < 2:
                continue
            d = [100 * (a["test_acc"] - b["test_acc"]) for a, b in sorted(pairs, key=lambda p: p[0]["seed"])]
            mean, lo, hi = bootstrap_mean_ci(d)
            lines.append(f"| {model} | {budget:g} | {method} | {len(d)} | {', '.join(f'{x:+.2f}' for x in d)} | "
                         f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    markers = {"dense": "*", "lowrank": "s", "monarch": "^", "gblr": "o", "blocksparse": "D"}
    for ax, model in zip(axes[0], models):
        for method in markers:
            rs = sorted((r for r in results if r["model"] == model and r["method"] == method), key=lambda r: r["flops_ratio"])
            if rs:
                ax.plot([r["flops_ratio"] for r in rs], [100 * r["test_acc"] for r in rs], marker=markers[method],
                        linestyle="-" if method != "dense" else "", label=method)
        ax.set_title(f"Fashion-MNIST, {model}")
        ax.set_xlabel("FLOPs ratio of converted layers")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="Fashion-MNIST idx .gz folder (default: Debian's)")
    p.add_argument("--models", default="vit,mixer")
    p.add_argument("--methods", default="dense,lowrank,monarch,gblr")
    p.add_argument("--budgets", default="0.3,0.5")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--phase1-epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--structure-lr", type=float, default=None, help="default: GSMModule's")
    p.add_argument("--prox-lambda", type=float, default=None, help="lambda of shrink=paper (default: GSMModule's)")
    p.add_argument("--gblr", nargs="*", default=[], metavar="KEY=VALUE",
                   help="GSMModule overrides for GBLR (e.g. shrink=paper prox_lambda=0.3) for ablations")
    p.add_argument("--label", default="", help="suffix for the method name in the table (ablations)")
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--gblr-width-init", type=float, default=None, help="GBLR width_init (default 'splr')")
    p.add_argument("--gblr-location-init", default=None, help="GBLR location_init (default: GSMModule's, 'uniform' with its budget learner)")
    p.add_argument("--quick", action="store_true", help="a smoke run on a few hundred images")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--gblr-fixed", default=None, metavar="DIR",
                   help="train GBLR with a fixed structure from the start (GBLR's own init): the one stored by --structures "
                        "in DIR (same model, budget, seed; the 'learned structure, restarted weights' ablation), or "
                        "'lowrank' (full-width components at the low-rank baseline's rank)")
    p.add_argument("--dense-init", choices=["backbone", "fan_in"], default="backbone",
                   help="dense runs: the backbone's own init of the layers GBLR converts (timm-style std 0.02), or "
                        "'fan_in' (std 1/sqrt(in), GBLR's default scale)")
    p.add_argument("--baseline-init", choices=["random", "per_factor"], default="random",
                   help="fixed structures (lowrank, monarch, blocksparse): 'random' = GBLR's random dense matrix "
                        "projected onto the structure (equal init, the default), 'per_factor' = each factor like its "
                        "own nn.Linear (the smaller init of earlier tables; an ablation, label it)")
    p.add_argument("--baseline-allocation", default=None, metavar="DIR",
                   help="fixed structures get the per-layer FLOPs ratios GBLR learned (the structure files that "
                        "--structures wrote in DIR, same model, budget and seed) instead of the budget in every layer")
    p.add_argument("--baseline-budget-scale", type=float, default=1.0,
                   help="fixed structures train at budget x SCALE, reported in the budget's cell (1.1 puts their "
                        "rounded-down FLOPs at or above GBLR's at 10 %%)")
    p.add_argument("--accelerator", default="cpu", help="the Trainer's accelerator (cpu, gpu)")
    p.add_argument("--structures", default=None, metavar="DIR",
                   help="write the learned structure of every GBLR run to DIR/structures_fmnist_*.json")
    p.add_argument("--no-report", action="store_true", help="only write --json (merge later with --report)")
    p.add_argument("--report", nargs="+", default=None, help="merge result JSON files into the table and plot")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--reference", default="gblr", metavar="METHOD",
                   help="with --report: the row the paired differences are taken from (a method name as in the table, "
                        "e.g. 'gblr[regrowth]')")
    p.add_argument("--paired-only", action="store_true",
                   help="with --report: print the paired differences and medians only (BENCHMARKS.md untouched)")
    p.add_argument("--json", default=str(ROOT / "docs" / "accuracy_fmnist.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "accuracy_vs_flops.png"))
    args = p.parse_args()
    if args.quick:
        args.epochs, args.phase1_epochs, args.train_subset, args.test_subset = 2, 1, 256, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        runs = [json.loads(Path(f).read_text()) for f in args.report]
        results = [r for run in runs for r in run["results"]]
        cmd = "; ".join(run["command"] for run in runs) + "; python benchmarks/accuracy_fmnist.py " + " ".join(sys.argv[1:])
        # the recipe of the GBLR runs (baseline-only runs may come from an older script with other GBLR defaults)
        meta = next((run["meta"] for run in runs if any(r["method"].startswith("gblr") for r in run["results"])),
                    runs[0]["meta"])
    else:
        results = []
        for model in args.models.split(","):
            for method in args.methods.split(","):
                budgets = [1.0] if method == "dense" else [float(b) for b in args.budgets.split(",")]
                for budget in budgets:
                    for seed in (int(s) for s in args.seeds.split(",")):
                        r = run_one(model, method, budget, seed, args)
                        print(json.dumps(r), flush=True)
                        results.append(r)
        cmd = "python benchmarks/accuracy_fmnist.py " + " ".join(sys.argv[1:])
        meta = {k: getattr(args, k) for k in ("epochs", "phase1_epochs", "train_subset", "test_subset", "batch_size",
                                              "lr", "structure_lr", "gblr", "seeds")}
        meta["threads"] = torch.get_num_threads()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": cmd.strip(), "meta": meta, "results": results}, indent=1))
        if args.no_report:
            return
    if args.report and args.paired_only:
        print(f"Command: `{cmd.strip()}`\n\n" + pivot(results) + f"\n\n{args.reference} minus each other row:\n\n"
              + paired(results, reference=args.reference))
        return
    meta.setdefault("gblr", [])
    meta.setdefault("seeds", "0")
    m = argparse.Namespace(**meta)
    wall = sum(r["epoch_s"] for r in results) * m.epochs / 60
    header = (f"### Accuracy at a FLOPs budget: Fashion-MNIST\n\n"
              f"Command: `{cmd.strip()}`  \nDate: {datetime.date.today()}; machine: {machine_info(m.threads)}.  \n"
              f"Recipe (all methods): {m.epochs} epochs, {m.train_subset or 'all'} training images, "
              f"{'the full 10k' if not m.test_subset else m.test_subset} test images, AdamW lr {m.lr:g} "
              f"wd 0.05, warmup + cosine, label smoothing 0.1, batch {m.batch_size}, seeds {m.seeds}; GBLR: phase 1 = "
              f"{m.phase1_epochs} epochs (structure lr {m.structure_lr or 'default'}, sigma 1 -> 100, GSMModule's default "
              f"structure rule{' + ' + ' '.join(m.gblr) if m.gblr else ''}; ablation rows name their overrides), "
              f"then frozen. Converted layers: ViT q/k/v + MLP, Mixer token + channel MLPs; the rest stays dense. "
              f"Total training time of all runs: {wall:.0f} min of single-thread CPU. "
              f"Seconds per epoch are wall-clock on a shared machine (other jobs ran at the same time): compare "
              f"them only within a row's neighbours, not as speed claims.\n")
    summary = ("\n\nMedian test accuracy (%) by method and cell (the same runs; dense fills both budgets of its "
               "model):\n\n" + pivot(results) +
               "\n\nPaired differences, GBLR minus each other row of the same model and budget, seed by seed (the seed "
               "fixes the data order for every method), with the 95 % percentile bootstrap interval of the mean over "
               "seeds (with 3 seeds only 10 resamples differ: a coarse interval):\n\n" + paired(results))
    write_section(header + "\n" + table(results) + summary + "\n\n![accuracy vs FLOPs](docs/accuracy_vs_flops.png)",
                  Path(args.out), START, END)
    plot(results, Path(args.plot))
    print(table(results))


if __name__ == "__main__":
    main()
