"""Export of models with frozen GBLR layers (plain PyTorch, no Lightning).

* :func:`merge_to_dense` -- replace every GBLR layer by an ``nn.Linear`` holding its dense weight.
* :func:`save_compact` / :func:`load_compact` -- store only the structure (integer widths and
  locations) and the factor values inside the windows of each frozen GBLR layer, plus the other
  weights of the model; restore them into a freshly built backbone.
* :func:`export_program` -- ``torch.export`` of the model (after :func:`~gsm_lightning.inference.optimize_inference`).
* :func:`export_onnx` -- ONNX file via ``torch.onnx.export`` (needs the ``onnx`` and ``onnxscript`` packages).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.layer import GBLRLinear, gblr_layers
from ..core.modules import set_submodule
from ..infer.compact import CompactGBLR
from ..infer.inference import InferenceReport, optimize_inference
from .checkpoint import read_torch_file

__all__ = ["merge_to_dense", "save_compact", "load_compact", "compact_state", "export_program", "export_onnx",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "gsm_lightning.compact"
FORMAT_VERSION = 1
InferenceMode = Literal["auto", "compact", "dense"]


@torch.no_grad()
def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replace (in place) every :class:`GBLRLinear` and :class:`CompactGBLR` of ``model`` by an
    ``nn.Linear`` with the merged dense weight; returns ``model`` (or the new layer if ``model`` itself
    is a GBLR layer).  Unfrozen GBLR layers are merged with their current masks."""
    if isinstance(model, GBLRLinear):
        return model.to_linear()
    if isinstance(model, CompactGBLR):
        return _compact_to_linear(model)
    names = [(n, m) for n, m in model.named_modules() if isinstance(m, (GBLRLinear, CompactGBLR))]
    for name, mod in names:
        new = mod.to_linear() if isinstance(mod, GBLRLinear) else _compact_to_linear(mod)
        new.train(mod.training)
        set_submodule(model, name, new)
    return model


def _compact_to_linear(mod: CompactGBLR) -> nn.Linear:
    w = mod.to_dense()
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(w)
    if mod.bias is not None:
        lin.bias.copy_(mod.bias)
    return lin


# --------------------------------------------------------------------------------- compact files
def _window_index(locations: Tensor, widths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(K, max W)`` positions ``(L_k + j) % n`` and the validity mask ``j < W_k``."""
    wmax = int(widths.max()) if widths.numel() else 0
    j = torch.arange(wmax, device=widths.device)
    return (locations[:, None] + j[None, :]) % n, j[None, :] < widths[:, None]


def _pack(factor: Tensor, locations: Tensor, widths: Tensor) -> Tensor:
    """Values of ``factor`` ``(K, r, n)`` inside each component's window, flattened (component, rank, window order)."""
    k, r, n = factor.shape
    idx, valid = _window_index(locations, widths, n)
    vals = torch.gather(factor, 2, idx[:, None, :].expand(k, r, idx.shape[1]))  # (K, r, Wmax)
    return vals[valid[:, None, :].expand_as(vals)].clone()


def _unpack(values: Tensor, locations: Tensor, widths: Tensor, r: int, n: int) -> Tensor:
    k = widths.numel()
    idx, valid = _window_index(locations, widths, n)
    vals = torch.zeros(k, r, idx.shape[1], dtype=values.dtype)
    mask = valid[:, None, :].expand_as(vals)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"stored factor has {values.numel()} values but the structure needs {int(mask.sum())}")
    vals[mask] = values
    out = torch.zeros(k, r, n, dtype=values.dtype)
    return out.scatter_(2, idx[:, None, :].expand(k, r, idx.shape[1]), vals) if k else out


def _layer_record(layer: GBLRLinear) -> dict[str, Any]:
    """:meth:`GBLRLinear.structure` (integer tensors; without ``num_components`` and ``frozen``: the layer is frozen)
    plus the factor values inside the windows and the bias."""
    s = layer.structure(tensors=True)
    w, loc = s["widths"], s["locations"]
    return {
        **{key: s[key] for key in ("in_features", "out_features", "rank_per_component", "widths", "locations")},
        "weight_in": _pack(layer.weight_in.detach().cpu(), loc[0], w[0]),
        "weight_out": _pack(layer.weight_out.detach().cpu(), loc[1], w[1]),
        "bias": None if layer.bias is None else layer.bias.detach().cpu().clone(),
    }


