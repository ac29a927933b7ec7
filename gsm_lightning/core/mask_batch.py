"""The Gaudi masks of many GBLR layers in one call per mask length, for the next forward.

In phase 1 every forward recomputes every layer's masks with their graph (the structure changed at the last step).
For the small layers of a ViT or a Mixer, the cost is the number of kernel launches, not their size: two mask
computations per layer, each a dozen small ops forward and backward.  :func:`prepare_masks` concatenates the widths
and locations of all sides of the same length (and sigma) over the model, computes their masks at once
(:func:`~gsm_lightning.core.masks.gaudi_mask`), and hands each layer its rows; each layer uses them in its next
forward, once, if its structure has not changed in between, and computes its own otherwise.  The masks and their
gradients are those of the per-layer computation (a concatenation and its split in between).

``GSMModule`` calls it before each training forward of phase 1 and :func:`release_masks` after it, so no graph is
held between steps (a layer the forward did not reach keeps nothing).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .layer import GBLRLinear, gblr_layers
from .masks import gaudi_mask

__all__ = ["check_structures", "prepare_masks", "release_masks"]


def prepare_masks(model: nn.Module) -> int:
    """Compute the masks of every non-frozen GBLR layer of ``model`` whose structure takes a gradient, grouped by
    mask length, sigma and dtype, and leave them for each layer's next forward.  Does nothing (returns 0) without
    grad mode or under ``torch.compile``.  Returns the number of layers prepared.

    Raises:
        FloatingPointError: a layer's widths or locations are not finite (its name in the message), as its
            forward would.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return 0
    layers = [layer for _, layer in gblr_layers(model, include_frozen=False)
              if layer.widths.requires_grad or layer.locations.requires_grad]
    check_structures(layers)
    groups: dict[tuple, list[tuple[list, int, Tensor, Tensor]]] = {}
    entries: list[list] = []
    for layer in layers:
        index, widths, locations = layer._live_structure()  # the live index check_structures cached
        entry = [layer, index, None, None]
        sigma = float(layer.sigma)
        for side, n in ((0, layer.in_features), (1, layer.out_features)):
            key = (n, sigma, widths.dtype, locations.dtype, widths.device)
            groups.setdefault(key, []).append((entry, side, widths[side], locations[side]))
        entries.append(entry)
    for (n, sigma, *_), items in groups.items():
        masks = gaudi_mask(torch.cat([it[2] for it in items]), torch.cat([it[3] for it in items]), n, sigma)
        for (entry, side, _, _), mask in zip(items, masks.split([it[2].numel() for it in items])):
            entry[2 + side] = mask
    for layer, index, m_in, m_out in entries:
        dtype = layer.weight_in.dtype
        layer._prepared_masks = (layer._cache_key(), index, m_in.to(dtype), m_out.to(dtype))
    return len(entries)


_SIZES: dict[tuple, Tensor] = {}


def check_structures(layers: list[GBLRLinear]) -> None:
    """What every layer's forward checks first, for all of ``layers`` at once: that their widths and locations are
    finite (:meth:`~GBLRLinear._check_finite`'s error, naming the layer, otherwise) and which components are live
    (:meth:`~GBLRLinear.live_components`, left in each layer's cache for its next forward), from one concatenation
    per device and one host read, instead of a dozen small operations and two host reads per layer.

    Raises:
        FloatingPointError: a layer's widths or locations are not finite.
    """
    by_device: dict[tuple, list[GBLRLinear]] = {}
    for layer in layers:
        by_device.setdefault((layer.widths.device, layer.widths.dtype), []).append(layer)
    for (device, _), group in by_device.items():
        widths = torch.cat([m.widths.detach() for m in group], dim=1)
        if widths.dtype not in (torch.float32, torch.float64):  # as to_grid: 16-bit floats cannot hold the grid
            widths = widths.float()
        finite = torch.isfinite(widths).all() & torch.isfinite(torch.cat([m.locations.detach() for m in group], 1)).all()
        shape = tuple((m.in_features, m.out_features, m.num_components) for m in group)
        sizes = _SIZES.get((shape, device, widths.dtype))
        if sizes is None:  # every component's side lengths, (2, K in all)
            sizes = torch.cat([torch.tensor([[float(i)], [float(o)]], dtype=widths.dtype, device=device).expand(2, k)
                               for i, o, k in shape], dim=1)
            if len(_SIZES) > 64:
                _SIZES.clear()
            _SIZES[(shape, device, widths.dtype)] = sizes
        # as live_components: round(w * n) > 0 on either side (the widths are finite, so the float compare is the int one)
        live = (torch.round(widths * sizes) > 0).any(0)
        flags = torch.cat([finite.view(1), live]).cpu().numpy()
        if not flags[0]:
            for m in group:
                m._check_finite()  # raises, naming the layer
        start = 1
        for m in group:
            row = flags[start:start + m.num_components]
            start += m.num_components
            index = None if row.all() else torch.from_numpy(np.flatnonzero(row)).to(device)
            m._live_cache = (m._live_key(), index)


def release_masks(model: nn.Module) -> None:
    """Drop the masks :func:`prepare_masks` left that no forward used (and their graph)."""
    for _, layer in gblr_layers(model):
        layer._prepared_masks = None
