"""Compress the pretrained all-MiniLM-L6-v2 with every method under the same treatment, and measure what it keeps.

Every method gets the same calibration set (the first ``--calib-batches`` training batches of WordNet sentences),
the same distillation (``GSMModule`` with the dense encoder as teacher, cosine loss on the sentence embeddings, no
labels, ``--steps`` AdamW steps on the same batches) and the same evaluation:

* **fidelity**: mean cosine of the embeddings to the dense model's on ``--eval-sentences`` held-out test sentences,
  after conversion and after distillation;
* **task**: reverse-dictionary retrieval on the test split (find the headword from its gloss, among
  ``--retrieval-entries`` candidate headwords): recall@1 and recall@10, against the dense model's.

Methods (the q/k/v and FFN linears of every layer; ``budget`` = FLOPs of those layers over dense):

* ``gblr``: activation-aware GBLR conversion (starts from the whitened low-rank solution), then phase 1 learns the
  structure under one global budget (the learner may move FLOPs between layers), then frozen and fine-tuned;
* ``svd``: plain truncated SVD, each layer at the budget;
* ``wsvd``: whitened SVD (SVD-LLM), each layer at the budget;
* ``wsvd-global``: whitened SVD with ranks allocated greedily over all layers under the one budget;
* ``monarch``: calibrated block-diagonal-approximation Monarch, each layer at the budget;
* ``wsvd-measured`` / ``gblr-measured``: whitened SVD / GBLR started from per-layer budgets measured on the model's
  output (:class:`~gsm_lightning.core.conversion_spec.MeasuredAllocation` on the first ``--alloc-batches``
  calibration batches); GBLR's rule may move FLOPs from there in phase 1;
* ``wsvd-seq`` / ``wsvd-seq-measured`` / ``gblr-seq-measured``: the same with a sequential calibration
  (``Calibration(sequential=True)``): the layers are converted in forward order, each fitted to the dense model's
  output from the inputs the already converted layers give it;
* ``wsvd-learned``: whitened SVD at the per-layer ratios a GBLR run of the same budget and seed ended with
  (``--allocation-from`` its ``--json``), distilled like the others: the learned allocation with the whitened start
  and every step at the final structure, paired with ``wsvd-measured``.

    python -m benchmarks.compress_minilm --write-md                   # the BENCHMARKS.md table
    python -m benchmarks.compress_minilm --quick                      # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/compress_minilm.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine_info, write_section  # noqa: E402
from gsm_lightning.core.conversion_spec import Calibration, Conversion, MeasuredAllocation  # noqa: E402
from gsm_lightning.core.layer import gblr_layers  # noqa: E402
from gsm_lightning.data.sentences import (  # noqa: E402
    SentenceDataModule,
    first_sense_entries,
    mean_pooled_embed_fn,
    reverse_dictionary_recall,
)
from gsm_lightning.learn.rules import BudgetRule, StructureRule  # noqa: E402
from gsm_lightning.learn.schedules import SigmaSchedule  # noqa: E402
from gsm_lightning.learn.sensitivity import SensitivityRule  # noqa: E402
from gsm_lightning.models import SentenceEncoder  # noqa: E402
from gsm_lightning.training.distillation import Distillation  # noqa: E402
from gsm_lightning.training.module import GSMModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- compress-minilm:start -->", "<!-- compress-minilm:end -->"
METHODS = {
    "gblr": {"method": "gblr", "calibrated": True, "allocation": "uniform"},
    "svd": {"method": "lowrank", "calibrated": False, "allocation": "uniform"},
    "wsvd": {"method": "lowrank", "calibrated": True, "allocation": "uniform"},
    "wsvd-global": {"method": "lowrank", "calibrated": True, "allocation": "global"},
    "monarch": {"method": "monarch", "calibrated": True, "allocation": "uniform"},
    "wsvd-measured": {"method": "lowrank", "calibrated": True, "allocation": "measured"},
    "gblr-measured": {"method": "gblr", "calibrated": True, "allocation": "measured"},
    "wsvd-seq": {"method": "lowrank", "calibrated": True, "allocation": "uniform", "sequential": True},
    "wsvd-seq-measured": {"method": "lowrank", "calibrated": True, "allocation": "measured", "sequential": True},
    "gblr-seq-measured": {"method": "gblr", "calibrated": True, "allocation": "measured", "sequential": True},
    # the whitened SVD at the per-layer ratios a GBLR run of the same budget and seed ended with (--allocation-from):
    # what the learned allocation is worth with the whitened start and every step at the final structure
    "wsvd-learned": {"method": "lowrank", "calibrated": True, "allocation": "learned"},
}

PREFIX = "model.encoder.layer."  # the converted layers' names in the tables drop it


def learned_allocations(files: list[Path]) -> dict[tuple[float, int], dict[str, Any]]:
    """``{(budget, seed): row}`` of the GBLR rows in these ``--json`` outputs; two GBLR rows of one budget and seed
    are an error (give the file of the one run whose allocation is meant)."""
    found: dict[tuple[float, int], dict[str, Any]] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            if not r["method"].startswith("gblr"):
                continue
            key = (r["budget"], r["seed"])
            if key in found:
                raise ValueError(f"--allocation-from: two GBLR rows at budget {key[0]:g}, seed {key[1]} "
                                 f"({found[key]['method']!r} and {r['method']!r}); give only the files of one GBLR "
                                 "variant")
            found[key] = r
    return found


def learned_run(cfg: argparse.Namespace, budget: float, seed: int) -> dict[str, Any]:
    """The ``--allocation-from`` GBLR row of this budget and seed."""
    rows = learned_allocations(cfg.allocation_from or [])
    if (budget, seed) not in rows:
        have = ", ".join(f"budget {b:g} seed {s}" for b, s in sorted(rows)) or "none"
        raise ValueError(f"wsvd-learned needs a GBLR run at budget {budget:g}, seed {seed} in --allocation-from "
                         f"(found: {have})")
    return rows[(budget, seed)]


def learned_budgets(run: dict[str, Any]) -> dict[str, float]:
    """The per-layer FLOPs ratios (full layer names) a GBLR row ended with."""
    return {PREFIX + name: ratio for name, ratio in run["ratios"].items()}


def build(method: str, budget: float, cfg: argparse.Namespace, backbone: SentenceEncoder,
          learned: dict[str, Any] | None = None) -> GSMModule:
    """The module of one run; ``learned``: the GBLR row whose allocation ``wsvd-learned`` takes."""
    spec = METHODS[method]
    allocation = (MeasuredAllocation(batches=min(cfg.alloc_batches, cfg.calib_batches))
                  if spec["allocation"] == "measured" else spec["allocation"])
    layer_budgets = None
    if allocation == "learned":
        allocation, layer_budgets = "uniform", learned_budgets(learned)
    conversion = Conversion(method=spec["method"], init="pretrained", fit_steps=cfg.fit_steps,
                            calibration=(Calibration(batches=cfg.calib_batches, sequential=spec.get("sequential", False),
                                                     mask_padding=not cfg.keep_padding)
                                         if spec["calibrated"] else None),
                            allocation=allocation, layer_budgets=layer_budgets)
    return GSMModule(backbone, task="embedding", budget=budget, conversion=conversion,
                     rule=rule(cfg),
                     sigma=SigmaSchedule(None, None),
                     phase1_epochs=cfg.phase1_epochs,
                     distillation=Distillation(loss="cosine", label_free=True, hidden=list(cfg.hidden or []),
                                               hidden_loss=cfg.hidden_loss, hidden_weight=cfg.hidden_weight),
                     optimizer=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=0.0))


def rule(cfg: argparse.Namespace) -> StructureRule:
    """GBLR's structure rule: the budget learner, or ``--rule sensitivity`` (start ``--headroom`` times above the
    budget and remove whole components by Fisher sensitivity per FLOP during distillation)."""
    if cfg.rule == "sensitivity":
        return SensitivityRule(headroom=cfg.headroom, path_fraction=getattr(cfg, "path_fraction", 0.6),
                               fisher=getattr(cfg, "fisher", "empirical"), draws=getattr(cfg, "draws", 1))
    # cost_power 0: the plain energy cut every BudgetRule row of the table was measured with (the package default is 0.3
    # since 2026-12-07; a calibrated pretrained start is low-rank, where the plain cut is the safer one)
    return BudgetRule(structure_lr=cfg.structure_lr, width_norm=cfg.width_norm, cost_power=0.0)


def layer_ratios(module: GSMModule) -> dict[str, float]:
    """FLOPs ratio each converted layer ended with (GBLR: learned; baselines: from the conversion report)."""
    if module.method == "gblr":
        return {name.replace(PREFIX, ""): round(m.flops_ratio(), 3) for name, m in gblr_layers(module.backbone)}
    return {r.name.replace(PREFIX, ""): round(r.flops / r.dense_flops, 3) for r in module.report.layers}


def by_type(ratios: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, r in ratios.items():
        kind = ("qkv" if ".attention." in name else "fc1" if "intermediate" in name else "fc2")
        groups.setdefault(kind, []).append(r)
    return {k: round(statistics.mean(v), 3) for k, v in sorted(groups.items())}


def run_one(method: str, budget: float, seed: int, data: SentenceDataModule, dense_fn, eval_sents: list[str],
            eval_entries, cfg: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    backbone = SentenceEncoder()
    t0 = time.perf_counter()  # conversion time: the module's build (svd converts there) plus the calibrated convert
    learned = learned_run(cfg, budget, seed) if method == "wsvd-learned" else None
    module = build(method, budget, cfg, backbone, learned)
    if not module.converted:
        module.convert(data.calibration_batches)
    convert_s = time.perf_counter() - t0
    tok = data.tokenizer
    student_fn = mean_pooled_embed_fn(module.backbone.model, tok, max_length=cfg.max_length)
    dense_eval = dense_fn(eval_sents)
    before = float((student_fn(eval_sents) * dense_eval).sum(-1).mean())
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=cfg.steps // 2, limit_val_batches=0, logger=False,
                         accelerator=cfg.accelerator, devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    tune_s = time.perf_counter() - t0
    after = float((student_fn(eval_sents) * dense_eval).sum(-1).mean())
    heads = [e.headword.replace("_", " ") for e in eval_entries]  # the retrieval's candidates, short texts
    cos_heads = float((student_fn(heads) * dense_fn(heads)).sum(-1).mean())
    rec = reverse_dictionary_recall(student_fn, eval_entries)
    ratios = layer_ratios(module)
    gblr = method.startswith("gblr")
    name = method if not gblr or cfg.structure_lr == 2.5e-3 else f"{method}, structure lr {cfg.structure_lr:g}"
    if gblr and getattr(cfg, "rule", "budget") == "sensitivity":
        name = f"{method}, sensitivity rule, headroom {cfg.headroom:g}"
        if getattr(cfg, "path_fraction", 0.6) != 0.6:
            name += f", path {cfg.path_fraction:g}"
        if getattr(cfg, "fisher", "empirical") != "empirical":
            name += f", {cfg.fisher} fisher"
            if getattr(cfg, "draws", 1) != 1:
                name += f" x{cfg.draws} draws"
    elif gblr and cfg.phase1_epochs == 0:
        name = f"{method}, structure fixed at the start"
    elif gblr and cfg.width_norm != "side":
        name += f", width_norm {cfg.width_norm}"
    name += variant_suffix(cfg)
    extra = {"allocation_from": learned["method"]} if learned is not None else {}
    return {**extra, "method": name, "budget": budget, "seed": seed, "flops_ratio": round(module.flops_ratio(), 4),
            "cos_converted": before, "cos_distilled": after, "cos_headwords": cos_heads, "r1": rec["recall@1"], "r10": rec["recall@10"],
            "convert_s": convert_s, "tune_s": tune_s, "by_type": by_type(ratios), "ratios": ratios}


DEFAULT_LR = 1e-4


def variant_suffix(cfg: argparse.Namespace) -> str:
    """The row-name suffix of a run whose distillation differs from the table's default, the same for every method:
    another learning rate (``--lr``), hidden states distilled too (``--hidden``)."""
    out = ""
    if getattr(cfg, "lr", DEFAULT_LR) != DEFAULT_LR:
        out += f", lr {cfg.lr:g}"
    if getattr(cfg, "hidden", None):
        out += f", hidden states {cfg.hidden_loss} x{cfg.hidden_weight:g}"
    if getattr(cfg, "headword_fraction", 0.0):
        out += f", {cfg.headword_fraction:g} headwords"
    return out


def training_data(cfg: argparse.Namespace, seed: int) -> SentenceDataModule:
    """The data of one seed: the seed draws the training sentences (and so the calibration batches, the first
    ``--calib-batches`` of them) and their order; validation and test sentences do not depend on it."""
    data = SentenceDataModule(batch_size=cfg.batch_size, max_length=cfg.max_length, num_train=cfg.steps * cfg.batch_size,
                              num_test=cfg.eval_sentences, seed=seed,
                              headword_fraction=getattr(cfg, "headword_fraction", 0.0))
    data.setup("fit")
    data.calibration_batches = [b for _, b in zip(range(cfg.calib_batches), data.train_dataloader())]
    return data


def prepare(cfg: argparse.Namespace) -> tuple[SentenceDataModule, Any, list[str], list]:
    data = training_data(cfg, 0)
    dense = SentenceEncoder().eval()
    dense_fn = mean_pooled_embed_fn(dense.model, data.tokenizer, max_length=cfg.max_length)
    eval_sents = data.sentences["test"][: cfg.eval_sentences]
    # the first --retrieval-entries headwords of the test split in hash order: their glosses are the queries and
    # their headwords the candidates
    entries = sorted(first_sense_entries(data.entries["test"]),
                     key=lambda e: hashlib.sha256(e.headword.lower().encode()).hexdigest())
    return data, dense_fn, eval_sents, entries[: cfg.retrieval_entries]


def markdown(rows: list[dict[str, Any]], dense: dict[str, Any], cfg: argparse.Namespace, argv: list[str],
             total_s: float, commands: list[list[str]] | None = None, machine: str | None = None) -> str:
    seeds = sorted({r["seed"] for r in rows})
    runs = " and ".join(f"`python -m benchmarks.compress_minilm {' '.join(a)}`" for a in (commands or [argv]))
    lines = [
        f"Commands: {runs}, then `--from-json` of their outputs with `--write-md` ({total_s / 60:.0f} min of runs in "
        f"all; {machine or machine_info()})." if commands else
        f"Command: `python -m benchmarks.compress_minilm {' '.join(argv)}` ({total_s / 60:.0f} min; "
        f"{machine or machine_info()}).",
        "",
        f"all-MiniLM-L6-v2, q/k/v and FFN linears of all 6 layers converted (30 layers). Calibration: the first "
        f"{cfg.calib_batches} training batches ({cfg.calib_batches * cfg.batch_size} WordNet sentences). Distillation: "
        f"`GSMModule` with the dense encoder as teacher, cosine loss on the embeddings, no labels, {cfg.steps} AdamW "
        f"steps (lr {cfg.lr:g}; GBLR structure lr {cfg.structure_lr:g}) of {cfg.batch_size} training sentences, the same batches for every method; GBLR learns "
        f"its structure (one global budget) in the first half and is frozen for the second, with pure Dirichlet masks. "
        f"Fidelity: mean cosine to the dense embeddings on {cfg.eval_sentences} held-out test sentences. Task: reverse "
        f"dictionary on the test split ({dense['num_queries']} glosses, each ranking {dense['num_candidates']} headwords). "
        f"Dense: recall@1 {100 * dense['recall@1']:.1f} %, recall@10 {100 * dense['recall@10']:.1f} %. "
        f"Seeds draw the training sentences and their order ({', '.join(map(str, seeds))} in all); rows with more than "
        f"one seed give medians, and the paired differences per seed follow the table.",
        "",
        "| budget | method | seeds | FLOPs ratio | cosine, converted | cosine, distilled | R@1 | R@10 | R@10 vs dense | "
        "convert s | fine-tune s | ratio by type (qkv / fc1 / fc2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["budget"], r["method"]) for r in rows}, key=lambda k: (-k[0], list(METHODS).index(k[1].split(",")[0]), k[1]))
    for budget, method in keys:
        rs = [r for r in rows if r["budget"] == budget and r["method"] == method]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        bt = rs[0]["by_type"]
        lines.append(
            f"| {budget:.0%} | {method} | {len(rs)} | {med('flops_ratio'):.3f} | {med('cos_converted'):.3f} | "
            f"{med('cos_distilled'):.3f} | {100 * med('r1'):.1f} | {100 * med('r10'):.1f} | "
            f"{100 * (med('r10') - dense['recall@10']):+.1f} | {med('convert_s'):.1f} | {med('tune_s'):.0f} | "
            f"{bt.get('qkv', 0):.2f} / {bt.get('fc1', 0):.2f} / {bt.get('fc2', 0):.2f} |")
    lines += paired(rows)
    return "\n".join(lines)


def paired(rows: list[dict[str, Any]]) -> list[str]:
    """Per-seed differences for the rows run with more than one seed: each GBLR row minus the whitened SVD of the same
    allocation and calibration (``gblr-measured`` minus ``wsvd-measured``, ``gblr-seq-measured`` minus
    ``wsvd-seq-measured``, the others minus ``wsvd``), ``wsvd-measured`` and ``wsvd-seq`` minus ``wsvd`` (what the
    measured allocation, the sequential calibration alone give), ``wsvd-seq-measured`` minus ``wsvd-measured``
    (what the sequential calibration adds to the measured allocation), and each row minus the same method with the
    padding in its calibration statistics (what leaving the padding out gives)."""
    pad = ", padding in calibration"
    out = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        methods = sorted({r["method"] for r in rows if r["budget"] == budget})
        for method in methods:
            cut = min((method.index(k) for k in (", lr ", ", hidden states") if k in method), default=len(method))
            hidden = method[cut:].removesuffix(pad)  # the distillation variant: compared with its own kind
            plain = method.removesuffix(pad).replace(hidden, "")
            refs = []
            if plain.startswith("gblr"):
                refs.append("wsvd-measured" if plain.startswith("gblr-measured") else
                            "wsvd-seq-measured" if plain.startswith("gblr-seq-measured") else "wsvd")
            elif plain in ("wsvd-measured", "wsvd-seq"):
                refs.append("wsvd")
            elif plain == "wsvd-learned":  # the learned allocation against the measured one, both whitened
                refs.append("wsvd-measured")
            elif plain == "wsvd-seq-measured":
                refs.append("wsvd-measured")
            refs = [ref + hidden + (pad if method.endswith(pad) else "") for ref in refs]
            if not method.endswith(pad):
                refs.append(method + pad)
            if hidden:  # what the distillation variant adds to the same method
                refs.append(method.replace(hidden, ""))
            for ref in refs:
                base = {r["seed"]: r for r in rows if r["budget"] == budget and r["method"] == ref}
                pairs = [(r, base[r["seed"]]) for r in rows
                         if r["budget"] == budget and r["method"] == method and r["seed"] in base]
                if len(pairs) < 2:
                    continue
                d_conv = [a["cos_converted"] - b["cos_converted"] for a, b in pairs]
                d_cos = [a["cos_distilled"] - b["cos_distilled"] for a, b in pairs]
                d_r10 = [100 * (a["r10"] - b["r10"]) for a, b in pairs]
                out += ["", f"{budget:.0%}, {method} minus {ref}, per seed ({', '.join(str(a['seed']) for a, _ in pairs)}): "
                            f"cosine {', '.join(f'{d:+.4f}' for d in d_cos)} (mean {statistics.mean(d_cos):+.4f}, range "
                            f"{min(d_cos):+.4f} to {max(d_cos):+.4f}; converted, before distillation: mean "
                            f"{statistics.mean(d_conv):+.4f}); recall@10 {', '.join(f'{d:+.1f}' for d in d_r10)} points."]
    return out


def _plain(value: Any) -> Any:
    """``value`` for JSON: paths as strings, also inside lists (``--allocation-from``)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "wsvd-learned"], choices=list(METHODS),
                   help="default: all but wsvd-learned (which needs --allocation-from)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=200, help="distillation steps (half of them phase 1 for GBLR)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="the distillation's AdamW learning rate (every "
                   "method; rows at another lr than 1e-4 say so in their name)")
    p.add_argument("--structure-lr", type=float, default=2.5e-3,
                   help="GBLR: the BudgetRule's structure_lr (locations; widths step at 4x it)")
    p.add_argument("--phase1-epochs", type=int, default=1, choices=[0, 1],
                   help="GBLR: learn the structure in the first of the two epochs (1), or not at all (0: frozen at "
                        "the calibrated start, the ablation that separates the parametrisation from the learning)")
    p.add_argument("--width-norm", default="side", choices=["side", "model"],
                   help="GBLR: BudgetRule's width_norm ('model': width steps by gain per FLOP over one model-wide RMS)")
    p.add_argument("--rule", default="budget", choices=["budget", "sensitivity"],
                   help="GBLR's structure rule: BudgetRule (width steps and a cut) or SensitivityRule (start "
                        "--headroom times above the budget, remove components by Fisher sensitivity per FLOP)")
    p.add_argument("--headroom", type=float, default=1.5, help="--rule sensitivity: the conversion's budget over "
                   "the budget")
    p.add_argument("--path-fraction", type=float, default=0.6, help="--rule sensitivity: part of phase 1 over "
                   "which the ratio reaches the budget")
    p.add_argument("--fisher", default="empirical", choices=["empirical", "output"],
                   help="--rule sensitivity: the Fisher it removes by (SensitivityRule(fisher=...)): the loss's "
                        "empirical Fisher, or the Gauss-Newton curvature of the model's output")
    p.add_argument("--draws", type=int, default=1, help="--fisher output: draws of z per step (SensitivityRule(draws=...))")
    p.add_argument("--hidden", nargs="+", default=None, metavar="PATTERN",
                   help="every method also distils these hidden states (Distillation(hidden=...)), e.g. "
                        "'model.encoder.layer.?' for the outputs of the six blocks")
    p.add_argument("--hidden-loss", default="rel_mse", choices=["rel_mse", "cosine"])
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--allocation-from", type=Path, nargs="+", default=None, metavar="FILE",
                   help="wsvd-learned: --json outputs of GBLR runs; each budget and seed takes the per-layer ratios "
                        "of the GBLR run of that budget and seed")
    p.add_argument("--headword-fraction", type=float, default=0.0,
                   help="part of the training texts that are train-split headwords and synonyms (the short texts the "
                        "reverse dictionary ranks), for every method alike; 0: sentences only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--alloc-batches", type=int, default=2,
                   help="*-measured methods: calibration batches the per-layer output errors are measured on")
    p.add_argument("--keep-padding", action="store_true",
                   help="calibration statistics over every position, padding included (Calibration(mask_padding="
                        "False): how the rows of before the option were made)")
    p.add_argument("--fit-steps", type=int, default=0, help="GBLR calibrated fit steps (0: the whitened start)")
    p.add_argument("--eval-sentences", type=int, default=512)
    p.add_argument("--retrieval-entries", type=int, default=2000)
    p.add_argument("--accelerator", default="auto",
                   help="the Trainer's accelerator for the distillation (cpu, gpu, auto); conversion and evaluation "
                        "run on the CPU")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="no runs: the table of these --json outputs (runs split over processes, e.g. one per budget)")
    p.add_argument("--write-md", action="store_true")
    p.add_argument("--quick", action="store_true", help="4 steps, 2 calibration batches, small evaluation")
    cfg = p.parse_args(argv)
    if "wsvd-learned" in cfg.methods and not cfg.allocation_from:
        p.error("--methods wsvd-learned needs --allocation-from (the --json of GBLR runs at the same budgets and seeds)")
    if cfg.quick:
        cfg.steps, cfg.calib_batches, cfg.eval_sentences, cfg.retrieval_entries = 4, 2, 32, 64
    return cfg


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.from_json:
        parts = [json.loads(f.read_text()) for f in cfg.from_json]
        for part in parts:  # runs from before Calibration(mask_padding) (no such key) counted the padding too
            if part["cfg"].get("keep_padding", True):
                for r in part["rows"]:
                    if r["method"] != "svd" and ", padding in calibration" not in r["method"]:
                        r["method"] += ", padding in calibration"
            suffix = variant_suffix(argparse.Namespace(**part["cfg"]))  # runs named before the lr was in the name
            for r in part["rows"]:
                if suffix and suffix not in r["method"]:
                    r["method"] += suffix
        rows = [r for part in parts for r in part["rows"]]
        text = markdown(rows, parts[0]["dense"], argparse.Namespace(**parts[0]["cfg"]), parts[0]["argv"],
                        sum(part["total_s"] for part in parts), commands=[part["argv"] for part in parts],
                        machine=parts[0].get("machine"))
        print(text)
        if cfg.write_md:
            write_section(text, ROOT / "BENCHMARKS.md", MD_START, MD_END)
        return rows
    start = time.perf_counter()
    data, dense_fn, eval_sents, entries = prepare(cfg)
    dense = reverse_dictionary_recall(dense_fn, entries)
    print(f"dense: R@1 {dense['recall@1']:.3f} R@10 {dense['recall@10']:.3f} ({dense['num_queries']} queries)", flush=True)
    rows, datas = [], {0: data}
    for budget in cfg.budgets:
        for method in cfg.methods:
            for seed in cfg.seeds:
                if seed not in datas:
                    datas[seed] = training_data(cfg, seed)
                row = run_one(method, budget, seed, datas[seed], dense_fn, eval_sents, entries, cfg)
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "ratios"}), flush=True)
    total = time.perf_counter() - start
    if cfg.json:
        cfg.json.write_text(json.dumps({"dense": dense, "rows": rows, "total_s": total, "argv": argv,
                                        "machine": machine_info(),
                                        "cfg": {k: _plain(v) for k, v in vars(cfg).items()}},
                                       indent=1))
    text = markdown(rows, dense, cfg, argv, total)
    print(text)
    if cfg.write_md and not cfg.quick:
        write_section(text, ROOT / "BENCHMARKS.md", MD_START, MD_END)
    return rows


if __name__ == "__main__":
    main()
