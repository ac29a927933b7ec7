"""Reading checkpoints safely (``weights_only=True``), and rebuilding the GBLR layers of any GSM checkpoint from
its tensors alone, without the backbone's code.  Plain PyTorch."""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layer import GBLRLinear
from ..core.modules import set_submodule

__all__ = ["read_torch_file", "CheckpointError", "load_checkpoint", "model_from_checkpoint"]


def read_torch_file(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with a damaged file reported as a ``ValueError`` naming ``what``
    and the path (torch's own message for some corruptions suggests ``weights_only=False``, which would run
    arbitrary code from the file: never the fix for a damaged file).  A missing or unreadable file keeps
    torch's ``OSError``, which names the path."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001  (zip, pickle, unicode, EOF, OSError errors of a damaged file)
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            reason = "its data is damaged or holds objects other than tensors and plain containers"
        else:
            reason = (str(e).split(". ")[0].strip() or "unexpected end of file")[:160]
        raise ValueError(f"cannot read {what} {os.fspath(path)!r}: the file is corrupt or truncated "
                         f"({type(e).__name__}: {reason}); write it again (or copy it again) from the source") from None



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
        set_submodule(root, name or "layer", layers[name], create_parents=True)  # names kept
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
