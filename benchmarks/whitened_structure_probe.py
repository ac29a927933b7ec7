"""Is there structure beyond low rank in MiniLM's layers, under the calibrated (whitened) objective?

For every converted linear of all-MiniLM-L6-v2 (q/k/v and FFN, 30 layers), with ``S`` the whitening factor of its
calibration inputs (the first ``--calib-batches`` training batches of ``compress_minilm``, seed 0), the relative
output error ``||(W - W') S|| / ||W S||`` at a FLOPs budget of:

* ``lowrank``: the whitened SVD (the optimum over rank-r ``W'``);
* ``rows B``: GBLR components whose output window is one of ``B`` equal row blocks (input: full width), each block
  fitted by its own whitened SVD and the rank-1 terms of all blocks bought by energy: optimal for that partition,
  because row blocks decouple under the whitened objective (``||(W - W')S||^2`` is the sum over blocks).  ``B`` = 12
  on the 384-wide q/k/v outputs is one block per attention head.  A term costs ``in + out / B`` multiply-adds;
* ``mixed``: ``r0`` full-width whitened terms (a fraction 1, 0.9, 0.8, 0.7 or 0.5 of the low-rank rank), then row-block
  terms (``B`` in 2, 4, 8) on the residual with the rest of the budget; the best combination per layer.

A GBLR layer can express all three, so if the layers had block structure the ``rows`` or ``mixed`` errors would fall
below ``lowrank``.

    python -m benchmarks.whitened_structure_probe --json docs/compress_minilm/whitened_structure_probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.compress_minilm import parse_args as minilm_args  # noqa: E402
from benchmarks.compress_minilm import training_data  # noqa: E402
from gsm_lightning.core.calibration import collect_input_stats  # noqa: E402
from gsm_lightning.core.conversion import select_linear_layers  # noqa: E402
from gsm_lightning.models import SentenceEncoder, default_gsm_include  # noqa: E402

BLOCKS = (2, 3, 4, 6, 8, 12, 16)
MIX_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.5)
MIX_BLOCKS = (2, 4, 8)


def row_block_energy(m: torch.Tensor, blocks: int, budget: float) -> float:
    """Largest energy of ``m`` (out x in) kept by rank-1 terms on ``blocks`` row blocks within ``budget`` MACs."""
    out, inn = m.shape
    sv2 = torch.linalg.svdvals(m.reshape(blocks, out // blocks, inn)).pow(2).flatten()
    n = int(budget // (inn + out // blocks))
    return float(sv2.sort(descending=True).values[:n].sum())


def probe_layer(w: torch.Tensor, s: torch.Tensor, ratio: float) -> dict[str, float]:
    ws = w.double() @ s
    out, inn = ws.shape
    total = float(ws.pow(2).sum())
    budget = ratio * inn * out
    u, sv, vh = torch.linalg.svd(ws, full_matrices=False)
    rank = int(budget // (inn + out))
    res = {"lowrank": math.sqrt(float(sv[rank:].pow(2).sum()) / total)}
    for b in BLOCKS:
        if out % b == 0:
            res[f"rows {b}"] = math.sqrt(max(total - row_block_energy(ws, b, budget), 0.0) / total)
    best = res["lowrank"]
    for frac in MIX_FRACTIONS:
        r0 = int(rank * frac)
        resid = ws - (u[:, :r0] * sv[:r0]) @ vh[:r0]
        left = budget - r0 * (inn + out)
        energy = float(resid.pow(2).sum())
        for b in MIX_BLOCKS:
            if out % b == 0:
                best = min(best, math.sqrt(max(energy - row_block_energy(resid, b, left), 0.0) / total))
    res["mixed"] = best
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    cfg = p.parse_args(argv)
    start = time.perf_counter()
    data = training_data(minilm_args(["--calib-batches", str(cfg.calib_batches)]), 0)
    enc = SentenceEncoder().eval()
    names = select_linear_layers(enc, default_gsm_include(enc))
    stats = collect_input_stats(enc, data.calibration_batches, layers=names, forward=lambda m, b: m(b))
    layers = {}
    for name in names:
        w = enc.get_submodule(name).weight.detach()
        s = stats[name].whitening()
        layers[name.replace("model.encoder.layer.", "")] = {str(r): probe_layer(w, s, r) for r in cfg.budgets}
    summary = {}
    for r in cfg.budgets:
        keys = sorted({k for v in layers.values() for k in v[str(r)]}, key=lambda k: (k != "lowrank", k != "mixed", k))
        summary[str(r)] = {k: statistics.median(v[str(r)][k] for v in layers.values() if k in v[str(r)]) for k in keys}
        gain = [v[str(r)]["lowrank"] - v[str(r)]["mixed"] for v in layers.values()]
        summary[str(r)]["mixed: largest drop below lowrank"] = max(gain)
        beaten = sum(any(e < v[str(r)]["lowrank"] - 1e-12 for k, e in v[str(r)].items() if k.startswith("rows"))
                     for v in layers.values())
        summary[str(r)]["layers where some row partition beats lowrank"] = beaten
    out = {"argv": argv, "machine": machine_info(), "seconds": time.perf_counter() - start, "summary": summary,
           "layers": layers}
    print(json.dumps(summary, indent=1))
    if cfg.json:
        cfg.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
