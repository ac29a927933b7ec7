"""Statistics and reports of the learned GBLR structure, in plain PyTorch (no Lightning).

* :func:`layer_stats` / :func:`structure_metrics`: scalars per layer, per layer type and for the whole model.
* :func:`layer_group` / :func:`flops_by_group` / :func:`layer_depth` / :func:`flops_by_depth`: layer types
  (q/k/v, MLP, token/channel mixing) and depths (block index) guessed from the qualified names.
* :func:`structure_table` / :func:`structure_summary`: one row per layer and the model totals against dense,
  with :func:`format_structure_table`, :func:`print_structure_table` and :func:`write_structure_csv`.

Used by the callbacks (:mod:`gsm_lightning.callbacks`), the figures (:mod:`gsm_lightning.plotting`) and the
checkpoint report (:mod:`gsm_lightning.report`).  FLOPs are multiply-adds per token (as
:meth:`GBLRLinear.flops`) unless a field says otherwise.
"""

from __future__ import annotations

import csv
import math
import re
from typing import Any

import torch
from torch import nn

from ..core.conversion import linear_types
from ..core.flops import flops_ratio
from ..core.layer import GBLRLinear, gblr_layers
from ..infer.flop_count import flop_breakdown

__all__ = [
    "LAYER_GROUPS",
    "layer_stats",
    "structure_metrics",
    "layer_group",
    "flops_by_group",
    "layer_depth",
    "flops_by_depth",
    "structure_table",
    "structure_summary",
    "format_structure_table",
    "print_structure_table",
    "write_structure_csv",
]


# ============================================================================ statistics
def layer_stats(layer: GBLRLinear) -> dict[str, float]:
    """Structure statistics of one layer.

    ``width_in`` / ``width_out``: mean width fraction over active components (0 if none);
    ``width_in_all`` / ``width_out_all``: over all components; ``rank``: effective rank (active components
    times rank per component); ``flops`` / ``dense_flops``: multiply-adds per token; ``params``: nonzero
    structured weights plus bias."""
    w = layer.int_widths().float()
    frac = w / torch.tensor([[layer.in_features], [layer.out_features]], device=w.device, dtype=w.dtype)
    active = (w[0] > 0) & (w[1] > 0)
    n_active = int(active.sum())
    k = layer.num_components
    flops, dense = layer.flops(), layer.dense_flops()
    return {
        "width_in": float(frac[0][active].mean()) if n_active else 0.0,
        "width_out": float(frac[1][active].mean()) if n_active else 0.0,
        "width_in_all": float(frac[0].mean()) if k else 0.0,
        "width_out_all": float(frac[1].mean()) if k else 0.0,
        "rank": float(n_active * layer.rank_per_component),
        "active": float(n_active),
        "components": float(k),
        "flops": float(flops),
        "dense_flops": float(dense),
        "flops_ratio": flops / dense,
        "params": float(layer.params()),
    }


def _phase(model: nn.Module, layers: list[GBLRLinear]) -> int:
    phase = getattr(model, "phase", None)
    if isinstance(phase, int):
        return phase
    return 2 if layers and all(m.is_frozen for m in layers) else 1


