"""The math of a structured layer, in plain PyTorch: Gaudi masks, FLOPs accounting, :class:`GBLRLinear`,
conversion of a model's linear layers and the hand-picked baselines.  Imports nothing else of the package."""

from .conversion import GSMReport, gsmify, select_linear_layers
from .flops import flops_ratio, layers_flops
from .layer import GBLRLinear, gblr_layers, model_flops
from .masks import boxcar_mask, gaudi_mask

__all__ = ["GBLRLinear", "gblr_layers", "model_flops", "flops_ratio", "layers_flops", "gsmify", "select_linear_layers",
           "GSMReport", "boxcar_mask", "gaudi_mask"]