@torch.no_grad()
def compact_state(model: nn.Module) -> dict[str, Any]:
    """The dictionary :func:`save_compact` writes: per frozen GBLR layer its structure and in-window
    factor values, plus the state dict of everything else."""
    gblr: dict[str, GBLRLinear] = {}
    unfrozen = []
    for name, m in model.named_modules():
        if isinstance(m, GBLRLinear):
            if not m.is_frozen:
                unfrozen.append(name or "<model>")
            gblr[name] = m
        elif isinstance(m, CompactGBLR):
            gblr[name] = m.to_gblr()
    if unfrozen:
        raise ValueError(f"save_compact needs frozen GBLR layers; not frozen: {', '.join(unfrozen)} "
                         "(call freeze_structure() on them first)")
    if not gblr:
        raise ValueError(f"{type(model).__name__} has no GBLR layer to save compactly")
    prefixes = tuple(f"{n}." if n else "" for n in gblr)
    rest = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not any(k.startswith(p) for p in prefixes)}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "layers": {name: _layer_record(layer) for name, layer in gblr.items()},
        "state_dict": rest,
    }


def save_compact(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the frozen GBLR structure and weights of ``model`` (see :func:`compact_state`) to ``path``
    with ``torch.save``; returns the file size in bytes.  Layers already replaced by
    :class:`CompactGBLR` are stored as their GBLR structure; merged ``nn.Linear`` layers as ordinary weights."""
    state = compact_state(model)
    try:
        f = open(path, "wb")  # opened here so that a failure names the path (torch.save's C++ error does not)
    except OSError as e:
        raise type(e)(e.errno, f"save_compact cannot write {os.fspath(path)!r}: {e.strerror}; choose a writable "
                               "location (or create the directory / fix its permissions)") from None
    with f:
        torch.save(state, f)
    return os.path.getsize(path)


def _module_shape(mod: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module, or None."""
    if isinstance(mod, (GBLRLinear, CompactGBLR, nn.Linear)):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "weight"):  # HF GPT-2 Conv1D stores (in, out)
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return None