def _sigma(layers: list[GBLRLinear]) -> float | None:
    """Mean finite sigma of the layers still learning their structure (None if there is none)."""
    values = [float(m.sigma) for m in layers if not m.is_frozen]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_state(model: nn.Module) -> dict[str, Any]:
    """What a model knows about its structure run besides its layers: ``budget``, ``target_path`` (the rule's current
    target), ``phase1_end_ratio`` and ``projection_delta``, from its ``structure_state()`` method if it has one
    (:class:`~gsm_lightning.training.module.GSMModule` does); empty otherwise."""
    fn = getattr(model, "structure_state", None)
    return {k: v for k, v in dict(fn()).items() if v is not None} if callable(fn) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def structure_metrics(model: nn.Module, prefix: str = "structure", per_layer: bool = True,
                      state: dict[str, Any] | None = None) -> dict[str, float]:
    """Scalars describing the GBLR structure of ``model`` (empty dict if it has none).

    Global keys: ``{prefix}/flops_ratio`` (FLOPs-weighted over layers), ``flops``, ``dense_flops``, ``params``,
    ``rank``, ``width_in`` / ``width_out`` (over the active components of all layers), ``width_in_all`` /
    ``width_out_all``, ``phase``, ``target`` (the budget, if known), ``sigma`` (mean finite sigma of the
    layers still learning their structure; absent when there is none, e.g. pure Dirichlet or phase 2),
    ``target_path`` (the budget learner's current target ratio, in phase 1), and once phase 1 has ended
    ``phase1_end_ratio`` (the ratio reached by learning, before any projection) and ``projection`` (how much the
    projection at the switch lowered it; 0 when the learner reached the budget).  Per layer type
    (:func:`layer_group`): ``{prefix}/by_type/{group}/width_in`` / ``width_out`` (mean over the active components
    of the group's layers) and ``flops_ratio`` (FLOPs-weighted).  Per layer: ``{prefix}/{name}/{stat}`` for every
    :func:`layer_stats` entry except ``components`` and ``dense_flops``.  ``state`` (default: :func:`run_state`) gives
    the budget, the target path and the phase-1 numbers."""
    named = gblr_layers(model)
    if not named:
        return {}
    layers = [m for _, m in named]
    out: dict[str, float] = {}
    sums = dict.fromkeys(("flops", "dense_flops", "params", "rank", "active", "components"), 0.0)
    width_sum = {"width_in": 0.0, "width_out": 0.0, "width_in_all": 0.0, "width_out_all": 0.0}
    by_type: dict[str, dict[str, float]] = {}
    for name, layer in named:
        st = layer_stats(layer)
        g = by_type.setdefault(layer_group(name), dict.fromkeys(("width_in", "width_out", "active", "flops", "dense"), 0.0))
        g["width_in"] += st["width_in"] * st["active"]
        g["width_out"] += st["width_out"] * st["active"]
        g["active"] += st["active"]
        g["flops"] += st["flops"]
        g["dense"] += st["dense_flops"]
        for key in sums:
            sums[key] += st[key]
        width_sum["width_in"] += st["width_in"] * st["active"]
        width_sum["width_out"] += st["width_out"] * st["active"]
        width_sum["width_in_all"] += st["width_in_all"] * st["components"]
        width_sum["width_out_all"] += st["width_out_all"] * st["components"]
        if per_layer:
            for key, value in st.items():
                if key not in ("components", "dense_flops"):
                    out[f"{prefix}/{name}/{key}"] = value
    out[f"{prefix}/flops_ratio"] = flops_ratio(layers)
    out[f"{prefix}/flops"] = sums["flops"]
    out[f"{prefix}/dense_flops"] = sums["dense_flops"]
    out[f"{prefix}/params"] = sums["params"]
    out[f"{prefix}/rank"] = sums["rank"]
    for key in ("width_in", "width_out"):
        out[f"{prefix}/{key}"] = width_sum[key] / sums["active"] if sums["active"] else 0.0
        out[f"{prefix}/{key}_all"] = width_sum[f"{key}_all"] / sums["components"] if sums["components"] else 0.0
    for group in LAYER_GROUPS:
        if group in by_type:
            g = by_type[group]
            out[f"{prefix}/by_type/{group}/width_in"] = g["width_in"] / g["active"] if g["active"] else 0.0
            out[f"{prefix}/by_type/{group}/width_out"] = g["width_out"] / g["active"] if g["active"] else 0.0
            out[f"{prefix}/by_type/{group}/flops_ratio"] = g["flops"] / g["dense"] if g["dense"] else 1.0
    out[f"{prefix}/phase"] = float(_phase(model, layers))
    state = run_state(model) if state is None else state
    if _number(state.get("budget")) is not None:
        out[f"{prefix}/target"] = _number(state["budget"])
    sigma = _sigma(layers)
    if sigma is not None:
        out[f"{prefix}/sigma"] = sigma
    if _number(state.get("target_path")) is not None and _phase(model, layers) == 1:
        out[f"{prefix}/target_path"] = _number(state["target_path"])
    for attr, key in (("phase1_end_ratio", "phase1_end_ratio"), ("projection_delta", "projection")):
        if _number(state.get(attr)) is not None:
            out[f"{prefix}/{key}"] = _number(state[attr])
    return out


