"""Speed/memory benchmarks of GBLR layers against nn.Linear (CPU, torch.utils.benchmark).

    python benchmarks/bench_speed.py            # full run, rewrites the speed section of BENCHMARKS.md
    python benchmarks/bench_speed.py --quick    # small shapes, short timings (smoke test)

Sections (see benchmarks/README.md for what exactly is measured):
  P1  training step (forward + backward, structure learning: not frozen, sigma = 1) vs nn.Linear
  P2  frozen inference: plain frozen GBLRLinear, CompactGBLR and the auto choice vs nn.Linear
  MEM peak CPU memory allocated during one training step (torch.profiler memory events)
  SC  scaling of mask computation and training step with n = in = out, K = n
  P3  frozen inference on real learned structures (benchmarks/data/structures_*.json, random weights)
  AL  the same MiniLM structures after a tile-aligned freeze (gsm_lightning.core.align) at several tile sizes
  FL  the low-rank floor of those layers on every CPU gemm backend of the torch build (eager, MKL packed, oneDNN, inductor)
Every number written comes from this run; ratios are against nn.Linear measured in the same run.

    python benchmarks/bench_speed.py --sections p3 --output /tmp/p3.md   # only P3, written to another file
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_speed.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from gsm_lightning.core.align import align_structure  # noqa: E402
from gsm_lightning.core.flops import structure_flops  # noqa: E402
from gsm_lightning.core.layer import GBLRLinear  # noqa: E402
from gsm_lightning.infer.inference import CompactGBLR, optimize_inference, padded_rank  # noqa: E402
from gsm_lightning.io.structure_io import frozen_layer, load_structure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- speed:start -->", "<!-- speed:end -->"
Timer = Callable[[Callable[[], Any], int], float]


# ------------------------------------------------------------------------------------ structures
def _scale_to_budget(f: np.ndarray, n: np.ndarray, target: float, r: int) -> np.ndarray:
    """Integer widths round(clip(a f, 0, 1) n) with the largest a whose FLOPs stay <= target."""
    def cost(a: float) -> tuple[float, np.ndarray]:
        w = np.round(np.clip(a * f, 0, 1) * n[:, None])
        act = (w[0] > 0) & (w[1] > 0)
        return float(r * (w[0] + w[1])[act].sum()), w

    lo, hi = 0.0, 1.0
    while cost(hi)[0] < target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid)[0] <= target else (lo, mid)
    return cost(lo)[1].astype(np.int64)


def learned_like(n_in: int, n_out: int, ratio: float, seed: int = 0, random_locations: bool = False,
                 spread: float = 0.08, full_frac: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(widths, locations) ``(2, K)`` ints, K = min(in, out): "learned-like" structure at ``ratio`` of dense FLOPs.

    Width fractions f ~ Beta(0.5, 2) i.i.d. per side and component (many narrow, a few wide); the first
    ``full_frac`` of the components get f = 1 on both sides (the full-width components of the 'splr'
    init); widths = round(clip(a f, 0, 1) n) with a scalar a found by bisection so the FLOPs hit the
    budget; locations = round(((N(0, spread) mod 1) n) (windows clustered around 0, where structure
    learning starts, some wrapping around).  ``random_locations``: locations uniform on [0, n) instead."""
    rng = np.random.default_rng(seed)
    k = min(n_in, n_out)
    n = np.array([n_in, n_out])
    f = rng.beta(0.5, 2.0, size=(2, k))
    f[:, : int(full_frac * k)] = 1.0
    w = _scale_to_budget(f, n, ratio * n_in * n_out, 1)
    loc = rng.random((2, k)) if random_locations else np.mod(rng.normal(0.0, spread, size=(2, k)), 1.0)
    return w, np.mod(np.round(loc * n[:, None]).astype(np.int64), n[:, None])


def block_low_rank(n_in: int, n_out: int, ratio: float, grid: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A ``grid x grid`` block grid, every block holding r' rank-1 components spanning it exactly
    (components share spans); r' = round(ratio * in * out / (grid * (in + out)))."""
    rb = max(1, round(ratio * n_in * n_out / (grid * (n_in + n_out))))
    bi, bo = n_in // grid, n_out // grid
    i, o = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    li = np.repeat(i.reshape(-1) * bi, rb)
    lo = np.repeat(o.reshape(-1) * bo, rb)
    w = np.stack([np.full(li.size, bi), np.full(lo.size, bo)])
    return w.astype(np.int64), np.stack([li, lo]).astype(np.int64)


def build_frozen(n_in: int, n_out: int, widths: np.ndarray, locations: np.ndarray, seed: int = 0) -> GBLRLinear:
    """Frozen GBLRLinear with the given integer structure and random factors."""
    g = torch.Generator().manual_seed(seed)
    k = widths.shape[1]
    u = torch.randn(k, 1, n_out, generator=g) / n_out ** 0.5
    v = torch.randn(k, 1, n_in, generator=g) / n_in ** 0.5
    layer = GBLRLinear._from_factors(u, v, torch.as_tensor(widths), torch.as_tensor(locations), torch.zeros(n_out))
    return layer.freeze_structure().eval()


STRUCTURES: dict[str, Callable[[int, int, float], tuple[np.ndarray, np.ndarray]]] = {
    "learned-like": lambda i, o, r: learned_like(i, o, r, seed=0),
    "block-low-rank": block_low_rank,
    "random-loc": lambda i, o, r: learned_like(i, o, r, seed=0, random_locations=True),
}


# --------------------------------------------------------------------------------------- timing
def cpu_timer(min_run_time: float) -> Timer:
    def run(fn: Callable[[], Any], threads: int) -> float:
        t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        return t.blocked_autorange(min_run_time=min_run_time).median
    return run


def peak_cpu_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated (above the level at the start) during one call.

    From torch.profiler with ``profile_memory=True``: every event's *self* CPU memory (allocations minus
    frees inside the op; ``[memory]`` events are frees outside any op), summed in start-time order; the
    peak of that running sum.  Op granularity: an op that allocates and frees a temporary counts net."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return int(peak)


