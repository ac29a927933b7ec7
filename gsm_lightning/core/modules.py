"""Module-tree surgery by dotted name: the one place that replaces (or attaches) a submodule of a model.

    set_submodule(model, "encoder.layer.0.attention.self.query", new_layer)

Plain PyTorch; imports nothing else of the package.
"""

from __future__ import annotations

from torch import nn

__all__ = ["get_submodule_parent", "set_submodule"]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule called ``name`` (the parent of a top-level name is ``model``)."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def set_submodule(model: nn.Module, name: str, new: nn.Module, create_parents: bool = False) -> None:
    """Put ``new`` at the dotted ``name`` of ``model`` (``setattr`` on its parent: an existing submodule is replaced,
    a ``ModuleList``/``Sequential`` index included).

    ``create_parents``: the missing intermediate containers are created as empty ``nn.Module`` s and ``new`` is
    registered with ``add_module`` (used to rebuild a model from the names of a state dict alone); otherwise a
    missing parent raises ``AttributeError`` (``get_submodule``'s)."""
    if not create_parents:
        parent, attr = get_submodule_parent(model, name)
        setattr(parent, attr, new)
        return
    *path, attr = name.split(".")
    parent = model
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(attr, new)