# ============================================================================ layer types
#: Layer groups of :func:`layer_group`, in display order.
LAYER_GROUPS = ("query", "key", "value", "qkv", "attn_out", "mlp_fc1", "mlp_fc2", "token_mixing",
                "channel_mixing", "other")

_QUERY = {"q", "q_proj", "query", "to_q", "wq", "q_lin"}
_KEY = {"k", "k_proj", "key", "to_k", "wk", "k_lin"}
_VALUE = {"v", "v_proj", "value", "to_v", "wv", "v_lin"}
_QKV = {"qkv", "c_attn", "in_proj", "to_qkv", "query_key_value", "wqkv", "qkv_proj", "w_pack"}
_ATTN_OUT = {"out_proj", "o_proj", "to_out", "wo", "out_lin"}
_FC1 = {"fc1", "c_fc", "up_proj", "gate_proj", "w1", "w3", "lin1", "linear1", "fc_in", "dense_h_to_4h"}
_FC2 = {"fc2", "down_proj", "w2", "lin2", "linear2", "fc_out", "dense_4h_to_h"}
_ATTN_PARENT = re.compile(r"attn|attention|self_attn|mixer")


def layer_group(name: str) -> str:
    """Layer type from a qualified module name (heuristic, one of :data:`LAYER_GROUPS`).

    Token-/channel-mixing MLPs (MLP-Mixer: ``token_mlp``, ``mlp_tokens``, ``channel_mlp``...) come first;
    then separate ``q``/``k``/``v`` projections, fused ``qkv`` (``c_attn``, ``qkv``), the attention output
    projection (``out_proj``, ``attn.proj``, ``attn.c_proj``, BERT ``attention.output.dense``), MLP input
    (``fc1``, ``c_fc``, ``intermediate.dense``) and output (``fc2``, ``mlp.c_proj``, BERT ``output.dense``)."""
    parts = [p.lower() for p in name.split(".") if p]
    if not parts:
        return "other"
    last, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    path = parts[:-1]
    if any("token" in p and ("mlp" in p or "mix" in p) for p in path) or last in ("token_mixing", "mlp_tokens"):
        return "token_mixing"
    if any("channel" in p and ("mlp" in p or "mix" in p) for p in path) or last in ("channel_mixing", "mlp_channels"):
        return "channel_mixing"
    if last in _QUERY:
        return "query"
    if last in _KEY:
        return "key"
    if last in _VALUE:
        return "value"
    if last in _QKV:
        return "qkv"
    if last in _ATTN_OUT or (last in ("proj", "c_proj", "dense") and _ATTN_PARENT.search(parent)):
        return "attn_out"
    if last == "dense" and parent == "output" and len(parts) > 2 and _ATTN_PARENT.search(parts[-3]):
        return "attn_out"
    if last in _FC1 or (last == "dense" and parent == "intermediate"):
        return "mlp_fc1"
    if last in _FC2 or (last == "c_proj" and "mlp" in parent) or (last == "dense" and parent == "output"):
        return "mlp_fc2"
    return "other"


