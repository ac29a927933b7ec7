"""Whole-model CPU inference: the Fashion-MNIST ViT and Mixer with learned GBLR structures against their dense twins.

    python benchmarks/bench_models.py            # full run, rewrites the models section of BENCHMARKS.md
    python benchmarks/bench_models.py --quick    # smoke run (short timings, batch 1 and 8, no compile)

Models: ``backbone('vit')`` and ``backbone('mixer')`` of ``benchmarks/accuracy_fmnist.py``.  The GBLR models get the
structures learned at 30 % and 50 % FLOPs (fixtures ``benchmarks/data/structures_fmnist_*_s0.json``, written by
``benchmarks/save_structures.py fmnist``) with **random weights** (:func:`gsm_lightning.structure_io.apply_structure`:
timing does not depend on the values); every other layer is the dense twin's.  Variants:

* ``dense``: the dense twin (``nn.Linear`` everywhere);
* ``frozen``: frozen ``GBLRLinear`` layers as trained (their plain forward);
* ``auto``: ``optimize_inference(mode='auto', sample_input=<a batch of 32 images>)``: per layer the fastest of dense
  and the ``CompactGBLR`` paths by its own timing, with the dense fallback for small token counts, then the whole model
  timed on those images against its dense merge (every layer merged to dense unless it is at least 5 % faster);
* ``compact``: ``optimize_inference(mode='compact')`` (every GBLR layer a ``CompactGBLR``, no fallback).

Latency: median over rounds of ``torch.utils.benchmark.Timer.blocked_autorange`` per variant, the variants of a
model interleaved inside every round; ratios are the median over rounds of the per-round ratio against dense.
Throughput: images/s of ``Trainer.predict`` over a loader of random images (median of repeats).  ``torch.compile``
(inductor, default options): the compiled dense twin against the compiled ``auto`` model.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_speed import machine_info  # noqa: E402
from benchmarks.common import write_section  # noqa: E402
from gsm_lightning.inference import optimize_inference  # noqa: E402
from gsm_lightning.structure_io import apply_structure, load_structure  # noqa: E402

START, END = "<!-- models:start -->", "<!-- models:end -->"
DATA = ROOT / "benchmarks" / "data"


def backbone(name: str) -> nn.Module:
    """The benchmark model of ``benchmarks/accuracy_fmnist.py``."""
    from benchmarks.accuracy_fmnist import backbone as fmnist_backbone

    return fmnist_backbone(name)


def fixture(model: str, budget: float) -> Path:
    return DATA / f"structures_fmnist_{model}_b{budget:g}_s0.json"


def build_variants(model: str, budget: float, routing_batch: int = 32, seed: int = 0) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """``{variant: model}`` for one structure file, all in eval mode, and facts about the routing."""
    torch.manual_seed(seed)
    dense = backbone(model).eval()
    structure = load_structure(fixture(model, budget))
    frozen = apply_structure(copy.deepcopy(dense), structure, seed=seed).eval()
    auto, compact = copy.deepcopy(frozen), copy.deepcopy(frozen)
    x = torch.randn(routing_batch, 1, 28, 28)
    rep = optimize_inference(auto, mode="auto", sample_input=x)
    optimize_inference(compact, mode="compact", tokens=rep.tokens)
    with torch.no_grad():
        ref = frozen(x)
        for m in (auto, compact):
            err = float((m(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            assert err < 1e-4, f"{model} {budget}: optimized model differs from the frozen one ({err:.2e})"
    info = {"layers": len(rep.layers), "compact": sum(c.choice == "compact" for c in rep.layers),
            "fallback": sum(c.dense_below > 0 for c in rep.layers), "flops_ratio": structure["flops_ratio"],
            "paths": sorted({c.path for c in rep.layers if c.path}), "model_ratio": rep.model_ratio, "reverted": rep.reverted}
    return {"dense": dense, "frozen": frozen, "auto": auto, "compact": compact}, info


def interleaved(fns: dict[str, Callable[[], Any]], threads: int, rounds: int, min_run_time: float) -> dict[str, list[float]]:
    """Per-variant lists of ``blocked_autorange`` medians, the variants interleaved within each round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            out[k].append(t.blocked_autorange(min_run_time=min_run_time).median)
    return out


