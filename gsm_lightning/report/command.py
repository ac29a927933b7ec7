"""Structure report of any GSM checkpoint: ``python -m gsm_lightning.report CKPT --out DIR``.

The GBLR layers are rebuilt from the checkpoint's tensors alone (``{layer}.weight_in`` ``(K, r, in)``,
``weight_out`` ``(K, r, out)``, ``widths`` / ``locations`` ``(2, K)`` fractions, optional ``bias``, ``sigma`` and
``frozen``), so the backbone's code is not needed and the checkpoint is loaded with ``weights_only=True``.  A
Lightning checkpoint of :class:`~gsm_lightning.module.GSMModule` (either phase) also gives the budget, the phase-1
end ratio and the stored ``gsm_structure``, which is checked against the tensors; a bare ``state_dict`` works too.

``DIR`` receives ``structure.json`` and ``structure.csv`` (as :class:`~gsm_lightning.callbacks.StructureReport`
writes them, over the GBLR layers: other layers are not in the rebuilt model), the PNG figures of the model
(:func:`gsm_lightning.plotting.structure_figures`: overview, width histograms, FLOPs by type and by depth, footprint
grid) and ``report.html``, one self-contained page with the figures embedded.  The two figures per layer (``|W|``
heatmap, component windows; in ``layers/``) come with ``--layer-figures`` (all layers) or ``--layer-figures-match
REGEX`` (the layers whose name matches): at about 0.2 s per layer they would be most of the time of a deep model's report.  A file that is not a GSM checkpoint (or is corrupt) ends the
command with ``SystemExit`` carrying the reason (status 1).  No Lightning import.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.layer import gblr_layers
from ..io.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .structure import print_structure_table, run_state, structure_metrics, structure_summary, write_structure_csv

__all__ = ["CheckpointError", "load_checkpoint", "model_from_checkpoint", "write_report", "main"]

# ============================================================================ output
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def write_report(model: nn.Module, out_dir: str, info: Mapping[str, Any] | None = None, figures: bool = True,
                 layer_figures: bool | str = False, max_size: int = 256) -> dict[str, Any]:
    """Write ``structure.json``, ``structure.csv``, the PNG figures and ``report.html`` for the GBLR layers of
    ``model`` into ``out_dir``; returns ``{"summary", "json", "csv", "html", "figures": {name: path}}``.

    ``figures``: the model figures (matplotlib, imported only then); ``layer_figures``: also the two figures per
    layer, ``True`` for every layer or a regular expression for the layers whose name matches it (``re.search``).
    """
    # a model rebuilt by model_from_checkpoint carries the checkpoint's numbers as attributes
    state = run_state(model) or {k: getattr(model, k) for k in ("budget", "phase1_end_ratio", "projection_delta")
                                 if hasattr(model, k)}
    summary = structure_summary(model, state=state)
    metrics = structure_metrics(model, prefix="structure", per_layer=False, state=state)
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
        from .plotting import iter_structure_figures, save_figure  # matplotlib: only when drawing

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
        f.write(_html(summary, paths, [n for n, _ in gblr_layers(model)], layer_hint=figures and not layer_figures))
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


def _html(summary: Mapping[str, Any], paths: Mapping[str, str], names: Sequence[str], layer_hint: bool = False) -> str:
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
    elif layer_hint:
        out.append("<p class='note'>The two figures per layer (|W| heatmap and component windows) are left out: "
                   "<code>python -m gsm_lightning.report CKPT --out DIR --layer-figures</code> draws them for every "
                   "layer, <code>--layer-figures-match REGEX</code> for the layers whose name matches REGEX.</p>")
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
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layer-figures", action="store_true",
                        help="also draw the two figures per layer (|W| heatmap, component windows) for every GBLR "
                             "layer: about 0.2 s per layer, so off by default")
    layers.add_argument("--layer-figures-match", metavar="REGEX",
                        help="the two figures per layer for the layers whose name matches REGEX (re.search), "
                             r"e.g. 'layer\.0\.' or 'fc1$'")
    layers.add_argument("--no-layer-figures", action="store_true",
                        help="no per-layer figures (the default; kept for older scripts)")
    parser.add_argument("--no-figures", action="store_true",
                        help="no figures at all: structure.json, structure.csv and report.html only")
    parser.add_argument("--max-size", type=int, default=256, help="heatmap cells per side at most (default 256)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="torch.load with weights_only=False (only for files you trust)")
    args = parser.parse_args(argv)
    if args.max_size < 8:
        parser.error(f"--max-size must be >= 8, got {args.max_size}")
    layer_figures: bool | str = bool(args.layer_figures)
    if args.layer_figures_match is not None:
        try:
            re.compile(args.layer_figures_match)
        except re.error as err:
            parser.error(f"--layer-figures-match: not a regular expression: {args.layer_figures_match!r} ({err})")
        layer_figures = args.layer_figures_match
    try:
        ckpt = load_checkpoint(args.checkpoint, unsafe=args.unsafe_load)
        model, info = model_from_checkpoint(ckpt, args.checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"gsm_lightning.report: error: {err}") from None
    result = write_report(model, args.out, info, figures=not args.no_figures, layer_figures=layer_figures,
                          max_size=args.max_size)
    if isinstance(layer_figures, str) and not args.no_figures and not any(k.endswith("/weights") for k in result["figures"]):
        print(f"gsm_lightning.report: no GBLR layer name matches --layer-figures-match {layer_figures!r}",
              file=sys.stderr)
    if not args.quiet:
        print_structure_table(result["summary"])
    print(f"wrote {result['json']}, {result['csv']}, {len(result['figures'])} figures and {result['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
