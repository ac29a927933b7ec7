"""Structure report of any GSM checkpoint: ``python -m gsm_lightning.report CKPT --out DIR``.

The GBLR layers are rebuilt from the checkpoint's tensors alone (``{layer}.weight_in`` ``(K, r, in)``,
``weight_out`` ``(K, r, out)``, ``widths`` / ``locations`` ``(2, K)`` fractions, optional ``bias``, ``sigma`` and
``frozen``), so the backbone's code is not needed and the checkpoint is loaded with ``weights_only=True``.  A
Lightning checkpoint of :class:`~gsm_lightning.module.GSMModule` (either phase) also gives the budget, the phase-1
end ratio and the stored ``gsm_structure``, which is checked against the tensors; a bare ``state_dict`` works too.

``DIR`` receives ``structure.json`` and ``structure.csv`` (as :class:`~gsm_lightning.callbacks.StructureReport`
writes them, over the GBLR layers: other layers are not in the rebuilt model), the PNG figures of
:func:`gsm_lightning.plotting.structure_figures` (``layers/`` holds the per-layer ones) and ``report.html``, one
self-contained page with the figures embedded.  A file that is not a GSM checkpoint (or is corrupt) ends the
command with ``SystemExit`` carrying the reason (status 1).  No Lightning import.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layer import GBLRLinear
from .plotting import iter_structure_figures, save_figure
from .proximal import gblr_layers
from .structure import print_structure_table, structure_metrics, structure_summary, write_structure_csv

__all__ = ["CheckpointError", "load_checkpoint", "model_from_checkpoint", "write_report", "main"]

_FACTOR_KEYS = ("weight_in", "weight_out", "widths", "locations")


class CheckpointError(ValueError):
    """The file is not a readable GSM checkpoint (the message says why)."""


def load_checkpoint(path: str, unsafe: bool = False) -> dict[str, Any]:
    """``torch.load`` on CPU (``weights_only=True`` unless ``unsafe``) with errors turned into :class:`CheckpointError`."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a readable checkpoint
        text = str(e)
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        reason = " ".join((found.group(1) if found else text).split()) or type(e).__name__
        if found and "Unsupported global" in reason:
            name = re.search(r"GLOBAL (\S+)", reason)
            raise CheckpointError(
                f"{path}: holds a Python object ({name.group(1) if name else 'a global'}) that safe loading "
                "(torch.load weights_only=True) refuses; if you trust the file, pass --unsafe-load") from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason[:300]})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a GSM checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return dict(obj)


