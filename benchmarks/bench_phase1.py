"""A GBLR layer's training step at a FLOPs ratio, in phase 1 (at several sigmas) and frozen (phase 2), against
nn.Linear: what the forward does now and what it did before (issue 26).

Two things make a layer cost less than its full width: (1) ``GBLRLinear.live_components`` leaves out the
components the budget learner emptied on both sides (exact; on the recovery teachers 94 of 128 once its path
reaches the budget); (2) the windowed product (:mod:`gsm_lightning.core.windows`) computes every other component
only on the tiles its masks reach, the window plus the margin where the mask's Gaussian tails and their
derivatives exceed ``window_tol`` (exact when frozen).  For each P1 shape, each ``--deads`` share of empty
components (the others at one width that puts the layer at ``--ratio``, random locations) and each of
``--sigmas`` (``frozen``: the same structure frozen), one forward + backward with every gradient is timed for:
``now`` (the layer's forward), ``live`` (empty components left out, no windows: ``window_tol=None``), ``all``
(every component over the full width) and ``nn.Linear``, interleaved in rounds.

    python -m benchmarks.bench_phase1 --write-md
"""

from __future__ import annotations

import argparse
import copy
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


def _no_windows(layer: GBLRLinear) -> GBLRLinear:
    twin = copy.deepcopy(layer)
    twin.window_tol = None
    return twin


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n_in, n_out in SHAPES:
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        gy = torch.randn(args.tokens, n_out)
        lin = nn.Linear(n_in, n_out)
        for dead in args.deads:
            for sigma in args.sigmas:
                frozen = sigma == "frozen"
                layer = phase1_layer(n_in, n_out, args.ratio, dead, 30.0 if frozen else float(sigma))
                if frozen:
                    layer.freeze_structure()
                fns: dict[str, Callable[[], Any]] = {
                    "dense": train_step(lin, x, gy),
                    "now": train_step(layer, x, gy),
                    "live": train_step(_no_windows(layer), x, gy),
                    "all": train_step(_AllComponents(layer), x, gy),
                }
                ratios, t_dense = interleaved_ratios(fns, args.threads, args.rounds, args.min_run_time)
                live = layer.live_components()
                plan = layer._window_plan(args.tokens, layer.num_components * layer.rank_per_component)
                rows.append({"shape": f"{n_in}x{n_out}", "sigma": sigma, "flops_ratio": layer.flops_ratio(),
                             "live": layer.num_components if live is None else int(live.numel()),
                             "k": layer.num_components, "dead": dead,
                             "window_fraction": None if plan is None else plan.fraction,
                             "dense_ms": 1e3 * t_dense, "now_x": ratios["now"], "live_x": ratios["live"],
                             "all_x": ratios["all"]})
                print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [
        f"Command: `python -m benchmarks.bench_phase1 {' '.join(argv)}` ({machine_info(args.threads)}; other jobs "
        "shared the cores: read the ratios, each the median over rounds of times taken one after the other).",
        "",
        f"One training step (forward + backward, {args.tokens} tokens, every parameter's gradient) of a GBLR layer at "
        f"{args.ratio:g} of dense FLOPs (random locations): in phase 1 (not frozen) at the sigma given, or frozen "
        "(phase 2). `empty`: the share of its K = min(in, out) components empty on both sides (what the budget "
        "learner leaves once its path reaches the budget: 73 % on the recovery teachers; 0 %: every component "
        "partly wide); the others share one width that puts the layer at the ratio. Against `nn.Linear` timed in "
        "the same rounds: `now` (the forward: empty components left out, then each component computed on the tiles "
        "its masks reach, `window_tol` 1e-5, when the cost model takes it), `live` (empty components left out, "
        "every live one over the full width: the forward before the windows), `all` (every component over the "
        "full width: the forward before that). `windowed MACs` = the windowed product's multiply-adds over the "
        "full product's (-: the full product runs: at sigma 1 the tails cover every side; with 73 % empty the live components are about 0.9 wide, and the windows would save too little).",
        "",
        "| shape (in x out) | sigma | empty | FLOPs ratio | live / K | windowed MACs | nn.Linear (ms) | now | live | all |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = "-" if r["window_fraction"] is None else f"{r['window_fraction']:.2f}"
        lines.append(f"| {r['shape']} | {r['sigma']} | {r['dead']:.0%} | {r['flops_ratio']:.3f} | {r['live']} / "
                     f"{r['k']} | {frac} | {r['dense_ms']:.1f} | {r['now_x']:.2f}x | {r['live_x']:.2f}x | "
                     f"{r['all_x']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--deads", type=lambda t: [float(v) for v in t.split(",")], default=[0.0, 0.73],
                   help="fractions of components empty on both sides (comma-separated)")
    p.add_argument("--sigmas", type=lambda t: [v if v == "frozen" else float(v) for v in t.split(",")],
                   default=[1.0, 10.0, 30.0, 100.0, "frozen"], help="sigmas of phase 1, and/or 'frozen' (phase 2)")
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
