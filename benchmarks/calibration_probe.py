"""Activation-aware (calibrated) conversion of all-MiniLM-L6-v2: output errors per layer and embedding cosine.

Calibration inputs: the 96 training sentences of ``benchmarks/data/minilm_sentences.json`` plus random spans and
pairs of them (as the distillation sampler of ``minilm_conversion.py`` draws them) up to ``--n-calib`` texts (the
train split has only 96 sentences).  Texts are grouped by token length so that no batch holds a padding token (the
statistics see only real tokens).  The q/k/v and FFN linears (``minilm_conversion.INCLUDE``) are converted.

Reported:

* per layer (0.query, 2.intermediate, 4.output) and budget, the relative output error ``||(W - W') S|| / ||W S||``
  (``S`` the whitening factor of the calibration inputs) of plain SVD, whitened SVD (SVD-LLM) and calibrated GBLR
  (``GBLRLinear.from_linear(input_factor=...)``) at the same FLOPs;
* for the whole model, the mean embedding cosine to the dense model on the evaluation sentences (no training) and
  the conversion seconds of plain / whitened low rank (uniform and global rank allocation), calibrated Monarch and
  calibrated GBLR (statistics collection timed separately).

    python benchmarks/calibration_probe.py                 # ~2-3 min on 2 cores
    python benchmarks/calibration_probe.py --fit-steps 20 --layer-fit-steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.minilm_conversion import INCLUDE, embed_all, load_minilm, load_sentences  # noqa: E402
from gsm_lightning import GBLRLinear, gsmify  # noqa: E402
from gsm_lightning.core.baselines import LowRankLinear, baselinify, rank_for_budget  # noqa: E402
from gsm_lightning.core.calibration import (  # noqa: E402
    collect_input_stats,
    optimal_low_rank_error,
    relative_output_error,
)
from gsm_lightning.core.conversion import select_linear_layers  # noqa: E402

PROBE_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.2.intermediate.dense",
                "encoder.layer.4.output.dense")


def calibration_texts(train: list[str], n: int, seed: int = 0) -> list[str]:
    """The training sentences, then random spans (at least half the words) and pairs of them, ``n`` texts in all."""
    rng = random.Random(seed)
    texts = list(train[:n])
    while len(texts) < n:
        words = rng.choice(train).split()
        if rng.random() < 0.5 and len(words) > 3:
            length = rng.randint((len(words) + 1) // 2, len(words))
            start = rng.randint(0, len(words) - length)
            words = words[start:start + length]
        else:
            words = words + rng.choice(train).split()
        texts.append(" ".join(words))
    return texts


def unpadded_batches(tok: Any, texts: list[str], max_length: int, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Batches of texts of equal token length: no padding token reaches the statistics."""
    by_len: dict[int, list[list[int]]] = {}
    for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]:
        by_len.setdefault(len(ids), []).append(ids)
    out = []
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i:i + batch_size])
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    return out


