"""Structure files: the learned integer structure of a model's frozen GBLR layers, without weights (JSON).

A structure file records, per GBLR layer (by qualified name), its shape, rank per component, bias flag and
the integer widths and locations ``(2, K)`` of its components on the grid (row 0 input side, row 1 output
side).  The fixtures in ``benchmarks/data/structures_*.json`` were written by
``benchmarks/save_structures.py`` from runs of the package; they let benchmarks and tests build frozen
layers and models with *real* learned structures (and **random weights**, which is all timing needs).

    s = load_structure("benchmarks/data/structures_minilm_b0.3.json")
    layer = frozen_layer(s["layers"]["encoder.layer.0.attention.self.query"])   # frozen GBLRLinear, random weights
    compact = compact_layer(s["layers"][name], tokens=256)                     # CompactGBLR of it
    apply_structure(backbone, s)    # every named nn.Linear -> frozen GBLRLinear of the stored structure

Plain PyTorch and JSON (no Lightning).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..core.flops import structure_flops
from ..core.layer import GBLRLinear, gblr_layers
from ..core.modules import set_submodule
from ..infer.compact import CompactGBLR

__all__ = ["FORMAT", "FORMAT_VERSION", "layer_record", "structure_record", "save_structure", "load_structure",
           "frozen_layer", "compact_layer", "apply_structure", "set_structure", "structure_summary"]

FORMAT = "gsm_lightning.structure"
FORMAT_VERSION = 1


#: the fields of a layer in a structure file, in file order (taken from :meth:`GBLRLinear.structure`, plus the bias flag)
_LAYER_KEYS = ("in_features", "out_features", "rank_per_component", "bias", "widths", "locations")


def layer_record(layer: GBLRLinear) -> dict[str, Any]:
    """The integer structure of one frozen layer: shape, rank, bias flag, widths and locations ``(2, K)``
    (:meth:`GBLRLinear.structure` without the ``num_components`` and ``frozen`` it implies; a record reads back
    with :meth:`GBLRLinear.restore_structure`)."""
    if not layer.is_frozen:
        raise ValueError("a structure record needs a frozen GBLRLinear (call freeze_structure() first)")
    rec = {**layer.structure(), "bias": layer.bias is not None}
    return {key: rec[key] for key in _LAYER_KEYS}


def structure_record(model: nn.Module, /, **meta: Any) -> dict[str, Any]:
    """Structure file contents for every frozen GBLR layer of ``model``; ``meta`` (JSON values) is stored as is."""
    layers = {name: layer_record(m) for name, m in gblr_layers(model) if m.is_frozen}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no frozen GBLR layer")
    return {"format": FORMAT, "version": FORMAT_VERSION, **meta, **structure_summary({"layers": layers}),
            "layers": layers}


def structure_summary(structure: Mapping[str, Any]) -> dict[str, Any]:
    """``flops``, ``dense_flops`` (multiply-adds per token over the stored layers) and their ``flops_ratio``."""
    flops = dense = 0
    for rec in structure["layers"].values():
        flops += structure_flops(torch.tensor(rec["widths"], dtype=torch.int64).reshape(2, -1), rec["in_features"],
                                 rec["out_features"], rec["rank_per_component"])
        dense += rec["in_features"] * rec["out_features"]
    return {"flops": flops, "dense_flops": dense, "flops_ratio": flops / dense if dense else 1.0}


def save_structure(model_or_record: nn.Module | Mapping[str, Any], path: str | os.PathLike, /, **meta: Any) -> dict[str, Any]:
    """Write a structure file (one line per layer, so that diffs stay readable); returns what was written."""
    rec = dict(model_or_record) if isinstance(model_or_record, Mapping) else structure_record(model_or_record, **meta)
    if isinstance(model_or_record, Mapping):
        rec.update(meta)
    _validate(rec, os.fspath(path))
    head = {k: v for k, v in rec.items() if k != "layers"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "layers": {']
    items = list(rec["layers"].items())
    for i, (name, layer) in enumerate(items):
        lines.append(f"  {json.dumps(name)}: {json.dumps(layer, separators=(',', ':'))}{',' if i + 1 < len(items) else ''}")
    lines += [" }", "}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rec


def _validate(rec: Mapping[str, Any], where: str) -> None:
    if rec.get("format") != FORMAT:
        raise ValueError(f"{where}: not a gsm_lightning structure file (format {FORMAT!r})")
    if int(rec.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{where}: structure file version {rec.get('version')} is newer than this gsm_lightning ({FORMAT_VERSION})")
    for name, layer in rec["layers"].items():
        n = (int(layer["in_features"]), int(layer["out_features"]))
        w = torch.tensor(layer["widths"], dtype=torch.int64).reshape(2, -1)
        loc = torch.tensor(layer["locations"], dtype=torch.int64).reshape(2, -1)
        if w.shape != loc.shape:
            raise ValueError(f"{where}: layer {name!r} has widths {tuple(w.shape)} but locations {tuple(loc.shape)}")
        for side in range(2):
            if ((w[side] < 1) | (w[side] > n[side])).any() or ((loc[side] < 0) | (loc[side] >= n[side])).any():
                raise ValueError(f"{where}: layer {name!r} has widths outside [1, {n[side]}] or locations outside "
                                 f"[0, {n[side]}) on the {'input' if side == 0 else 'output'} side")


def load_structure(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a structure file (format, version, widths and locations on the grid)."""
    with open(path) as f:
        rec = json.load(f)
    _validate(rec, os.fspath(path))
    return rec