def flops_by_group(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{group: {"flops", "dense_flops", "layers"}}`` over the GBLR layers of ``model`` (multiply-adds per
    token), groups from :func:`layer_group` in :data:`LAYER_GROUPS` order, empty groups left out."""
    groups: dict[str, dict[str, float]] = {}
    for name, layer in gblr_layers(model):
        g = groups.setdefault(layer_group(name), {"flops": 0.0, "dense_flops": 0.0, "layers": 0.0})
        g["flops"] += layer.flops()
        g["dense_flops"] += layer.dense_flops()
        g["layers"] += 1
    return {k: groups[k] for k in LAYER_GROUPS if k in groups}


_INDEX = re.compile(r"^\d+$")


def layer_depth(name: str) -> int | None:
    """Depth of a layer from its qualified name: the first all-digit part (``blocks.3.attn.q`` -> 3,
    ``encoder.layer.11.output.dense`` -> 11, ``backbone.0`` -> 0), ``None`` when there is none (e.g. ``head``)."""
    for part in name.split("."):
        if _INDEX.match(part):
            return int(part)
    return None


def flops_by_depth(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{label: {"flops", "dense_flops", "layers"}}`` over the GBLR layers of ``model`` grouped by
    :func:`layer_depth`: labels ``"0"``, ``"1"``... in increasing depth, then ``"other"`` for layers without one."""
    groups: dict[int | None, dict[str, float]] = {}
    for name, layer in gblr_layers(model):
        g = groups.setdefault(layer_depth(name), {"flops": 0.0, "dense_flops": 0.0, "layers": 0.0})
        g["flops"] += layer.flops()
        g["dense_flops"] += layer.dense_flops()
        g["layers"] += 1
    order = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    return {("other" if k is None else str(k)): groups[k] for k in order}


# ============================================================================ report
_ROW_FIELDS = ("name", "type", "in_features", "out_features", "rank_per_component", "components", "active", "rank",
               "width_in", "width_out", "flops", "dense_flops", "flops_ratio", "params", "dense_params")


def structure_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per GBLR layer of ``model``: ``name``, ``type`` (:func:`layer_group`), ``in_features``,
    ``out_features``, ``rank_per_component``, ``components``, ``active``, ``rank`` (effective rank: active
    components times rank per component), ``width_in`` / ``width_out`` (mean
    fractions over active components), ``flops`` / ``dense_flops`` (multiply-adds per token), ``flops_ratio``,
    ``params`` (nonzero structured weights + bias) and ``dense_params`` (``in * out`` + bias)."""
    rows = []
    for name, layer in gblr_layers(model):
        st = layer_stats(layer)
        bias = layer.out_features if layer.bias is not None else 0
        rows.append({
            "name": name,
            "type": layer_group(name),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank_per_component": layer.rank_per_component,
            "components": layer.num_components,
            "active": int(st["active"]),
            "rank": int(st["rank"]),
            "width_in": st["width_in"],
            "width_out": st["width_out"],
            "flops": int(st["flops"]),
            "dense_flops": int(st["dense_flops"]),
            "flops_ratio": st["flops_ratio"],
            "params": int(st["params"]),
            "dense_params": layer.dense_flops() + bias,
        })
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else 1.0


def structure_summary(model: nn.Module, example_input: Any = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The structure report of ``model`` as a JSON-serialisable dict: ``layers`` (:func:`structure_table`),
    ``totals`` (GBLR layers, other linear layers, whole model), ``accounting`` (what is counted how) and, if
    ``example_input`` is given, ``flop_counter``: one forward under ``FlopCounterMode``
    (:func:`gsm_lightning.flop_count.flop_breakdown`; a tuple/list is unpacked into positional arguments,
    a dict into keyword arguments)."""
    rows = structure_table(model)
    gblr_ids: set[int] = set()
    structured_flops = structured_dense = structured_params = structured_dense_params = 0
    linear_flops = n_linear = n_structured = 0
    # HF Conv1D detection imports transformers (slow): only when some module could be a dense linear layer
    has_weight = any(isinstance(getattr(m, "weight", None), torch.Tensor) for m in model.modules())
    lin_types = linear_types() if has_weight else (nn.Linear,)
    inside: list[str] = []  # structured layers: their submodules are not counted again
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, GBLRLinear):
            gblr_ids.update(id(p) for p in module.parameters())
        elif callable(getattr(module, "flops", None)) and callable(getattr(module, "dense_flops", None)) \
                and hasattr(module, "in_features") and hasattr(module, "out_features"):
            # other structured linear layers (e.g. the fixed-structure baselines) with analytic costs
            gblr_ids.update(id(p) for p in module.parameters())
            inside.append(f"{name}." if name else "")
            bias = module.out_features if getattr(module, "bias", None) is not None else 0
            structured_flops += int(module.flops())
            structured_dense += int(module.dense_flops())
            structured_params += int(module.params()) if callable(getattr(module, "params", None)) else sum(
                p.numel() for p in module.parameters())
            structured_dense_params += int(module.dense_flops()) + bias
            n_structured += 1
        elif isinstance(module, lin_types):
            weight = module.weight
            linear_flops += weight.numel()
            n_linear += 1
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in gblr_ids)
    stored_params = sum(p.numel() for p in model.parameters())
    # nn.Linear / Conv1D parameters are in other_params; their FLOPs are in*out = weight.numel()
    linear_params = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                        for m in model.modules() if isinstance(m, lin_types) and not isinstance(m, GBLRLinear))
    g_flops = sum(r["flops"] for r in rows)
    g_dense = sum(r["dense_flops"] for r in rows)
    g_params = sum(r["params"] for r in rows)
    g_dense_params = sum(r["dense_params"] for r in rows)
    m_flops = g_flops + structured_flops + linear_flops
    m_dense = g_dense + structured_dense + linear_flops
    m_params = other_params + g_params + structured_params
    m_dense_params = other_params + g_dense_params + structured_dense_params
    totals = {
        "gblr_layers": {"layers": len(rows), "flops": g_flops, "dense_flops": g_dense,
                        "flops_ratio": _ratio(g_flops, g_dense), "params": g_params, "dense_params": g_dense_params,
                        "params_ratio": _ratio(g_params, g_dense_params)},
        "other_structured_layers": {"layers": n_structured, "flops": structured_flops, "dense_flops": structured_dense,
                                    "params": structured_params, "dense_params": structured_dense_params},
        "dense_linear_layers": {"layers": n_linear, "flops": linear_flops, "params": linear_params},
        "model": {"flops_per_token": m_flops, "dense_flops_per_token": m_dense,
                  "flops_ratio": _ratio(m_flops, m_dense), "params": m_params, "dense_params": m_dense_params,
                  "params_ratio": _ratio(m_params, m_dense_params), "stored_params": stored_params},
    }
    accounting = {
        "unit": "multiply-adds per token (one row through each layer), bias adds excluded",
        "counted_per_token": [
            "GBLRLinear: r * sum(W_in + W_out) over active components (layer.flops())",
            "other structured linear layers exposing flops()/dense_flops() (e.g. baselines): their analytic flops()",
            "nn.Linear and HF Conv1D: in_features * out_features",
        ],
        "not_counted": [
            "convolutions (e.g. patch embeddings), embeddings, normalization, activations, bias adds",
            "attention score and attention-value products (they depend on the sequence length)",
            "different row counts of different layers: the per-token sum weights every linear layer once, e.g. a "
            "classifier head applied to one token per sample or Mixer token-mixing layers applied per channel",
        ],
        "model_flops": "sum of the counted per-token costs; dense_flops_per_token replaces every GBLR / structured "
                       "layer by its dense in*out product",
        "params": "GBLR layers: nonzero structured weights + bias (layer.params()); all other parameters as stored; "
                  "dense_params replaces GBLR / structured layers by in*out + bias; stored_params counts every "
                  "parameter tensor element as allocated",
        "flop_counter": "if present: torch FlopCounterMode FLOPs (= 2 x multiply-adds) for one forward of the "
                        "example input, every counted op included; frozen GBLR layers at their true cost, layers "
                        "still learning their structure as the dense masked products they compute",
    }
    summary: dict[str, Any] = {"layers": rows, "totals": totals, "accounting": accounting}
    budget = _number((run_state(model) if state is None else state).get("budget"))
    if budget is not None:
        summary["target_flops_ratio"] = budget
    layers = [m for _, m in gblr_layers(model)]
    if layers:
        summary["phase"] = _phase(model, layers)
    if example_input is not None:
        summary["flop_counter"] = _flop_counter_section(model, example_input)
    return summary