def _state_dict(ckpt: Mapping[str, Any], path: str) -> dict[str, Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: not a GSM checkpoint ('state_dict' is a {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _layer_prefixes(sd: Mapping[str, Tensor]) -> list[str]:
    """Prefixes ``p`` (``"backbone.blocks.0.attn.q."`` or ``""``) with all of ``p + weight_in/weight_out/widths/
    locations``, in state-dict order."""
    out = []
    for key in sd:
        if key == "weight_in" or key.endswith(".weight_in"):
            prefix = key[: -len("weight_in")]
            if all(prefix + k in sd for k in _FACTOR_KEYS):
                out.append(prefix)
    return out


def _rebuild(prefix: str, sd: Mapping[str, Tensor], path: str) -> GBLRLinear:
    name = prefix.rstrip(".") or "GBLRLinear"
    w_in, w_out, widths, locs = (sd[prefix + k] for k in _FACTOR_KEYS)
    if w_in.dim() != 3 or w_out.dim() != 3 or w_in.shape[:2] != w_out.shape[:2]:
        raise CheckpointError(f"{path}: layer '{name}': weight_in {tuple(w_in.shape)} and weight_out "
                              f"{tuple(w_out.shape)} are not (K, r, in) and (K, r, out) factors")
    k, r, n_in = w_in.shape
    n_out = w_out.shape[2]
    if tuple(widths.shape) != (2, k) or tuple(locs.shape) != (2, k):
        raise CheckpointError(f"{path}: layer '{name}': widths {tuple(widths.shape)} / locations {tuple(locs.shape)} "
                              f"should be (2, {k}) for {k} components")
    if n_in < 1 or n_out < 1 or not 1 <= r <= min(n_in, n_out):
        raise CheckpointError(f"{path}: layer '{name}': impossible shape in={n_in}, out={n_out}, rank per component={r}")
    for what, t in (("widths", widths), ("locations", locs)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: layer '{name}': {what} are not finite floating-point fractions")
    bias = sd.get(prefix + "bias")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise CheckpointError(f"{path}: layer '{name}': bias {tuple(bias.shape)} does not match out_features {n_out}")
    layer = GBLRLinear(n_in, n_out, bias=bias is not None, rank_per_component=r, num_components=k, dtype=torch.float32)
    own = {key: sd[prefix + key] for key in layer.state_dict() if prefix + key in sd}
    try:
        layer.load_state_dict({key: v.float() if v.is_floating_point() else v for key, v in own.items()}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: layer '{name}' cannot be rebuilt: {e}") from e
    return layer


def _attach(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``name`` (intermediate containers created), so names are kept."""
    parts = name.split(".") if name else ["layer"]
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], module)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def model_from_checkpoint(ckpt: Mapping[str, Any], path: str = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the GBLR layers of a loaded checkpoint as one ``nn.Module`` (layers under their state-dict names,
    e.g. ``backbone.blocks.0.attn.q``) with ``budget``, ``phase``, ``phase1_end_ratio`` and ``projection_delta``
    attributes where known, and a dict of what the checkpoint says about the run.  Raises :class:`CheckpointError`."""
    sd = _state_dict(ckpt, path)
    prefixes = _layer_prefixes(sd)
    if not prefixes:
        raise CheckpointError(
            f"{path}: not a GSM checkpoint: no GBLR layer in its state dict (no '<layer>.weight_in', 'weight_out', "
            f"'widths' and 'locations' tensors among {len(sd)} tensors)")
    root = nn.Module()
    layers: dict[str, GBLRLinear] = {}
    for prefix in prefixes:
        name = prefix.rstrip(".")
        layers[name] = _rebuild(prefix, sd, path)
        _attach(root, name, layers[name])
    stored = ckpt.get("gsm_structure")
    if isinstance(stored, Mapping):
        _check_structure(stored, layers, path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), Mapping) else {}
    budget = _number(hparams.get("budget"))
    if budget is not None:
        root.budget = budget
    frozen = [m.is_frozen for m in layers.values()]
    root.phase = 2 if all(frozen) else 1
    phase1 = ckpt.get("gsm_phase1") if isinstance(ckpt.get("gsm_phase1"), Mapping) else {}
    for attr, key in (("phase1_end_ratio", "end_ratio"), ("projection_delta", "projection_delta")):
        value = _number(phase1.get(key))
        if value is not None:
            setattr(root, attr, value)
    info: dict[str, Any] = {
        "path": os.path.abspath(path) if os.path.exists(path) else path,
        "lightning_checkpoint": "state_dict" in ckpt,
        "gsm_structure": isinstance(stored, Mapping),
        "phase": root.phase,
        "frozen_layers": sum(frozen),
        "gblr_layers": len(layers),
        "checkpoint_tensors": len(sd),
        "checkpoint_parameters": int(sum(t.numel() for t in sd.values() if t.is_floating_point())),
    }
    for key in ("epoch", "global_step", "gsm_real_optimizer_steps"):
        if isinstance(ckpt.get(key), int):
            info[key] = ckpt[key]
    for key in ("budget", "phase1_epochs", "shrink", "method", "init", "task", "sigma0", "sigma1"):
        if key in hparams and isinstance(hparams[key], (int, float, str, type(None))):
            info.setdefault("hyper_parameters", {})[key] = hparams[key]
    if hasattr(root, "phase1_end_ratio"):
        info["phase1_end_ratio"] = root.phase1_end_ratio
        info["projection_delta"] = getattr(root, "projection_delta", None)
    if hparams.get("method", "gblr") != "gblr":
        info["note"] = f"method {hparams.get('method')!r}: only GBLR layers are rebuilt"
    return root, info


def _check_structure(stored: Mapping[str, Any], layers: dict[str, GBLRLinear], path: str) -> None:
    """The ``gsm_structure`` entries (names relative to the backbone) must be rebuilt layers under one common
    prefix (``backbone.`` for GSMModule) with the same shape and number of components."""
    shorts = [str(s) for s in stored]
    candidates = {n[: len(n) - len(s)] for n in layers for s in shorts if n == s or n.endswith("." + s)}
    prefix = next((p for p in sorted(candidates, key=len) if all(p + s in layers for s in shorts)), None)
    if prefix is None:
        missing = [s for s in shorts if not any(n == s or n.endswith("." + s) for n in layers)]
        raise CheckpointError(f"{path}: corrupt GSM checkpoint: the layers of its gsm_structure {missing[:5] or shorts[:5]} "
                              "do not match the GBLR tensors of its state dict")
    for short, s in stored.items():
        name = prefix + str(short)
        m = layers[name]
        if not isinstance(s, Mapping):
            raise CheckpointError(f"{path}: corrupt GSM checkpoint: gsm_structure['{short}'] is not a dict")
        want = tuple(s.get(k) for k in ("in_features", "out_features", "rank_per_component", "num_components"))
        got = (m.in_features, m.out_features, m.rank_per_component, m.num_components)
        if want != got:
            raise CheckpointError(f"{path}: corrupt GSM checkpoint: layer '{name}' is in/out/rank/K = {got} in the "
                                  f"state dict but {want} in gsm_structure")


# ============================================================================ output
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def write_report(model: nn.Module, out_dir: str, info: Mapping[str, Any] | None = None, figures: bool = True,
                 layer_figures: bool = True, max_size: int = 256) -> dict[str, Any]:
    """Write ``structure.json``, ``structure.csv``, the PNG figures and ``report.html`` for the GBLR layers of
    ``model`` into ``out_dir``; returns ``{"summary", "json", "csv", "html", "figures": {name: path}}``."""
    summary = structure_summary(model)
    metrics = structure_metrics(model, prefix="structure", per_layer=False)
    summary["scalars"] = {k.split("/", 1)[1]: v for k, v in metrics.items()}
    if info:
        summary["checkpoint"] = dict(info)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "structure.json")
    csv_path = os.path.join(out_dir, "structure.csv")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    write_structure_csv(csv_path, summary)
    paths: dict[str, str] = {}
    if figures:
        for key, fig in iter_structure_figures(model, layers=layer_figures, max_size=max_size):
            if "/" in key:
                layer, kind = key.rsplit("/", 1)
                file = os.path.join(out_dir, "layers", f"{_safe(layer)}__{kind}.png")
            else:
                file = os.path.join(out_dir, f"{key}.png")
            paths[key] = save_figure(fig, file)
            del fig
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(_html(summary, paths, [n for n, _ in gblr_layers(model)]))
    return {"summary": summary, "json": json_path, "csv": csv_path, "html": html_path, "figures": paths}


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1500px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.total td { font-weight: bold; background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-family: monospace; font-size: 1.05em; }
.meta td { text-align: left; } .note { color: #666; font-size: 0.9em; }
"""


def _img(paths: Mapping[str, str], key: str, alt: str) -> str:
    path = paths.get(key)
    if path is None:
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return html.escape(str(v))


def _html(summary: Mapping[str, Any], paths: Mapping[str, str], names: Sequence[str]) -> str:
    e = html.escape
    ck = summary.get("checkpoint", {})
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    title = f"GSM structure report: {os.path.basename(str(ck.get('path', '')))}" if ck else "GSM structure report"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    meta: list[tuple[str, Any]] = []
    for key in ("path", "epoch", "global_step", "phase", "gblr_layers", "frozen_layers", "phase1_end_ratio",
                "projection_delta", "checkpoint_parameters", "note"):
        if key in ck and ck[key] is not None:
            meta.append((key, ck[key]))
    if "phase" not in ck and "phase" in summary:
        meta.append(("phase", summary["phase"]))
    for key, value in (ck.get("hyper_parameters") or {}).items():
        meta.append((f"hparams.{key}", value))
    meta.append(("FLOPs ratio (GBLR layers)", g["flops_ratio"]))
    if "target_flops_ratio" in summary:
        meta.append(("target (budget)", summary["target_flops_ratio"]))
    out.append("<table class='meta'>" + "".join(f"<tr><th class='l'>{e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in meta)
               + "</table>")
    out.append("<h2>Layers</h2><p class='note'>FLOPs are multiply-adds per token; shape is out x in; widths are mean "
               "fractions of the side over the active components; rank = active components x rank per component. "
               "Totals cover the GBLR layers rebuilt from the checkpoint.</p>")
    cols = ("name", "type", "shape", "active/K", "rank", "width_in", "width_out", "flops", "dense_flops", "flops_ratio",
            "params")
    out.append("<table><tr>" + "".join(f"<th class='{'l' if c in ('name', 'type') else ''}'>{c}</th>" for c in cols)
               + "</tr>")
    for r in summary["layers"]:
        cells = (r["name"], r["type"], f"{r['out_features']} x {r['in_features']}", f"{r['active']}/{r['components']}",
                 r["rank"], r["width_in"], r["width_out"], r["flops"], r["dense_flops"], r["flops_ratio"], r["params"])
        out.append("<tr>" + "".join(f"<td class='{'l' if i < 2 else ''}'>{_fmt(c)}</td>" for i, c in enumerate(cells))
                   + "</tr>")
    out.append("<tr class='total'>" + "".join(f"<td>{_fmt(c)}</td>" for c in (
        "GBLR total", "", "", "", "", "", "", g["flops"], g["dense_flops"], g["flops_ratio"], g["params"])) + "</tr>")
    out.append("</table>")
    out.append("<h2>Model</h2>")
    for key, alt in (("overview", "overview"), ("flops_by_type", "FLOPs by layer type"),
                     ("flops_by_depth", "FLOPs by depth"), ("width_histograms", "width histograms"),
                     ("footprint_grid", "footprints")):
        out.append(_img(paths, key, alt))
    layer_imgs = [n for n in names if f"{n}/weights" in paths or f"{n}/windows" in paths]
    if layer_imgs:
        out.append("<h2>Layers, one by one</h2>")
        for i, name in enumerate(layer_imgs):
            out.append(f"<details{' open' if i == 0 else ''}><summary>{e(name)}</summary>"
                       + _img(paths, f"{name}/weights", f"{name} weights") + _img(paths, f"{name}/windows", f"{name} windows")
                       + "</details>")
    out.append(f"<p class='note'>Model totals (the rebuilt GBLR layers only): {_fmt(m['flops_per_token'])} of "
               f"{_fmt(m['dense_flops_per_token'])} multiply-adds per token.</p></body></html>\n")
    return "\n".join(x for x in out if x)


# ============================================================================ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gsm_lightning.report",
        description="Write the structure report (structure.json, structure.csv, PNG figures, report.html) of a GSM "
                    "checkpoint, in either phase, without the backbone's code.")
    parser.add_argument("checkpoint", help="a GSMModule checkpoint (.ckpt) or a saved state dict with GBLR layers")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--no-layer-figures", action="store_true", help="skip the two figures per layer")
    parser.add_argument("--max-size", type=int, default=256, help="heatmap cells per side at most (default 256)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="torch.load with weights_only=False (only for files you trust)")
    args = parser.parse_args(argv)
    if args.max_size < 8:
        parser.error(f"--max-size must be >= 8, got {args.max_size}")
    try:
        ckpt = load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
        model, info = model_from_checkpoint(ckpt, args.checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"gsm_lightning.report: error: {err}") from None
    result = write_report(model, args.out, info, layer_figures=not args.no_layer_figures, max_size=args.max_size)
    if not args.quiet:
        print_structure_table(result["summary"])
    print(f"wrote {result['json']}, {result['csv']}, {len(result['figures'])} figures and {result['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