def frozen_layer(rec: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> GBLRLinear:
    """A frozen :class:`GBLRLinear` with the stored structure and **random** factors (``N(0, 1/n)`` per side) and
    bias: the real structure, not the trained weights."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, r = int(rec["in_features"]), int(rec["out_features"]), int(rec["rank_per_component"])
    w = torch.tensor(rec["widths"], dtype=torch.int64).reshape(2, -1)
    loc = torch.tensor(rec["locations"], dtype=torch.int64).reshape(2, -1)
    k = w.shape[1]
    u = torch.randn(k, r, n_out, generator=g, dtype=torch.float64) / n_out ** 0.5
    v = torch.randn(k, r, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    bias = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.01 if rec.get("bias", True) else None
    layer = GBLRLinear._from_factors(u.to(dtype), v.to(dtype), w, loc, None if bias is None else bias.to(dtype))
    layer = layer.freeze_structure().eval()
    return layer if device is None else layer.to(device)


def compact_layer(rec: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32, **compact_kwargs: Any) -> nn.Module:
    """:class:`~gsm_lightning.compact.CompactGBLR` of :func:`frozen_layer` (random weights)."""
    return CompactGBLR.from_gblr(frozen_layer(rec, seed, dtype), **compact_kwargs)


def _stored_layers(model: nn.Module, structure: Mapping[str, Any], strict: bool) -> Iterator[tuple[int, str, Mapping[str, Any], nn.Module]]:
    """``(index, name, record, module)`` for every stored layer found in ``model``; a missing one raises when
    ``strict`` and is skipped otherwise."""
    for i, (name, rec) in enumerate(structure["layers"].items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise ValueError(f"structure layer {name!r} does not exist in {type(model).__name__}") from None
            continue
        yield i, name, rec, module


def apply_structure(model: nn.Module, structure: Mapping[str, Any], seed: int = 0, strict: bool = True) -> nn.Module:
    """Replace (in place) every layer named in ``structure`` (an ``nn.Linear`` or GBLR layer of the stored shape)
    by a frozen :class:`GBLRLinear` of the stored structure with random factors (the layer's own bias, if any, is
    kept).  ``strict``: a stored name missing from ``model`` is an error.  Returns ``model``."""
    for i, name, rec, old in _stored_layers(model, structure, strict):
        shape = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if shape != (rec["in_features"], rec["out_features"]):
            raise ValueError(f"structure layer {name!r} is {rec['in_features']}->{rec['out_features']} but "
                             f"{type(model).__name__}.{name} is {shape[0]}->{shape[1]}")
        ref = next(old.parameters(), None)
        new = frozen_layer({**rec, "bias": getattr(old, "bias", None) is not None}, seed=seed + i,
                           dtype=ref.dtype if ref is not None else torch.float32,
                           device=ref.device if ref is not None else None)
        if getattr(old, "bias", None) is not None:
            with torch.no_grad():
                new.bias.copy_(old.bias)
        new._gsm_name = name
        new.train(old.training)
        set_submodule(model, name, new)
    return model


@torch.no_grad()
def set_structure(model: nn.Module, structure: Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Write a stored structure into the **trainable** GBLR layers of ``model``, keeping their factors: the first
    K_stored components take the stored widths and locations, the others width 0 (dropped at the next
    ``freeze_structure``).  Used to train a learned structure again from a fresh initialisation.  Raises if a
    layer is missing, frozen, of another shape or rank, or has fewer components than stored."""
    for _, name, rec, layer in _stored_layers(model, structure, strict):
        if not isinstance(layer, GBLRLinear) or layer.is_frozen:
            raise ValueError(f"structure layer {name!r} must be a trainable GBLRLinear (convert the model first, and "
                             f"set the structure before freezing), got {type(layer).__name__}")
        if (layer.in_features, layer.out_features, layer.rank_per_component) != (
                rec["in_features"], rec["out_features"], rec["rank_per_component"]):
            raise ValueError(f"structure layer {name!r} is {rec['in_features']}->{rec['out_features']} rank "
                             f"{rec['rank_per_component']} but the model's is {layer.in_features}->{layer.out_features} "
                             f"rank {layer.rank_per_component}")
        w = torch.tensor(rec["widths"], dtype=torch.float64).reshape(2, -1)
        loc = torch.tensor(rec["locations"], dtype=torch.float64).reshape(2, -1)
        k = w.shape[1]
        if k > layer.num_components:
            raise ValueError(f"structure layer {name!r} has {k} components but the model's has only "
                             f"{layer.num_components}; raise num_components")
        n = torch.tensor([[layer.in_features], [layer.out_features]], dtype=torch.float64)
        widths = torch.zeros(2, layer.num_components, dtype=torch.float64)
        locations = torch.zeros(2, layer.num_components, dtype=torch.float64)
        widths[:, :k], locations[:, :k] = w / n, loc / n
        layer.widths.copy_(widths.to(layer.widths.dtype))
        layer.locations.copy_(locations.to(layer.locations.dtype))
        layer.invalidate_cache()
    return model