def train_step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(gy)
    return step


def learning_layer(n_in: int, n_out: int, device: Any = None) -> GBLRLinear:
    """A GBLR layer in structure-learning mode: default 'splr' init, sigma = 1, not frozen."""
    torch.manual_seed(0)
    layer = GBLRLinear(n_in, n_out, sigma=1.0, device=device)
    assert layer.widths.requires_grad and layer.locations.requires_grad and not layer.is_frozen
    return layer


# -------------------------------------------------------------------------------------- sections
def bench_p1(shapes: list[tuple[int, int]], tokens: int, threads_list: list[int], timer: Timer,
             device: Any = "cpu") -> tuple[list[str], list[str]]:
    rows = ["| shape (in x out) | tokens | threads | nn.Linear (ms) | GBLRLinear (ms) | ratio | masks fwd+bwd (ms) | masked factors fwd+bwd (ms) |",
            "|---|---|---|---|---|---|---|---|"]
    notes = []
    for (n_in, n_out), threads in ((s, t) for s in shapes for t in threads_list):
        x = torch.randn(tokens, n_in, device=device, requires_grad=True)
        gy = torch.randn(tokens, n_out, device=device)
        lin = nn.Linear(n_in, n_out, device=device)
        layer = learning_layer(n_in, n_out, device)
        t_dense = timer(train_step(lin, x, gy), threads)
        t_gblr = timer(train_step(layer, x, gy), threads)

        def masks_step(layer: GBLRLinear = layer) -> None:
            layer.widths.grad = layer.locations.grad = None
            m_in, m_out = layer.masks()
            (m_in.sum() + m_out.sum()).backward()

        def factors_step(layer: GBLRLinear = layer) -> None:
            for p in (layer.widths, layer.locations, layer.weight_in, layer.weight_out):
                p.grad = None
            v, u = layer.masked_factors()
            (v.sum() + u.sum()).backward()

        t_masks, t_fac = timer(masks_step, threads), timer(factors_step, threads)
        rows.append(f"| {n_in} x {n_out} | {tokens} | {threads} | {t_dense * 1e3:.2f} | {t_gblr * 1e3:.2f} | {t_gblr / t_dense:.2f}x "
                    f"| {t_masks * 1e3:.2f} | {t_fac * 1e3:.2f} |")
        if t_gblr / t_dense > 1.3:
            notes.append(f"{n_in}x{n_out} ({threads} threads): {t_gblr / t_dense:.2f}x dense (over the 1.3x target); masks fwd+bwd "
                         f"{t_masks / t_gblr:.0%} of the step, mask + factor materialisation {t_fac / t_gblr:.0%}, "
                         f"the rest ({max(0.0, 1 - t_fac / t_gblr):.0%}) is the two matmuls and their backward")
        print(rows[-1], flush=True)
    return rows, notes


