"""Which per-layer allocation of one FLOPs budget keeps most of all-MiniLM-L6-v2, before any training?

Every converted layer (q/k/v and both FFN linears of the 6 layers) becomes its whitened truncated SVD (the SVD-LLM
rule, exact optimum of the layer's output error on the calibration data) at a rank chosen by one of these rules,
all at the same total FLOPs:

* ``uniform``: every layer at the budget;
* ``greedy-whitened``: :func:`allocate_ranks_greedy` on the whitened singular values (the ``wsvd-global`` baseline);
* ``gblr-learned``: the per-layer ratios GBLR's budget learner reached in a stored run (``--learned``, a
  ``compress_minilm`` JSON), scaled to the budget (the allocation a "learn, then re-fit" pipeline would keep);
* ``measured``: each layer alone is truncated to each ratio of a grid and the drop of the embedding cosine on
  held-in sentences (training split, not the test sentences) is measured; a greedy then buys, under the budget, the
  steps with the largest measured gain per FLOP (layers assumed additive);
* ``measured, one point``: only the curve point at the budget's rank is used: each layer's gain (measured drop over
  its whitened tail energy, :func:`~gsm_lightning.core.allocation.layer_gains`) weights its whitened singular values
  in :func:`allocate_ranks_greedy` (``MeasuredAllocation``'s default form, measured here on the probe's sentences).

Reported: the mean cosine to the dense embeddings on the held-out test sentences (the ``cos_converted`` column of
``compress_minilm``) and the ratio by layer type.  No distillation.

    python -m benchmarks.allocation_probe --json docs/compress_minilm/allocation_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.compress_minilm import by_type, training_data  # noqa: E402
from gsm_lightning.core.allocation import layer_gains  # noqa: E402
from gsm_lightning.core.baselines import allocate_ranks_greedy  # noqa: E402
from gsm_lightning.core.calibration import collect_input_stats  # noqa: E402
from gsm_lightning.core.conversion import select_linear_layers  # noqa: E402
from gsm_lightning.core.whitening import whitened_low_rank  # noqa: E402
from gsm_lightning.data.sentences import mean_pooled_embed_fn  # noqa: E402
from gsm_lightning.models import SentenceEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rank_at(w: torch.Tensor, ratio: float) -> int:
    out, inp = w.shape
    return max(1, min(min(out, inp), int(ratio * out * inp / (out + inp))))


def measured_allocation(curves: dict[str, list[tuple[int, float]]], shapes: dict[str, tuple[int, int]],
                        budget: float) -> dict[str, int]:
    """Greedy on measured (rank, loss) points per layer: start every layer at its cheapest point, then repeatedly
    take the move (to any higher point of one layer) with the largest loss drop per added FLOP that fits."""
    total = budget * sum(o * i for o, i in shapes.values())
    cost = {n: sum(shapes[n]) for n in curves}
    pos = {n: 0 for n in curves}
    spent = sum(curves[n][0][0] * cost[n] for n in curves)
    while True:
        best = None
        for n, pts in curves.items():
            r0, l0 = pts[pos[n]]
            for j in range(pos[n] + 1, len(pts)):
                r1, l1 = pts[j]
                add = (r1 - r0) * cost[n]
                if spent + add > total or add <= 0:
                    continue
                gain = (l0 - l1) / add
                if best is None or gain > best[0]:
                    best = (gain, n, j, add)
        if best is None or best[0] <= 0:
            return {n: curves[n][pos[n]][0] for n in curves}
        _, n, j, add = best
        pos[n], spent = j, spent + add


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--grid", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    p.add_argument("--probe-sentences", type=int, default=256, help="training sentences the curves are measured on")
    p.add_argument("--learned", type=Path, default=ROOT / "docs" / "compress_minilm" / "gpu2000_gblr_b50.json")
    p.add_argument("--curves-from", type=Path, default=None,
                   help="reuse the curves of an earlier --json (same grid and sentences) instead of measuring them")
    p.add_argument("--json", type=Path, default=None)
    cfg = p.parse_args(argv)
    start = time.perf_counter()
    dcfg = argparse.Namespace(batch_size=32, max_length=64, steps=200, eval_sentences=512, calib_batches=8)
    data = training_data(dcfg, 0)
    dense = SentenceEncoder().eval()
    names = select_linear_layers(dense, dense.gsm_default_include)
    stats = collect_input_stats(dense, data.calibration_batches, layers=names,
                                forward=lambda m, b: m(b))
    embed = mean_pooled_embed_fn(dense.model, data.tokenizer, max_length=64)
    test = data.sentences["test"][:512]
    held = data.sentences["train"][: cfg.probe_sentences]
    ref_test, ref_held = embed(test), embed(held)
    weights = {n: dense.get_submodule(n).weight.detach().clone() for n in names}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    short = {n: n.replace("model.encoder.layer.", "") for n in names}

    def set_ranks(ranks: dict[str, int]) -> None:
        for n, r in ranks.items():
            u, v = whitened_low_rank(weights[n], stats[n], r)
            dense.get_submodule(n).weight.data.copy_(u @ v.t())

    def restore() -> None:
        for n in names:
            dense.get_submodule(n).weight.data.copy_(weights[n])

    def cos(ref: torch.Tensor, texts: list[str]) -> float:
        return float((embed(texts) * ref).sum(-1).mean())

    t0 = time.perf_counter()
    curves: dict[str, list[tuple[int, float]]] = {}
    if cfg.curves_from is not None:
        stored = json.loads(cfg.curves_from.read_text())
        curves = {n: [tuple(p) for p in stored["curves"][short[n]]] for n in names}
    for n in ([] if curves else names):
        pts = []
        for ratio in cfg.grid:
            r = rank_at(weights[n], ratio)
            set_ranks({n: r})
            pts.append((r, 1.0 - cos(ref_held, held)))
        restore()
        curves[n] = sorted(set(pts))
        print(n, [(r, round(err, 4)) for r, err in curves[n]], flush=True)
    curves_s = time.perf_counter() - t0 if cfg.curves_from is None else stored["curves_s"]
    learned = json.loads(cfg.learned.read_text())["rows"][0]["ratios"] if cfg.learned.exists() else None
    rows = []
    for budget in cfg.budgets:
        rules = {"uniform": {n: rank_at(weights[n], budget) for n in names},
                 "greedy-whitened": allocate_ranks_greedy(weights, stats, budget),
                 "measured": measured_allocation(curves, shapes, budget)}
        at_budget = {}
        for n in names:
            r0 = rank_at(weights[n], budget)
            at_budget[n] = [min(curves[n], key=lambda pt, r0=r0: abs(pt[0] - r0))]
        rules["measured, one point"] = allocate_ranks_greedy(weights, stats, budget,
                                                             gains=layer_gains(at_budget, weights, stats))
        if learned is not None and abs(json.loads(cfg.learned.read_text())["rows"][0]["budget"] - budget) < 1e-9:
            total = sum(learned[short[n]] * o * i for n, (o, i) in shapes.items())
            scale = budget * sum(o * i for o, i in shapes.values()) / total
            rules["gblr-learned (re-fit)"] = {n: rank_at(weights[n], learned[short[n]] * scale) for n in names}
        for rule, ranks in rules.items():
            set_ranks(ranks)
            ratios = {short[n]: round(ranks[n] * sum(shapes[n]) / (shapes[n][0] * shapes[n][1]), 3) for n in names}
            flops = sum(ranks[n] * sum(shapes[n]) for n in names) / sum(o * i for o, i in shapes.values())
            row = {"budget": budget, "rule": rule, "flops_ratio": round(flops, 4), "cos_test": cos(ref_test, test),
                   "cos_held": cos(ref_held, held), "by_type": by_type(ratios), "ratios": ratios}
            restore()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ratios"}), flush=True)
    total_s = time.perf_counter() - start
    if cfg.json:
        cfg.json.write_text(json.dumps({"rows": rows, "curves": {short[n]: c for n, c in curves.items()},
                                        "curves_s": curves_s, "total_s": total_s, "machine": machine_info(),
                                        "argv": sys.argv[1:] if argv is None else argv}, indent=1))
    print(f"{total_s:.0f} s (curves {curves_s:.0f} s)")


if __name__ == "__main__":
    main()