def layer_rows(model: torch.nn.Module, stats: dict, budgets: list[float], fit_steps: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name in PROBE_LAYERS:
        lin = model.get_submodule(name)
        w = lin.weight.detach()
        s = stats[name].whitening()
        for budget in budgets:
            rank = rank_for_budget(w.shape[1], w.shape[0], budget)
            row: dict[str, Any] = {"layer": name.replace("encoder.layer.", ""), "shape": f"{w.shape[1]}->{w.shape[0]}",
                                   "budget": budget, "rank": rank,
                                   "plain_svd": relative_output_error(w, LowRankLinear.from_linear(lin, rank).to_dense(), s),
                                   "whitened_svd": optimal_low_rank_error(w, s, rank)}
            for steps in fit_steps:
                t0 = time.perf_counter()
                layer = GBLRLinear.from_linear(lin, budget=budget, fit_steps=steps, input_factor=s)
                row[f"gblr_{steps}"] = relative_output_error(w, layer.to_dense(), s)
                row[f"gblr_{steps}_s"] = time.perf_counter() - t0
                row[f"gblr_{steps}_flops_ratio"] = layer.flops_ratio()
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def model_rows(base: torch.nn.Module, stats: dict, stats_s: float, budgets: list[float], fit_steps: int,
               evals: dict, target: torch.Tensor) -> list[dict[str, Any]]:
    def cosine(model: torch.nn.Module) -> float:
        return float((embed_all(model, evals) * target).sum(-1).mean())

    methods = {
        "plain SVD": lambda m, b: baselinify(m, "lowrank", b, include=INCLUDE),
        "whitened SVD": lambda m, b: baselinify(m, "lowrank", b, include=INCLUDE, calibration=stats),
        "whitened SVD, global ranks": lambda m, b: baselinify(m, "lowrank", b, include=INCLUDE, calibration=stats,
                                                              allocation="global"),
        "plain Monarch": lambda m, b: baselinify(m, "monarch", b, include=INCLUDE),
        "calibrated Monarch": lambda m, b: baselinify(m, "monarch", b, include=INCLUDE, calibration=stats),
        "weight-space GBLR (fit 0)": lambda m, b: gsmify(m, b, include=INCLUDE, fit_steps=0),
        "calibrated GBLR (fit 0)": lambda m, b: gsmify(m, b, include=INCLUDE, calibration=stats, fit_steps=0),
        f"calibrated GBLR (fit {fit_steps})": lambda m, b: gsmify(m, b, include=INCLUDE, calibration=stats,
                                                                 fit_steps=fit_steps),
    }
    rows = []
    for budget in budgets:
        for method, convert in methods.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = convert(model, budget)
            seconds = time.perf_counter() - t0
            calibrated = "whitened" in method or "calibrated" in method
            errors = [layer.output_error for layer in report.layers if layer.output_error is not None]
            row = {"budget": budget, "method": method, "flops_ratio": report.flops_ratio, "cos_eval": cosine(model),
                   "convert_s": seconds, "with_stats_s": seconds + stats_s if calibrated else seconds,
                   "mean_output_error": sum(errors) / len(errors) if errors else None}
            if "global" in method:
                ranks = report.ranks
                row["ranks"] = {kind: sorted({r for n, r in ranks.items() if kind in n})
                                for kind in ("query", "key", "value", "intermediate", "output")}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def markdown(layer_table: list[dict[str, Any]], model_table: list[dict[str, Any]], fit_steps: list[int]) -> str:
    lines = ["| layer | budget | rank | plain SVD | whitened SVD | " + " | ".join(f"GBLR fit {s} (s)" for s in fit_steps) + " |",
             "|---|---|---|---|---|" + "---|" * len(fit_steps)]
    for r in layer_table:
        gblr = " | ".join(f"{r[f'gblr_{s}']:.4f} ({r[f'gblr_{s}_s']:.1f})" for s in fit_steps)
        lines.append(f"| {r['layer']} {r['shape']} | {r['budget']:g} | {r['rank']} | {r['plain_svd']:.4f} | "
                     f"{r['whitened_svd']:.4f} | {gblr} |")
    lines += ["", "| budget | method | FLOPs ratio | embedding cosine (eval) | mean output error | convert s | with stats s |",
              "|---|---|---|---|---|---|---|"]
    for r in model_table:
        err = "-" if r["mean_output_error"] is None else f"{r['mean_output_error']:.4f}"
        lines.append(f"| {r['budget']:g} | {r['method']} | {r['flops_ratio']:.3f} | {r['cos_eval']:.4f} | {err} | "
                     f"{r['convert_s']:.1f} | {r['with_stats_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--n-calib", type=int, default=256, help="calibration texts (96 train sentences + spans/pairs)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--fit-steps", type=int, default=20, help="calibrated GBLR fit steps per layer, whole model")
    p.add_argument("--layer-fit-steps", type=int, nargs="+", default=[0, 20, 100],
                   help="calibrated GBLR fit steps for the per-layer table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--json", type=Path, default=None)
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    base, tok = load_minilm()
    train, evals = load_sentences()
    texts = calibration_texts(train, cfg.n_calib)
    batches = unpadded_batches(tok, texts, cfg.max_length)
    names = select_linear_layers(base, INCLUDE)
    t0 = time.perf_counter()
    stats = collect_input_stats(base, batches, layers=names)
    stats_s = time.perf_counter() - t0
    tokens = stats[names[0]].count
    print(f"calibration: {len(texts)} texts, {tokens} tokens, {len(batches)} unpadded batches, statistics of "
          f"{len(names)} layers in {stats_s:.1f} s", flush=True)
    eval_batch = dict(tok(evals, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))
    target = embed_all(base, eval_batch)
    layer_table = layer_rows(base, stats, cfg.budgets, cfg.layer_fit_steps)
    model_table = model_rows(base, stats, stats_s, cfg.budgets, cfg.fit_steps, eval_batch, target)
    print(markdown(layer_table, model_table, cfg.layer_fit_steps))
    result = {"n_calib": len(texts), "tokens": tokens, "stats_s": stats_s, "threads": cfg.threads,
              "layers": layer_table, "model": model_table}
    if cfg.json is not None:
        cfg.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