def ratio(times: dict[str, list[float]], key: str, ref: str = "dense") -> float:
    return statistics.median(a / b for a, b in zip(times[key], times[ref]))


def bench_latency(models: dict[str, dict[str, nn.Module]], batches: list[int], threads_list: list[int], rounds: int,
                  min_run_time: float) -> list[str]:
    rows = ["| model | budget | batch | threads | dense (ms) | frozen GBLRLinear | auto | compact |",
            "|---|---|---|---|---|---|---|---|"]
    for key, variants in models.items():
        name, budget = key.split("@")
        for batch in batches:
            x = torch.randn(batch, 1, 28, 28)
            for threads in threads_list:
                with torch.no_grad():
                    fns = {v: (lambda m=m, x=x: m(x)) for v, m in variants.items()}
                    t = interleaved(fns, threads, rounds, min_run_time)
                rows.append(f"| {name} | {budget} | {batch} | {threads} | {statistics.median(t['dense']) * 1e3:.2f} | "
                            f"{ratio(t, 'frozen'):.2f}x | {ratio(t, 'auto'):.2f}x | {ratio(t, 'compact'):.2f}x |")
                print(rows[-1], flush=True)
    return rows


def lightning_wrapper(model: nn.Module) -> Any:
    """A minimal LightningModule around ``model`` whose ``predict_step`` returns the predicted classes."""
    import lightning.pytorch as pl

    class Wrapper(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).argmax(-1)

    return Wrapper(model)