def bench_p2(shapes: list[tuple[int, int]], ratios: list[float], tokens_list: list[int], threads_list: list[int],
             timer: Timer, structures: list[str], device: Any = "cpu", reps: int = 10) -> list[str]:
    default_threads = torch.get_num_threads()
    rows = ["| shape | structure | FLOPs | tokens | threads | nn.Linear (us) | frozen GBLRLinear | CompactGBLR | compact MACs | auto choice | auto |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n_in, n_out in shapes:
        for ratio in ratios:
            for sname in structures:
                w, loc = STRUCTURES[sname](n_in, n_out, ratio)
                layer = build_frozen(n_in, n_out, w, loc).to(device)
                lin = layer.to_linear()
                for tokens in tokens_list:
                    compact = CompactGBLR.from_gblr(layer, tokens=tokens)
                    x = torch.randn(tokens, n_in, device=device)
                    for threads in threads_list:
                        with torch.no_grad():
                            err = float((compact(x) - lin(x)).abs().max() / lin(x).abs().max().clamp_min(1e-30))
                            assert err < 1e-4, f"CompactGBLR mismatch {err}"
                            t_d = timer(lambda lin=lin, x=x: lin(x), threads)
                            t_g = timer(lambda layer=layer, x=x: layer(x), threads)
                            t_c = timer(lambda compact=compact, x=x: compact(x), threads)
                            torch.set_num_threads(threads)
                            holder = nn.Sequential(layer)
                            rep = optimize_inference(holder, mode="auto", tokens=tokens, reps=reps)
                            c = rep.layers[0]
                            choice = c.choice if c.choice == "dense" else f"{c.path}"
                            auto = holder[0]
                            t_auto = t_d if c.choice == "dense" else timer(lambda auto=auto, x=x: auto(x), threads)
                        rows.append(f"| {n_in}x{n_out} | {sname} | {layer.flops_ratio():.2f} | {tokens} | {threads} | "
                                    f"{t_d * 1e6:.0f} | {t_g / t_d:.2f}x | {t_c / t_d:.2f}x ({compact.path}) | {compact.macs() / (n_in * n_out):.2f} "
                                    f"| {choice} | {t_auto / t_d:.2f}x |")
                        print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    return rows


def bench_memory(shapes: list[tuple[int, int]], tokens: int) -> list[str]:
    rows = ["| shape | tokens | nn.Linear peak (MiB) | GBLRLinear peak (MiB) | ratio |", "|---|---|---|---|---|"]
    for n_in, n_out in shapes:
        x = torch.randn(tokens, n_in, requires_grad=True)
        gy = torch.randn(tokens, n_out)
        m_d = peak_cpu_memory(train_step(nn.Linear(n_in, n_out), x, gy))
        m_g = peak_cpu_memory(train_step(learning_layer(n_in, n_out), x, gy))
        rows.append(f"| {n_in} x {n_out} | {tokens} | {m_d / 2**20:.1f} | {m_g / 2**20:.1f} | {m_g / max(m_d, 1):.2f}x |")
        print(rows[-1], flush=True)
    return rows


def bench_scaling(sizes: list[int], tokens: int, threads: int, timer: Timer, device: Any = "cpu") -> list[str]:
    rows = ["| n = in = out = K | masks fwd+bwd (ms) | GBLR train step (ms) | nn.Linear train step (ms) | ratio |",
            "|---|---|---|---|---|"]
    for n in sizes:
        layer = learning_layer(n, n, device)
        x = torch.randn(tokens, n, device=device, requires_grad=True)
        gy = torch.randn(tokens, n, device=device)

        def masks_step(layer: GBLRLinear = layer) -> None:
            layer.widths.grad = layer.locations.grad = None
            m_in, m_out = layer.masks()
            (m_in.sum() + m_out.sum()).backward()

        t_m = timer(masks_step, threads)
        t_g = timer(train_step(layer, x, gy), threads)
        t_d = timer(train_step(nn.Linear(n, n, device=device), x, gy), threads)
        rows.append(f"| {n} | {t_m * 1e3:.2f} | {t_g * 1e3:.2f} | {t_d * 1e3:.2f} | {t_g / t_d:.2f}x |")
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------- real structures
DATA = ROOT / "benchmarks" / "data"
MINILM = "structures_minilm_b0.3.json"


def short_name(name: str) -> str:
    """A MiniLM linear's table name: ``encoder.layer.0.attention.self.query`` -> ``L0.query`` (FFN: ``.ffn_in/out``)."""
    return (name.replace("encoder.layer.", "L").replace(".attention.self.", ".")
            .replace(".intermediate.dense", ".ffn_in").replace(".output.dense", ".ffn_out"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
OTHER_FIXTURES = ("structures_recovery_block_diagonal.json", "structures_recovery_few_windows.json",
                  "structures_recovery_rectangular.json", "structures_fmnist_vit_b0.3_s0.json",
                  "structures_fmnist_vit_b0.5_s0.json", "structures_fmnist_mixer_b0.3_s0.json",
                  "structures_fmnist_mixer_b0.5_s0.json")


def interleaved_ratios(fns: dict[str, Callable[[], Any]], threads: int, rounds: int, min_run_time: float,
                       ref: str = "dense") -> tuple[dict[str, float], float]:
    """Median over ``rounds`` of each variant's time over ``ref``'s time in the same round (the variants are
    timed one after the other inside every round), and ``ref``'s median time (s)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            times[k].append(t.blocked_autorange(min_run_time=min_run_time).median)
    ratios = {k: float(np.median([a / b for a, b in zip(v, times[ref])])) for k, v in times.items()}
    return ratios, float(np.median(times[ref]))


def time_real_layer(rec: dict[str, Any], tokens: int, threads: int, rounds: int, min_run_time: float,
                    seed: int = 0) -> dict[str, Any]:
    """Dense, ``CompactGBLR.from_gblr(tokens=T)`` and ``optimize_inference(mode='auto', tokens=T)`` on one stored
    structure (random weights), interleaved."""
    layer = frozen_layer(rec, seed=seed)
    lin = layer.to_linear()
    compact = CompactGBLR.from_gblr(layer, tokens=tokens)
    holder = nn.Sequential(layer)
    with torch_threads(threads):
        rep = optimize_inference(holder, mode="auto", tokens=tokens, reps=10)
    auto = holder[0]
    x = torch.randn(tokens, layer.in_features)
    with torch.no_grad():
        ref = lin(x)
        for m in (compact, auto):
            err = float((m(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            assert err < 1e-4, f"mismatch {err}"
        ratios, t_dense = interleaved_ratios({"dense": lambda: lin(x), "compact": lambda: compact(x), "auto": lambda: auto(x)},
                                             threads, rounds, min_run_time)
    c = rep.layers[0]
    return {"flops": layer.flops_ratio(), "path": compact.path, "macs": compact.macs() / (layer.in_features * layer.out_features),
            "dense_us": t_dense * 1e6, "compact": ratios["compact"], "auto": ratios["auto"],
            "auto_choice": c.choice if c.choice == "dense" else f"{c.path}" + (f" (dense < {c.dense_below})" if c.dense_below else ""),
            "dense_at": c.choice == "dense" or c.dense_below > tokens}


def bench_real(threads: int, rounds: int, min_run_time: float, quick: bool = False) -> tuple[list[str], list[str], list[str]]:
    """P3: per MiniLM layer (both sides >= 384) at 1, 64 and 256 tokens, and per other fixture (median over its layers)."""
    minilm = load_structure(DATA / MINILM)
    names = list(minilm["layers"])[: 2 if quick else None]
    tokens_list = [1, 64, 256]
    rows = ["| layer (MiniLM-L6, 30 % FLOPs) | shape | FLOPs | path (256) | MACs (256) | 1 tok: auto | 64: compact | 64: auto "
            "| 256: compact | 256: auto | goal: auto <= 1.2 x FLOPs at 64 and 256, dense or <= 1.0 at 1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    met = 0
    for name in names:
        rec = minilm["layers"][name]
        res = {t: time_real_layer(rec, t, threads, rounds, min_run_time) for t in tokens_list}
        f = res[256]["flops"]
        # at one token: the routed layer runs the dense weight (same op as nn.Linear), or is measured no slower
        ok = all(res[t]["auto"] <= 1.2 * f for t in (64, 256)) and (res[1]["dense_at"] or res[1]["auto"] <= 1.0)
        met += ok
        short = short_name(name)
        rows.append(f"| {short} | {rec['in_features']}x{rec['out_features']} | {f:.3f} | {res[256]['path']} | {res[256]['macs']:.2f} | "
                    f"{res[1]['auto']:.2f}x ({res[1]['auto_choice']}) | {res[64]['compact']:.2f}x | {res[64]['auto']:.2f}x | "
                    f"{res[256]['compact']:.2f}x | {res[256]['auto']:.2f}x | {'yes' if ok else 'no'} "
                    f"(target {1.2 * f:.2f}) |")
        print(rows[-1], flush=True)
    summary = [f"Goal met for {met} of {len(names)} layers (median timings; dense at 256 tokens took "
               f"{res[256]['dense_us']:.0f} us for the last layer)."]
    other = ["| fixture | layers | shapes | FLOPs (median) | tokens | compact (median, max) | auto (median, max) | auto chose compact |",
             "|---|---|---|---|---|---|---|---|"]
    for fname in OTHER_FIXTURES[:2] if quick else OTHER_FIXTURES:
        path = DATA / fname
        if not path.exists():
            continue
        st = load_structure(path)
        # the first and last blocks of the 4-block models (layers of the same type look alike across depth)
        recs = [r for n, r in st["layers"].items() if len(st["layers"]) <= 4 or n.startswith(("blocks.0.", "blocks.3."))]
        recs = recs[: 2 if quick else None]
        shapes = sorted({f"{r['in_features']}x{r['out_features']}" for r in recs})
        for t in ([1, 256] if quick else [1, 64, 1024]):
            res_l = [time_real_layer(r, t, threads, max(2, rounds // 2), min_run_time) for r in recs]
            comp = [r["compact"] for r in res_l]
            auto = [r["auto"] for r in res_l]
            other.append(f"| {fname.removeprefix('structures_').removesuffix('.json')} | {len(recs)} | {', '.join(shapes)} | "
                         f"{np.median([r['flops'] for r in res_l]):.3f} | {t} | {np.median(comp):.2f}x, {max(comp):.2f}x | "
                         f"{np.median(auto):.2f}x, {max(auto):.2f}x | {sum(r['auto_choice'] != 'dense' for r in res_l)}/{len(res_l)} |")
            print(other[-1], flush=True)
    return rows, summary, other


ALIGN_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
                "encoder.layer.2.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")


def aligned_record(rec: dict[str, Any], align: int) -> dict[str, Any]:
    """``rec`` with its windows snapped by :func:`gsm_lightning.core.align.align_structure` (what
    ``freeze_structure(align=...)`` does at the phase switch)."""
    w = torch.tensor(rec["widths"], dtype=torch.int64).reshape(2, -1)
    loc = torch.tensor(rec["locations"], dtype=torch.int64).reshape(2, -1)
    wa, la = align_structure(w, loc, int(rec["in_features"]), int(rec["out_features"]), align)
    return {**rec, "widths": wa.tolist(), "locations": la.tolist()}


def bench_align(threads: int, rounds: int, min_run_time: float, aligns: list[int],
                quick: bool = False) -> tuple[list[str], list[str]]:
    """AL: one MiniLM layer of each kind (low-rank-like and spread q/k/v, FFN in and out) with its windows aligned to
    each tile size (1 = as stored), at 64 and 256 tokens; and the low-rank floor of each layer (table rows)."""
    minilm = load_structure(DATA / MINILM)
    names = ALIGN_LAYERS[:1] if quick else ALIGN_LAYERS
    tokens_list = [64] if quick else [64, 256]
    rows = ["| layer | shape | align | FLOPs | distinct windows (in, out) | tokens | path | MACs | compact | auto |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    floors = []
    for name in names:
        rec = minilm["layers"][name]
        short = short_name(name)
        for t in tokens_list:
            floors.append(f"| {short} | {t} | " + lowrank_floor(rec, t, threads, rounds, min_run_time) + " |")
            print(floors[-1], flush=True)
        for a in aligns:
            ra = aligned_record(rec, a)
            w = torch.tensor(ra["widths"]).reshape(2, -1)
            loc = torch.tensor(ra["locations"]).reshape(2, -1)
            full = w == torch.tensor([[rec["in_features"]], [rec["out_features"]]])
            win = torch.where(full, 0, loc) * 100_000 + w  # full windows are one window whatever their start
            distinct = f"{win[0].unique().numel()}, {win[1].unique().numel()}"
            for t in tokens_list:
                res = time_real_layer(ra, t, threads, rounds, min_run_time)
                rows.append(f"| {short} | {rec['in_features']}x{rec['out_features']} | {a} | {res['flops']:.3f} | {distinct} | {t} | "
                            f"{res['path']} | {res['macs']:.2f} | {res['compact']:.2f}x | {res['auto']:.2f}x |")
                print(rows[-1], flush=True)
    return rows, ["| layer | tokens | rank of the same FLOPs | x @ A @ B (+ bias), vs nn.Linear |", "|---|---|---|---|", *floors]


def lowrank_floor(rec: dict[str, Any], tokens: int, threads: int, rounds: int, min_run_time: float) -> str:
    """What two plain gemms achieve at the layer's FLOPs: ``x @ A @ B + b`` with the rank ``R`` of a low-rank layer of
    the same multiply-adds (``R (in + out)`` = the structure's FLOPs), timed against ``nn.Linear`` like P3."""
    n_in, n_out, r = int(rec["in_features"]), int(rec["out_features"]), same_flops_rank(rec)
    lin = nn.Linear(n_in, n_out)
    a, b = torch.randn(n_in, r) / n_in ** 0.5, torch.randn(r, n_out) / r ** 0.5
    x = torch.randn(tokens, n_in)
    with torch.no_grad():
        ratios, _ = interleaved_ratios({"dense": lambda: lin(x), "floor": lambda: torch.addmm(lin.bias, x @ a, b)},
                                       threads, rounds, min_run_time)
    return f"{r} | {ratios['floor']:.2f}x"


FLOOR_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")


def same_flops_rank(rec: dict[str, Any]) -> int:
    """Rank ``R`` of a low-rank layer with the multiply-adds of the stored structure: ``R (in + out)`` = its FLOPs."""
    n_in, n_out = int(rec["in_features"]), int(rec["out_features"])
    w = torch.tensor(rec["widths"], dtype=torch.int64).reshape(2, -1)
    return max(1, round(structure_flops(w, n_in, n_out, int(rec["rank_per_component"])) / (n_in + n_out)))


def _compiled(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """``module`` compiled by inductor with ``mode='max-autotune'`` and weight freezing (the CPU gemm template
    is benchmarked against aten/MKL per shape), warmed up on ``x``."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        fn = torch.compile(module.eval(), mode="max-autotune", dynamic=False)
        with torch.no_grad():
            fn(x)
    return lambda: fn(x)


FLOOR_COLUMNS = ("eager `x @ A @ B`", "eager, R padded to a multiple of 8", "eager `linear(linear(x))`", "MKL packed",
                 "oneDNN", "inductor max-autotune")


def _floor_variants(dense: nn.Linear, lowrank: nn.Sequential, x: torch.Tensor, columns: list[str]
                    ) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The timed functions of one FL row: eager ``dense`` and every low-rank variant in ``columns``, with the dense
    layer of the same backend where it differs; and for each column the name of its dense reference."""
    t, r = x.shape[0], lowrank[0].out_features
    a, b = lowrank[0].weight.detach().t().contiguous(), lowrank[1].weight.detach().t().contiguous()
    bias, wd = lowrank[1].bias.detach(), dense.weight.detach()
    r8 = padded_rank(r, 8)
    a8, b8 = torch.nn.functional.pad(a, (0, r8 - r)), torch.nn.functional.pad(b, (0, 0, 0, r8 - r))
    fns: dict[str, Callable[[], Any]] = {
        "dense": lambda: dense(x),
        "eager `x @ A @ B`": lambda: torch.addmm(bias, x @ a, b),
        "eager, R padded to a multiple of 8": lambda: torch.addmm(bias, x @ a8, b8),
        "eager `linear(linear(x))`": lambda: lowrank(x),
    }
    pairs = dict.fromkeys(fns, "dense")
    if "MKL packed" in columns:
        w1, w2 = lowrank[0].weight.detach(), lowrank[1].weight.detach()
        pd, p1, p2 = (torch.ops.mkl._mkl_reorder_linear_weight(w, t) for w in (wd, w1, w2))
        fns["MKL packed dense"] = lambda: torch.ops.mkl._mkl_linear(x, pd, wd, dense.bias, t)
        fns["MKL packed"] = lambda: torch.ops.mkl._mkl_linear(torch.ops.mkl._mkl_linear(x, p1, w1, None, t), p2, w2, bias, t)
        pairs["MKL packed"] = "MKL packed dense"
    if "oneDNN" in columns:
        from torch.utils import mkldnn as to_onednn

        # to_mkldnn replaces the children of a container in place: convert copies
        md, ml = (to_onednn.to_mkldnn(copy.deepcopy(nn.Sequential(m))) for m in (dense, lowrank))
        xm = x.to_mkldnn()
        fns["oneDNN dense"] = lambda: md(xm)
        fns["oneDNN"] = lambda: ml(xm)
        pairs["oneDNN"] = "oneDNN dense"
    if "inductor max-autotune" in columns:
        torch._dynamo.reset()  # static shapes per token count, no cache shared with the previous row
        fns["inductor dense"] = _compiled(copy.deepcopy(dense), x)
        fns["inductor max-autotune"] = _compiled(copy.deepcopy(lowrank), x)
        pairs["inductor max-autotune"] = "inductor dense"
    return fns, pairs


def bench_floor(threads: int, rounds: int, min_run_time: float, compile_: bool = True,
                quick: bool = False) -> list[str]:
    """FL: whether any CPU gemm backend in this torch build runs a low-rank layer (the cheapest exact form of the
    low-rank-like MiniLM structures) closer to its FLOPs ratio than eager ``x @ A @ B``.  Per backend: the low-rank
    product over the same backend's dense layer, and over eager ``nn.Linear``."""
    minilm = load_structure(DATA / MINILM)
    names = FLOOR_LAYERS[:1] if quick else FLOOR_LAYERS
    available = {"MKL packed": torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"),
                 "oneDNN": torch.backends.mkldnn.is_available(), "inductor max-autotune": compile_}
    head = [c for c in FLOOR_COLUMNS if available.get(c, True)]
    rows = ["| layer | shape | tokens | R | FLOPs | target (1.2 x FLOPs) | " + " | ".join(head) + " |",
            "|---" * (6 + len(head)) + "|"]
    with torch_threads(threads):
        for name in names:
            rec = minilm["layers"][name]
            short = short_name(name)
            n_in, n_out, r = int(rec["in_features"]), int(rec["out_features"]), same_flops_rank(rec)
            torch.manual_seed(0)
            dense = nn.Linear(n_in, n_out).eval()
            lowrank = nn.Sequential(nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out)).eval()
            for t in ([64] if quick else [64, 256]):
                fns, pairs = _floor_variants(dense, lowrank, torch.randn(t, n_in), head)
                with torch.no_grad():
                    for fn in fns.values():  # first calls pick kernels and allocate: not timed
                        fn(), fn()
                    ratios, _ = interleaved_ratios(fns, threads, rounds, min_run_time)
                flops = r * (n_in + n_out) / (n_in * n_out)
                cells = [f"{ratios[k] / ratios[pairs[k]]:.2f}x ({ratios[k]:.2f}x)" for k in head]
                rows.append(f"| {short} | {n_in}x{n_out} | {t} | {r} | {flops:.3f} | {1.2 * flops:.2f}x | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    return rows


def bench_rank_sweep(threads: int, rounds: int, min_run_time: float, quick: bool = False) -> list[str]:
    """FL, second table: eager ``x @ A @ B + b`` at ranks around each MiniLM layer kind's learned block rank (its
    number of components times their rank: the rank of the one block the blocks path makes of a low-rank-like layer)
    and that rank padded to a multiple of 8, against ``nn.Linear``."""
    minilm = load_structure(DATA / MINILM)
    names = FLOOR_LAYERS[:1] if quick else FLOOR_LAYERS
    rows = ["| layer | shape | learned block rank | tokens | ranks: x @ A @ B (+ bias) vs nn.Linear |", "|---|---|---|---|---|"]
    with torch_threads(threads):
        for name in names:
            rec = minilm["layers"][name]
            short = short_name(name)
            n_in, n_out = int(rec["in_features"]), int(rec["out_features"])
            learned = len(rec["widths"][0]) * int(rec["rank_per_component"])
            ranks = sorted({learned - learned % 8, learned, padded_rank(learned, 8), same_flops_rank(rec)} - {0})
            torch.manual_seed(0)
            dense = nn.Linear(n_in, n_out).eval()
            for t in ([64] if quick else [64, 256]):
                x = torch.randn(t, n_in)
                fns = {"dense": lambda x=x, dense=dense: dense(x)}
                for r in ranks:
                    a, b = torch.randn(n_in, r) / n_in ** 0.5, torch.randn(r, n_out) / r ** 0.5
                    fns[str(r)] = lambda x=x, a=a, b=b, c=dense.bias: torch.addmm(c, x @ a, b)
                with torch.no_grad():
                    for fn in fns.values():
                        fn(), fn()
                    ratios, _ = interleaved_ratios(fns, threads, rounds, min_run_time)
                cells = ", ".join(f"{r}: {ratios[str(r)]:.2f}x" for r in ranks)
                rows.append(f"| {short} | {n_in}x{n_out} | {learned} | {t} | {cells} |")
                print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------- output
SUBSECTIONS = {"p1": "### P1", "p2": "### P2", "p3": "### P3", "al": "### AL", "fl": "### FL", "mem": "### Memory", "sc": "### Scaling"}


def _subsections(body: str) -> dict[str, str]:
    """The ``### ...`` subsections of a speed section, by key of :data:`SUBSECTIONS`."""
    out: dict[str, str] = {}
    chunks = re.split(r"(?m)^(?=### )", body)
    for chunk in chunks:
        for key, head in SUBSECTIONS.items():
            if chunk.startswith(head):
                out[key] = chunk.rstrip()
    return out


def write_section(path: Path, header: str, blocks: dict[str, str]) -> None:
    """Rewrite the text between the speed markers of ``path`` (created with a title if missing): ``header``, then the
    subsections in :data:`SUBSECTIONS` order, the new ``blocks`` replacing the old ones and the others kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    old: dict[str, str] = {}
    if START in text and END in text:
        old = _subsections(text[text.index(START) + len(START):text.index(END)])
    merged = {k: blocks.get(k, old.get(k)) for k in SUBSECTIONS}
    body = "\n\n".join([header.rstrip(), *(v for v in merged.values() if v)])
    block = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and short timings (smoke run)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file whose speed section is rewritten")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1.0, quick 0.02)")
    ap.add_argument("--sections", default="p1,p2,mem,sc,p3,al,fl", help="comma list of p1, p2, mem, sc, p3, al, fl (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="FL: skip the inductor max-autotune column (compiling takes minutes)")
    ap.add_argument("--aligns", default=None, help="AL: comma list of tile sizes (1 = the stored structure; default "
                    "1,8,16,32,64, quick 1,32)")
    ap.add_argument("--rounds", type=int, default=None, help="P3: interleaved rounds per timing (default 7, quick 2)")
    ap.add_argument("--p2-threads", default=None, help="P2: comma list of torch thread counts (default 1,2; quick 1)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"p1", "p2", "mem", "sc", "p3", "al", "fl"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    q = args.quick
    mrt = args.min_run_time if args.min_run_time is not None else (0.02 if q else 1.0)
    timer = cpu_timer(mrt)
    max_threads = min(2, torch.get_num_threads()) if q else torch.get_num_threads()
    t0 = time.time()
    torch.manual_seed(0)
    cmd = "python benchmarks/bench_speed.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    blocks: dict[str, list[str]] = {}

    if "p1" in sections:
        p1_shapes = [(64, 64), (64, 256)] if q else [(768, 768), (768, 3072), (3072, 768)]
        p1_tokens = 256 if q else 8192
        print("P1 training step", flush=True)
        p1, p1_notes = bench_p1(p1_shapes, p1_tokens, sorted({1, max_threads}), timer)
        blocks["p1"] = ["### P1: training step (forward + backward, structure learning: not frozen, sigma = 1, 'splr' init)", "", *p1, "",
                  *(["Over the 1.3x target: " + "; ".join(p1_notes) + "."] if p1_notes else ["All shapes within the 1.3x target."]), ""]

    if "p2" in sections:
        p2_shapes = [(128, 512)] if q else [(768, 3072), (3072, 768)]
        print("P2 frozen inference", flush=True)
        p2_threads = [int(t) for t in args.p2_threads.split(",")] if args.p2_threads else ([1] if q else [1, 2])
        p2 = bench_p2(p2_shapes, [0.3] if q else [0.3, 0.5], [1, 32] if q else [1, 256], p2_threads,
                      timer, list(STRUCTURES), reps=3 if q else 20)
        blocks["p2"] = ["### P2: frozen inference, latency relative to nn.Linear", "",
                  "`frozen GBLRLinear` = the plain forward of the frozen layer; `CompactGBLR` = planned for the token count "
                  "(path chosen by the cost model); `compact MACs` = multiply-adds of CompactGBLR per token / in*out (padding "
                  "included); `auto` = what `optimize_inference(mode='auto', tokens=T)` chose (dense or a compact path, by its "
                  "own timing; a compact layer may run its dense fallback at few tokens) and the latency of that choice.", "", *p2, ""]

    if "p3" in sections:
        rounds = args.rounds or (2 if q else 7)
        p3_mrt = args.min_run_time if args.min_run_time is not None else (0.02 if q else 0.1)
        print("P3 real learned structures", flush=True)
        p3, p3_summary, p3_other = bench_real(1, rounds, p3_mrt, quick=q)
        blocks["p3"] = ["### P3: frozen inference on real learned structures (1 thread)", "",
                  "Structures from runs of the package (`benchmarks/data/structures_*.json`, regenerated by "
                  "`benchmarks/save_structures.py`), **random weights** (`gsm_lightning.io.structure_io.frozen_layer`). "
                  "Per layer and token count: `nn.Linear`, `CompactGBLR.from_gblr(tokens=T)` (path by the cost model) and "
                  "`optimize_inference(mode='auto', tokens=T)` (fastest path or dense by its own timing, with the dense "
                  f"fallback below the token count where dense was faster), interleaved in {rounds} rounds of "
                  f"`blocked_autorange(min_run_time={p3_mrt})`; each ratio is the median over rounds of the per-round ratio "
                  "against `nn.Linear`. `MACs`: multiply-adds per token of the compact layer / in*out (padding included).",
                  "", *p3, "", *p3_summary, "",
                  "Other fixtures (median and max over their layers, for the Fashion-MNIST models the layers of blocks 0 and 3; "
                  "`auto chose compact` counts layers not merged to dense):",
                  "", *p3_other, ""]

    if "al" in sections:
        rounds = args.rounds or (2 if q else 7)
        al_mrt = args.min_run_time if args.min_run_time is not None else (0.02 if q else 0.1)
        aligns = [int(a) for a in args.aligns.split(",")] if args.aligns else ([1, 32] if q else [1, 8, 16, 32, 64])
        print("AL tile-aligned freeze", flush=True)
        al, al_floor = bench_align(1, rounds, al_mrt, aligns, quick=q)
        blocks["al"] = ["### AL: tile-aligned freeze on the MiniLM structures (1 thread)", "",
                  "One layer of each kind of P3's MiniLM fixture (low-rank-like and spread q/k/v, FFN in, FFN out), its windows "
                  "snapped to multiples of `align` by `gsm_lightning.core.align.align_structure` (what `freeze_structure(align=...)` / "
                  "`GSMModule(freeze_align=...)` do at the phase switch; no side's total width rises), random weights; timed as "
                  f"in P3 ({rounds} interleaved rounds of `blocked_autorange(min_run_time={al_mrt})`, medians of per-round ratios "
                  "against `nn.Linear`). `FLOPs`: the aligned structure's ratio; `distinct windows`: per side, full windows "
                  "counted as one.", "", *al, "",
                  "The floor: two plain gemms at the same FLOPs (`x @ A @ B + b`, A: in x R, B: R x out, R = FLOPs / (in + out)), "
                  "what a low-rank layer of the same cost runs at on this CPU, timed the same way:", "", *al_floor, ""]

    if "fl" in sections:
        rounds = args.rounds or (2 if q else 7)
        fl_mrt = args.min_run_time if args.min_run_time is not None else (0.02 if q else 0.1)
        print("FL low-rank floor across gemm backends", flush=True)
        fl_rows = bench_floor(1, rounds, fl_mrt, compile_=not (q or args.no_compile), quick=q)
        fl_sweep = bench_rank_sweep(1, rounds, fl_mrt, quick=q)
        blocks["fl"] = ["### FL: the low-rank floor across the CPU gemm backends of this torch build (1 thread)", "",
                  "A low-rank layer of the same FLOPs as the stored MiniLM structure (rank `R`, `R (in + out)` = its FLOPs: "
                  "the cheapest exact form of the low-rank-like layers, no padding) against a dense layer, on every gemm "
                  "backend this torch build offers on CPU: eager `torch.addmm(b, x @ A, B)`, the same with `R` padded with zeros to a multiple of 8 (what `CompactGBLR(rank_multiple=8)` does), eager `nn.Linear(nn.Linear(x))` "
                  "(transposed weights), MKL with prepacked weights (`torch.ops.mkl._mkl_linear`, what inductor's freezing "
                  "uses for float32), oneDNN (`torch.utils.mkldnn.to_mkldnn`, input already in oneDNN layout) and "
                  "`torch.compile(mode='max-autotune')` with weight freezing (inductor benchmarks its C++ gemm template "
                  "against aten/MKL per shape). Each cell: the low-rank layer over the **same backend's** dense layer, and "
                  f"in brackets over eager `nn.Linear`; {rounds} interleaved rounds of `blocked_autorange(min_run_time={fl_mrt})`, "
                  "medians of per-round ratios (the same-backend ratio is the quotient of the two medians).", "", *fl_rows, "",
                  "Ranks around each layer's learned block rank (its components x their rank, the one block of a "
                  "low-rank-like layer), eager `x @ A @ B + b` against `nn.Linear`, timed the same way:", "", *fl_sweep, ""]

    if "mem" in sections:
        print("Memory", flush=True)
        mem = bench_memory([(64, 256)] if q else [(768, 3072)], 256 if q else 8192)
        blocks["mem"] = ["### Memory: peak CPU memory allocated during one training step", "",
                  "torch.profiler with `profile_memory=True`: each event's self CPU memory (allocations minus frees inside the op; "
                  "`[memory]` events are frees outside ops) summed in start-time order; the peak of that running sum during one "
                  "forward+backward, above the level at its start (parameters and inputs excluded, gradients and saved activations "
                  "included; op granularity).", "", *mem, ""]

    if "sc" in sections:
        print("Scaling", flush=True)
        sc_tokens = 128 if q else 1024
        sc = bench_scaling([64, 128] if q else [256, 512, 1024, 2048, 4096], sc_tokens, max_threads, timer)
        blocks["sc"] = [f"### Scaling with n (K = n, {sc_tokens} tokens, {max_threads} threads, structure learning, sigma = 1)", "", *sc, ""]

    elapsed = time.time() - t0
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    provenance = (f"_Measured by `{cmd}` (the whole run took {elapsed:.0f} s) on {date}; {machine_info()}; load average "
                  f"{load:.1f} at the end of the run; `blocked_autorange(min_run_time={mrt})` unless the text says otherwise._")
    for lines in blocks.values():
        lines[1:1] = ["", provenance]
    header = "\n".join([
        "## Speed (CPU)" + (" -- QUICK SMOKE RUN, not representative" if q else ""),
        "",
        "Each subsection names the command, machine, load and date of the run that measured it "
        "(`python benchmarks/bench_speed.py --sections ...` reruns some subsections and keeps the others). Timings are "
        "medians; ratios are against `nn.Linear` measured in the same run. See `benchmarks/README.md` for the definitions.",
    ])
    write_section(args.output, header, {k: "\n".join(v).rstrip() for k, v in blocks.items()})
    print(f"wrote {args.output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