def _flop_counter_section(model: nn.Module, example_input: Any) -> dict[str, Any]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        if isinstance(example_input, dict):
            br = flop_breakdown(model, **example_input)
        elif isinstance(example_input, (tuple, list)):
            br = flop_breakdown(model, *example_input)
        else:
            br = flop_breakdown(model, example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {
        "unit": "FLOPs = 2 x multiply-adds (torch FlopCounterMode), one forward of the example input",
        "flops": br["flops"],
        "analytic_flops": br["analytic_flops"],
        "dense_flops": br["dense_flops"],
        "flops_ratio": br["ratio"],
        "tokens_per_layer": {name: s["tokens"] for name, s in br["layers"].items()},
    }


def format_structure_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a :func:`structure_summary` (layers and totals)."""
    header = ("layer", "type", "shape (out x in)", "active/K", "w_in", "w_out", "FLOPs", "dense", "ratio", "params")
    lines = [header]
    for r in summary["layers"]:
        lines.append((r["name"], r["type"], f"{r['out_features']} x {r['in_features']}", f"{r['active']}/{r['components']}",
                      f"{r['width_in']:.3f}", f"{r['width_out']:.3f}", f"{r['flops']:,}", f"{r['dense_flops']:,}",
                      f"{r['flops_ratio']:.3f}", f"{r['params']:,}"))
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    lines.append(("GBLR total", "", "", "", "", "", f"{g['flops']:,}", f"{g['dense_flops']:,}", f"{g['flops_ratio']:.3f}",
                  f"{g['params']:,}"))
    lines.append(("model total", "", "", "", "", "", f"{m['flops_per_token']:,}", f"{m['dense_flops_per_token']:,}",
                  f"{m['flops_ratio']:.3f}", f"{m['params']:,}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "-" * len(text[0]))
    text.insert(len(text) - 2, "-" * len(text[0]))
    return "\n".join(text)


def print_structure_table(summary: dict[str, Any]) -> None:
    """Print the table of a :func:`structure_summary` (rich when available, else :func:`format_structure_table`)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_structure_table(summary))
        return
    table = Table(title="GBLR structure (shape = out x in; FLOPs = multiply-adds per token)")
    for col in ("layer", "type", "shape", "active/K", "w_in", "w_out", "FLOPs", "dense", "ratio", "params"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for r in summary["layers"]:
        table.add_row(r["name"], r["type"], f"{r['out_features']} x {r['in_features']}", f"{r['active']}/{r['components']}",
                      f"{r['width_in']:.3f}", f"{r['width_out']:.3f}", f"{r['flops']:,}", f"{r['dense_flops']:,}",
                      f"{r['flops_ratio']:.3f}", f"{r['params']:,}")
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    table.add_section()
    table.add_row("GBLR total", "", "", "", "", "", f"{g['flops']:,}", f"{g['dense_flops']:,}", f"{g['flops_ratio']:.3f}",
                  f"{g['params']:,}")
    table.add_row("model total", "", "", "", "", "", f"{m['flops_per_token']:,}", f"{m['dense_flops_per_token']:,}",
                  f"{m['flops_ratio']:.3f}", f"{m['params']:,}")
    console = Console()
    if not console.is_terminal:  # logs / pipes: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(table)


def write_structure_csv(path: str, summary: dict[str, Any]) -> None:
    """Write the layer rows of a :func:`structure_summary` and two total rows (``TOTAL_GBLR``,
    ``TOTAL_MODEL_PER_TOKEN``) to ``path``."""
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_ROW_FIELDS))
        writer.writeheader()
        writer.writerows(summary["layers"])
        writer.writerow({"name": "TOTAL_GBLR", "flops": g["flops"], "dense_flops": g["dense_flops"],
                         "flops_ratio": g["flops_ratio"], "params": g["params"], "dense_params": g["dense_params"]})
        writer.writerow({"name": "TOTAL_MODEL_PER_TOKEN", "flops": m["flops_per_token"],
                         "dense_flops": m["dense_flops_per_token"], "flops_ratio": m["flops_ratio"],
                         "params": m["params"], "dense_params": m["dense_params"]})