def bench_predict(models: dict[str, dict[str, nn.Module]], images: int, batch: int, repeats: int, threads: int) -> list[str]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(images, 1, 28, 28)), batch_size=batch)
    rows = ["| model | budget | dense (images/s) | auto | compact |", "|---|---|---|---|---|"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for key, variants in models.items():
            name, budget = key.split("@")
            speed: dict[str, list[float]] = {v: [] for v in ("dense", "auto", "compact")}
            for _ in range(repeats):
                for v in speed:  # interleaved
                    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                         enable_model_summary=False, enable_checkpointing=False)
                    lm = lightning_wrapper(variants[v])
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        trainer.predict(lm, dataloaders=loader, return_predictions=False)
                        speed[v].append(images / (time.perf_counter() - t0))
            dense = statistics.median(speed["dense"])
            rel = {v: statistics.median(a / b for a, b in zip(speed[v], speed["dense"])) for v in ("auto", "compact")}
            rows.append(f"| {name} | {budget} | {dense:.0f} | {rel['auto']:.2f}x | {rel['compact']:.2f}x |")
            print(rows[-1], flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


def bench_compile(models: dict[str, dict[str, nn.Module]], batches: list[int], threads: int, rounds: int,
                  min_run_time: float) -> tuple[list[str], float]:
    rows = ["| model | budget | batch | compiled dense (ms) | compiled auto | compiled auto / eager auto |",
            "|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    compiled_dense: dict[str, Any] = {}
    for key, variants in models.items():
        name, budget = key.split("@")
        if name not in compiled_dense:
            compiled_dense[name] = torch.compile(copy.deepcopy(variants["dense"]))
        cauto = torch.compile(variants["auto"])
        for batch in batches:
            x = torch.randn(batch, 1, 28, 28)
            with torch.no_grad():
                ref = variants["auto"](x)
                got = cauto(x)
                compiled_dense[name](x)
                assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), f"compiled {key} differs"
                fns = {"dense": lambda m=compiled_dense[name], x=x: m(x), "auto": lambda m=cauto, x=x: m(x),
                       "eager": lambda m=variants["auto"], x=x: m(x)}
                t = interleaved(fns, threads, rounds, min_run_time)
            rows.append(f"| {name} | {budget} | {batch} | {statistics.median(t['dense']) * 1e3:.2f} | {ratio(t, 'auto'):.2f}x | "
                        f"{ratio(t, 'auto', 'eager'):.2f}x |")
            print(rows[-1], flush=True)
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1 and 8, one thread, short timings, no compile")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file whose models section is rewritten")
    ap.add_argument("--models", default="vit,mixer")
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per latency (default 7, quick 2)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-predict", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    rounds = args.rounds or (2 if q else 7)
    mrt = 0.02 if q else 0.2
    batches = [1, 8] if q else [1, 32, 256]
    threads_list = [1] if q else [1, 2]
    t0 = time.time()
    default_threads = torch.get_num_threads()
    cmd = "python benchmarks/bench_models.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    models: dict[str, dict[str, nn.Module]] = {}
    infos = []
    for name in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            torch.set_num_threads(1)
            variants, info = build_variants(name, budget)
            models[f"{name}@{budget:g}"] = variants
            infos.append(f"{name} {budget:g}: FLOPs ratio {info['flops_ratio']:.3f} of the converted layers; auto kept "
                         f"{info['compact']} of {info['layers']} GBLR layers compact (paths: {', '.join(info['paths']) or '-'}), "
                         f"{info['fallback']} of them with the dense fallback"
                         + ("" if info["model_ratio"] is None else
                            f"; its whole-model check on the 32 images timed the per-layer choice at {info['model_ratio']:.2f}x "
                            "the dense merge" + (", not 5 % faster: every layer merged to dense" if info["reverted"] else ", kept")))
            print(infos[-1], flush=True)
    torch.set_num_threads(default_threads)
    print("latency", flush=True)
    lat = bench_latency(models, batches, threads_list, rounds, mrt)
    pred: list[str] = []
    n_images = 512 if q else 4096
    if not args.no_predict:
        print("predict", flush=True)
        pred = bench_predict(models, n_images, 256, 2 if q else 3, 1)
    comp: list[str] = []
    comp_s = 0.0
    if not (q or args.no_compile):
        print("compile", flush=True)
        torch.set_num_threads(1)
        comp, comp_s = bench_compile(models, [32, 256], 1, rounds, mrt)
    torch.set_num_threads(default_threads)
    elapsed = time.time() - t0
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    body = "\n".join([
        "## Whole-model inference (CPU): Fashion-MNIST ViT and Mixer, learned structures vs dense twins"
        + (" -- QUICK SMOKE RUN, not representative" if q else ""),
        "",
        f"- Machine: {machine_info()}; load average at the end of the run {load:.1f} (other jobs shared the cores: "
        "read the ratios, which are measured against dense in the same rounds, not the absolute times)",
        f"- Command: `{cmd}` (took {elapsed:.0f} s); date: {date}",
        "- Models: `backbone('vit')` (dim 96, depth 4, 49 tokens) and `backbone('mixer')` (dim 96, depth 4, token MLP "
        "49-64-49, channel MLP 96-384-96) of `benchmarks/accuracy_fmnist.py`; structures learned at 30 % / 50 % FLOPs "
        "(`benchmarks/data/structures_fmnist_*_s0.json`), **random weights**. `frozen` = the frozen GBLRLinear layers, "
        "`auto` = `optimize_inference(mode='auto', sample_input=<32 images>)` (timed per layer, dense fallback at small "
        "token counts, then the whole model checked against its dense merge on those images), `compact` = every GBLR layer a CompactGBLR. Ratios: median over rounds of the per-round ratio "
        "against dense (variants interleaved within each round); dense in ms: median.",
        *[f"- {line}" for line in infos],
        "",
        "### Latency (one forward, `torch.no_grad`), relative to the dense twin",
        "",
        *lat,
        "",
        "",
    ])
    if pred:
        body += "\n".join([
            f"### Throughput in Lightning's `Trainer.predict` loop (1 thread, batch 256, {n_images} random images, median "
            "of repeats; images/s, ratios: higher is better)",
            "",
            *pred,
            "",
            "",
        ])
    if comp:
        body += "\n".join([
            f"### `torch.compile` (inductor, default options; 1 thread; compiling took {comp_s:.0f} s in all)",
            "",
            "`compiled auto` = the compiled `auto` model against the compiled dense twin; the last column compares the "
            "compiled `auto` model with the same model in eager mode.",
            "",
            *comp,
            "",
        ])
    write_section(body.rstrip(), args.output, START, END)
    print(f"wrote {args.output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

