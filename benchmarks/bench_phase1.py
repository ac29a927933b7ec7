"""Phase-1 training step (structure learning, not frozen) at a FLOPs ratio, against nn.Linear, with and without
leaving out the components the budget learner emptied on both sides (issue 26).

Once the budget learner's path reaches the budget most components are 0 wide on both sides (on the recovery
teachers 94 of 128, from the first third of phase 1 on) and stay so: their gradients are exactly 0.
``GBLRLinear.live_components`` leaves them out of the forward and backward.  This script times one forward +
backward of a layer in that state (``--dead`` of its K = min(in, out) components empty, the others at the width
that puts the layer at ``--ratio``, random locations, sigma ``--sigma``) for the P1 shapes, against nn.Linear in
the same rounds, and the same layer with every component computed (the cost before this change).

    python -m benchmarks.bench_phase1 --write-md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_phase1.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.bench_speed import interleaved_ratios, train_step  # noqa: E402
from benchmarks.common import machine_info, write_section  # noqa: E402
from gsm_lightning.core.layer import GBLRLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- bench-phase1:start -->", "<!-- bench-phase1:end -->"
SHAPES = ((768, 3072), (3072, 768), (384, 1536))


def phase1_layer(n_in: int, n_out: int, ratio: float, dead: float, sigma: float, seed: int = 0) -> GBLRLinear:
    """A learning (not frozen) layer with ``dead`` of its components empty on both sides and the rest at one width
    fraction that puts it at ``ratio`` of dense FLOPs (on the integer grid, at most ``ratio``)."""
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, sigma=sigma, location_init="random")
    k = layer.num_components
    live = k - int(round(dead * k))
    if live < 1:
        raise ValueError(f"dead={dead} leaves no live component of {k}")
    frac = min(1.0, ratio * n_in * n_out / (live * (n_in + n_out)))
    with torch.no_grad():
        layer.widths.zero_()
        layer.widths[0, :live] = int(frac * n_in) / n_in
        layer.widths[1, :live] = int(frac * n_out) / n_out
    layer.invalidate_cache()
    return layer


class _AllComponents(nn.Module):
    """The same layer with every component computed (what the forward did before it left empty ones out)."""

    def __init__(self, layer: GBLRLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, u = self.layer.masked_factors()
        tokens = x.numel() // self.layer.in_features
        if self.layer._use_dense(tokens, v.shape[0]):
            return nn.functional.linear(x, u.t() @ v, self.layer.bias)
        return nn.functional.linear(nn.functional.linear(x, v), u.t(), self.layer.bias)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n_in, n_out in SHAPES:
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        gy = torch.randn(args.tokens, n_out)
        lin = nn.Linear(n_in, n_out)
        layer = phase1_layer(n_in, n_out, args.ratio, args.dead, args.sigma)
        fns: dict[str, Callable[[], Any]] = {
            "dense": train_step(lin, x, gy),
            "live": train_step(layer, x, gy),
            "all": train_step(_AllComponents(layer), x, gy),
        }
        ratios, t_dense = interleaved_ratios(fns, args.threads, args.rounds, args.min_run_time)
        live = layer.live_components()
        rows.append({"shape": f"{n_in}x{n_out}", "flops_ratio": layer.flops_ratio(),
                     "live": layer.num_components if live is None else int(live.numel()), "k": layer.num_components,
                     "dense_ms": 1e3 * t_dense, "live_x": ratios["live"], "all_x": ratios["all"]})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [
        f"Command: `python -m benchmarks.bench_phase1 {' '.join(argv)}` ({machine_info(args.threads)}; other jobs "
        "shared the cores: read the ratios, each the median over rounds of times taken one after the other).",
        "",
        f"One training step (forward + backward, {args.tokens} tokens) of a GBLR layer in phase 1 (not frozen, sigma "
        f"{args.sigma:g}, random locations) with {args.dead:.0%} of its K = min(in, out) components empty on both "
        f"sides and the others at the width that puts it at {args.ratio:g} of dense FLOPs, against `nn.Linear` "
        "timed in the same rounds: with the empty components left out (`live`, the forward now) and with every "
        "component computed (`all`, the forward before).",
        "",
        "| shape (in x out) | FLOPs ratio | live components / K | nn.Linear (ms) | live | all |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['flops_ratio']:.3f} | {r['live']} / {r['k']} | {r['dense_ms']:.1f} | "
                     f"{r['live_x']:.2f}x | {r['all_x']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--dead", type=float, default=0.73, help="fraction of components empty on both sides")
    p.add_argument("--sigma", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="256 tokens, 1 round (smoke test)")
    p.add_argument("--write-md", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.min_run_time = 256, 1, 0.01
    rows = run(args)
    text = markdown(rows, args, argv)
    print(text)
    if args.write_md and not args.quick:
        write_section(text, ROOT / "BENCHMARKS.md", MD_START, MD_END)
    return rows


if __name__ == "__main__":
    main()
