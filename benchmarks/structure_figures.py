"""Pictures of the structures GBLR learned on Fashion-MNIST (issue 25): footprints of every converted layer, and
a per-layer-type summary, from the structure files ``accuracy_fmnist.py --structures`` wrote (seed 0 by default).

For each model and budget it rebuilds the backbone of ``accuracy_fmnist.py``, writes the stored structure into it
(:func:`~gsm_lightning.io.structure_io.apply_structure`: frozen layers, random factors; the structure is what is
drawn) and saves the report's footprint mosaic (``footprint_grid_figure``) to
``docs/fmnist/figures/footprints_<model>_b<budget>_s<seed>.png``.  It prints a markdown table per layer type: FLOPs
ratio, active components, and how many of them span a full side (low-rank-like) or are narrower (block-like).

    python benchmarks/structure_figures.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.accuracy_fmnist import backbone  # noqa: E402
from gsm_lightning.core.layer import gblr_layers  # noqa: E402
from gsm_lightning.io.structure_io import apply_structure, load_structure  # noqa: E402
from gsm_lightning.report.plotting import footprint_grid_figure, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def kind(model: str, name: str) -> str:
    if model == "vit":
        return "attn q/k/v" if ".attn." in name else "mlp fc1" if name.endswith("fc1") else "mlp fc2"
    return ("token " if "token" in name else "channel ") + ("fc1" if name.endswith("fc1") else "fc2")


def summary(model: str, net: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per layer type: FLOPs ratio (FLOPs-weighted), active components per layer, and the share of active
    components whose windows cover a whole side (in or out) against those narrower than half of both sides."""
    groups: dict[str, list] = {}
    for name, layer in gblr_layers(net):
        w_in, w_out = layer.int_widths()
        active = (w_in > 0) & (w_out > 0)
        full = active & ((w_in >= layer.in_features) | (w_out >= layer.out_features))
        narrow = active & (w_in < layer.in_features / 2) & (w_out < layer.out_features / 2)
        groups.setdefault(kind(model, name), []).append(
            (layer.flops(), layer.in_features * layer.out_features, int(active.sum()), int(full.sum()), int(narrow.sum())))
    out = {}
    for k, rows in groups.items():
        act = sum(r[2] for r in rows)
        out[k] = {"flops_ratio": sum(r[0] for r in rows) / sum(r[1] for r in rows),
                  "active": statistics.mean(r[2] for r in rows),
                  "full_side": sum(r[3] for r in rows) / max(act, 1), "narrow": sum(r[4] for r in rows) / max(act, 1)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vit", "mixer"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structures", type=Path, default=ROOT / "docs" / "fmnist" / "structures")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "fmnist" / "figures")
    cfg = p.parse_args(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    print("| model | budget | layer type | FLOPs ratio | active components per layer | full-side components | "
          "narrow (< half of both sides) |")
    print("|---|---|---|---|---|---|---|")
    for model in cfg.models:
        for budget in cfg.budgets:
            path = cfg.structures / f"structures_fmnist_{model}_b{budget:g}_s{cfg.seed}.json"
            net = apply_structure(backbone(model), load_structure(path))
            png = cfg.out / f"footprints_{model}_b{budget:g}_s{cfg.seed}.png"
            save_figure(footprint_grid_figure(net, max_size=64), str(png))
            for k, s in summary(model, net).items():
                print(f"| {model} | {budget:.0%} | {k} | {s['flops_ratio']:.3f} | {s['active']:.1f} | "
                      f"{100 * s['full_side']:.0f} % | {100 * s['narrow']:.0f} % |")


if __name__ == "__main__":
    main()