@torch.no_grad()
def load_compact(
    path: str | os.PathLike | dict[str, Any],
    model_or_factory: nn.Module | Callable[[], nn.Module],
    map_location: Any = "cpu",
) -> nn.Module:
    """Restore a :func:`save_compact` file into a freshly built backbone.

    ``model_or_factory`` is the model (or a zero-argument callable building it) in its original form:
    each stored layer name must be a linear-like module (``nn.Linear``, HF ``Conv1D`` or a GBLR layer) of
    the stored shape; it is replaced by a frozen :class:`GBLRLinear` of the stored structure and the rest
    of the weights are loaded strictly.  Raises ``ValueError`` naming the layer/keys when the file does not
    fit the architecture.  Returns the model (in eval mode)."""
    state = path if isinstance(path, dict) else read_torch_file(path, "compact file", map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a gsm_lightning compact file (format {FORMAT!r})")
    if int(state.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"compact file version {state.get('version')} is newer than this gsm_lightning ({FORMAT_VERSION})")
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_factory must be an nn.Module or return one, got {type(model).__name__}")
    arch = type(model).__name__
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    for name, rec in state["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"stored GBLR layer '{name}' does not exist in {arch} "
                             f"(file written from {state.get('model_class')}): wrong architecture") from None
        shape = _module_shape(old)
        want = (rec["in_features"], rec["out_features"])
        if shape is None:
            raise ValueError(f"stored GBLR layer '{name}' ({want[0]}->{want[1]}) maps to a {type(old).__name__} "
                             f"in {arch}, not a linear layer: wrong architecture")
        if shape != want:
            raise ValueError(f"stored GBLR layer '{name}' is {want[0]}->{want[1]} but {arch}.{name} is "
                             f"{shape[0]}->{shape[1]}: wrong architecture")
        bias = rec["bias"]
        has_bias = getattr(old, "bias", None) is not None
        if has_bias != (bias is not None):
            raise ValueError(f"stored GBLR layer '{name}' {'has' if bias is not None else 'has no'} bias but "
                             f"{arch}.{name} {'has' if has_bias else 'has no'} bias: wrong architecture")
        r, n_in, n_out = rec["rank_per_component"], want[0], want[1]
        w, loc = rec["widths"].long(), rec["locations"].long()
        v = _unpack(rec["weight_in"], loc[0], w[0], r, n_in)
        u = _unpack(rec["weight_out"], loc[1], w[1], r, n_out)
        layer = GBLRLinear._from_factors(u, v, w, loc, bias).freeze_structure().to(device)
        layer._gsm_name = name
        set_submodule(model, name, layer)
    gblr_prefixes = tuple(f"{n}." for n in state["layers"])
    result = model.load_state_dict(state["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(gblr_prefixes)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(gblr_prefixes)]
    if missing or unexpected:
        raise ValueError(f"compact file does not fit {arch}: missing keys {missing[:10]}, unexpected keys "
                         f"{unexpected[:10]} (wrong architecture?)")
    return model.eval()


# --------------------------------------------------------------------------------------- graphs
def _prepared(model: nn.Module, mode: InferenceMode, example_inputs: tuple, **kw: Any) -> tuple[nn.Module, InferenceReport]:
    """A copy of ``model`` in eval mode with every frozen GBLR layer replaced (a plain
    :class:`GBLRLinear` reads its structure from buffers at run time, which graph capture cannot follow)."""
    if mode not in ("auto", "compact", "dense"):
        raise ValueError(f"unknown mode {mode!r}; expected 'auto', 'compact' or 'dense'")
    unfrozen = [n for n, _ in gblr_layers(model, include_frozen=False)]
    if unfrozen:
        raise ValueError(f"export needs frozen GBLR layers; not frozen: {', '.join(n or '<model>' for n in unfrozen)}")
    m = copy.deepcopy(model).eval()
    if isinstance(m, GBLRLinear):
        wrapper = nn.Sequential(m)
        m = wrapper
    kw.setdefault("fallback", False)  # an exported graph does not branch on the token count: no dense copy to carry
    return m, optimize_inference(m, mode=mode, **kw)


def _dynamic_shapes(example_inputs: tuple, dynamic: bool) -> Any:
    if not dynamic:
        return None
    return tuple({i: torch.export.Dim.AUTO for i in range(x.dim() - 1)} if isinstance(x, Tensor) else None
                 for x in example_inputs)


def export_program(
    model: nn.Module,
    example_inputs: Sequence[Any],
    mode: InferenceMode = "auto",
    dynamic: bool = True,
    path: str | os.PathLike | None = None,
    **optimize_kwargs: Any,
) -> torch.export.ExportedProgram:
    """``torch.export`` a copy of ``model`` whose frozen GBLR layers were replaced according to ``mode``
    (see :func:`optimize_inference`).  With ``dynamic`` every leading dimension
    of the tensor inputs is dynamic.  Saved with ``torch.export.save`` when ``path`` is given."""
    args = tuple(example_inputs)
    m, _ = _prepared(model, mode, args, **optimize_kwargs)
    ep = torch.export.export(m, args, dynamic_shapes=_dynamic_shapes(args, dynamic))
    if path is not None:
        torch.export.save(ep, path)
    return ep


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | os.PathLike,
    mode: InferenceMode = "auto",
    dynamic: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **optimize_kwargs: Any,
) -> InferenceReport:
    """Write an ONNX file of a copy of ``model`` (frozen GBLR layers replaced according to ``mode``) with
    ``torch.onnx.export`` (dynamo exporter; needs ``onnx`` and ``onnxscript``).  Returns the
    :func:`optimize_inference` report."""
    args = tuple(example_inputs)
    m, report = _prepared(model, mode, args, **optimize_kwargs)
    torch.onnx.export(m, args, str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(args, dynamic),
                      input_names=list(input_names) if input_names else None,
                      output_names=list(output_names) if output_names else None, verbose=False)
    return report
