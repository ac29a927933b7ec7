"""Phase 1's masks: one mask side, forward + backward, as one closed-form autograd node (eager ``gaudi_mask``) against
the op graph it replaced (``_gaudi_mask_graph``: what ``torch.compile`` traces), and all layers' masks in one call
per mask length (``core.mask_batch.prepare_masks``) against one call per layer side (issue 26).

    python -m benchmarks.bench_masks                 # prints the table
    python -m benchmarks.bench_masks --rounds 9

Each cell is the median over ``--rounds`` rounds of the two timed one after the other, on 1 torch thread, with sigma
5 and straight-through rounding (phase 1's setting).  The model case is the quickstart's 20 GBLR layers (ViT dim 64,
depth 4: q/k/v 64x64, fc1 64x128, fc2 128x64, K = 64 each), forward + backward of every mask (and nothing else).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_masks.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402
from gsm_lightning.core.layer import GBLRLinear, gblr_layers  # noqa: E402
from gsm_lightning.core.mask_batch import prepare_masks, release_masks  # noqa: E402
from gsm_lightning.core.masks import _gaudi_mask_graph, gaudi_mask  # noqa: E402

SIDES = [(64, 64), (384, 64), (384, 384), (384, 1536)]  # (K, n)


def _time(fn: Callable[[], None], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def side_case(k: int, n: int, rounds: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(k, generator=gen).requires_grad_()
    loc = torch.rand(k, generator=gen).requires_grad_()
    reps = max(1, int(2e6 // (k * n)))

    def fused() -> None:
        gaudi_mask(w, loc, n, 5.0).sum().backward()

    def graph() -> None:
        _gaudi_mask_graph(w, loc, n, 5.0, True).sum().backward()

    pairs = [(_time(graph, reps), _time(fused, reps)) for _ in range(rounds)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def quickstart_layers() -> nn.Module:
    layers = []
    for _ in range(4):
        layers += [GBLRLinear(64, 64, sigma=5.0) for _ in range(3)] + [GBLRLinear(64, 128, sigma=5.0),
                                                                      GBLRLinear(128, 64, sigma=5.0)]
    return nn.ModuleList(layers)


def model_case(rounds: int) -> tuple[float, float]:
    model = quickstart_layers()

    def per_layer() -> None:
        total = sum(sum(mask.sum() for mask in m.masks()) for _, m in gblr_layers(model))
        total.backward()

    def batched() -> None:
        prepare_masks(model)
        total = sum(m._prepared_masks[2].sum() + m._prepared_masks[3].sum() for _, m in gblr_layers(model))
        release_masks(model)
        total.backward()

    pairs = [(_time(per_layer, 5), _time(batched, 5)) for _ in range(rounds)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"Command: `python -m benchmarks.bench_masks --rounds {args.rounds}` ({machine_info(1)}).", "",
             "| case | before (ms) | now (ms) | now / before |", "|---|---|---|---|"]
    for k, n in SIDES:
        before, now = side_case(k, n, args.rounds)
        lines.append(f"| one side, K={k}, n={n}: op graph -> closed form | {before:.3f} | {now:.3f} | {now / before:.2f}x |")
        print(lines[-1], flush=True)
    before, now = model_case(args.rounds)
    lines.append(f"| quickstart's 20 layers: per layer -> one call per mask length | {before:.2f} | {now:.2f} | "
                 f"{now / before:.2f}x |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
