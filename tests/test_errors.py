"""Bad input fails fast with a clear error naming the problem (issue 7, item 3).

One consolidated place that pins each user-facing error: exception type and a meaningful part of the message.
"""

from __future__ import annotations

import gzip
import math
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsm_lightning import GBLRLinear
from gsm_lightning.cli import build_cli
from gsm_lightning.core.conversion import gsmify
from gsm_lightning.core.masks import gaudi_mask
from gsm_lightning.data import FashionMNISTDataModule
from gsm_lightning.io.export import load_compact, save_compact
from gsm_lightning.training.module import GSMModule

from .helpers import adamw, digits_loaders

ROOT = Path(__file__).resolve().parents[1]


def tiny(hidden: int = 96) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))


def named_tiny() -> nn.Sequential:
    """Nested names, so a qualified name ('enc.fc') is distinguishable from a bare index."""
    return nn.Sequential(OrderedDict(enc=nn.Sequential(OrderedDict(fc=nn.Linear(64, 32))), act=nn.GELU(),
                                     head=nn.Linear(32, 10)))


def module(backbone: nn.Module | None = None, **kw) -> GSMModule:
    args = dict(num_classes=10, budget=0.4, optimizer=adamw())
    args.update(kw)
    return GSMModule(tiny() if backbone is None else backbone, **args)


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


# ------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, True])
@pytest.mark.parametrize("where", ["gsmify", "from_linear", "GSMModule"])
def test_budget_outside_unit_interval(where, budget):
    build = {
        "gsmify": lambda: gsmify(tiny(), budget=budget),
        "from_linear": lambda: GBLRLinear.from_linear(nn.Linear(16, 8), budget=budget),
        "GSMModule": lambda: module(budget=budget),
    }[where]
    with pytest.raises(ValueError, match=r"budget must be .*in \(0, 1\]"):
        build()


def test_budget_above_initial_flops_of_random_init():
    with pytest.raises(ValueError, match=r"budget\) 0\.9 is above the initial ratio 0\.\d+ .*width_init"):
        module(budget=0.9, init="random", layer_kwargs={"width_init": 0.2})


# ---------------------------------------------------------------------------------- layer selection
@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_pattern_matching_no_layer_lists_the_layers(kind):
    with pytest.raises(ValueError, match=rf"{kind} pattern 'blocks\.\*' matches no linear layer of Sequential; "
                                         r"linear layers are: 0, 2"):
        gsmify(tiny(), **{kind: ["blocks.*"]})
    with pytest.raises(ValueError, match=rf"{kind} pattern 're:enc' matches no linear layer of Sequential; "
                                         r"linear layers are: enc\.fc, head"):
        module(named_tiny(), **{kind: ["re:enc"]})  # re.fullmatch: a prefix is not a match


def test_include_minus_exclude_leaves_nothing():
    with pytest.raises(ValueError, match="leaves no layer to convert"):
        gsmify(tiny(), include=["0"], exclude=["0"])


def test_backbone_without_linear_layers():
    convnet = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match="backbone Sequential has no linear layers"):
        gsmify(convnet)
    with pytest.raises(ValueError, match="no linear layers"):
        module(convnet)


# ------------------------------------------------------------------------------------ init choices
def test_unknown_init_and_width_init():
    with pytest.raises(ValueError, match=r"unknown init 'svd'; expected one of \('pretrained', 'random'\)"):
        gsmify(tiny(), init="svd")
    with pytest.raises(ValueError, match="unknown init 'svd'"):
        module(init="svd")
    with pytest.raises(ValueError, match=r"unknown width_init 'wide'; expected one of \('splr', 'full'\)"):
        GBLRLinear(8, 8, width_init="wide")
    with pytest.raises(ValueError, match="unknown width_init 'wide'"):
        module(init="random", layer_kwargs={"width_init": "wide"})
    with pytest.raises(ValueError, match=r"numeric width_init must be in \(0, 1\], got 1.5"):
        GBLRLinear(8, 8, width_init=1.5)
    with pytest.raises(ValueError, match="width_init does not apply to from_linear"):
        module(init="pretrained", layer_kwargs={"width_init": "full"})
    with pytest.raises(ValueError, match="unknown location_init 'middle'"):
        GBLRLinear(8, 8, location_init="middle")
    with pytest.raises(ValueError, match="location_init='tiled' needs a numeric width_init"):
        module(init="random", layer_kwargs={"location_init": "tiled"})
    with pytest.raises(ValueError, match="location_init='tiled' is a random-init layout"):
        module(init="pretrained", layer_kwargs={"location_init": "tiled"})


def test_rank_per_component_larger_than_min_side():
    with pytest.raises(ValueError, match=r"rank_per_component must be in \[1, min\(in_features, out_features\)\] "
                                         r"= \[1, 8\], got 9"):
        GBLRLinear(8, 16, rank_per_component=9)
    with pytest.raises(ValueError, match=r"= \[1, 10\], got 11"):  # the 96->10 head of the backbone
        module(init="random", layer_kwargs={"rank_per_component": 11})
    with pytest.raises(ValueError, match=r"= \[1, 10\], got 11"):
        gsmify(tiny(), init="pretrained", rank_per_component=11, fit_steps=0)
    with pytest.raises(ValueError, match="got 0"):
        GBLRLinear(8, 16, rank_per_component=0)


def test_from_linear_rejects_non_linear_modules_and_bad_fit_steps():
    with pytest.raises(ValueError, match=r"2-D weight .*got Conv2d with weight shape \(4, 3, 3, 3\)"):
        GBLRLinear.from_linear(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="got ReLU with weight shape None"):
        GBLRLinear.from_linear(nn.ReLU())
    with pytest.raises(ValueError, match="fit_steps must be a non-negative integer, got -1"):
        GBLRLinear.from_linear(nn.Linear(8, 8), budget=0.5, fit_steps=-1)


# ------------------------------------------------------------------------------------------- sigma
@pytest.mark.parametrize("sigma", [0, 0.0, -1.0, math.nan, -math.inf])
def test_sigma_must_be_positive(sigma):
    with pytest.raises(ValueError, match=r"sigma must be > 0 \(or None/inf"):
        GBLRLinear(8, 8, sigma=sigma)
    layer = GBLRLinear(8, 8, sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        layer.set_sigma(sigma)
    assert float(layer.sigma) == 1.0  # a refused value leaves the layer unchanged
    with pytest.raises(ValueError, match="sigma must be > 0"):
        gaudi_mask(torch.zeros(2), torch.zeros(2), 8, sigma=sigma)
    with pytest.raises(ValueError, match=r"sigma0 must be > 0 or null"):
        module(sigma0=sigma)
    with pytest.raises(ValueError, match=r"sigma1 must be > 0 or null"):
        module(sigma1=sigma)


# ------------------------------------------------------------------------------------------ epochs
@pytest.mark.parametrize("epochs", [-1, -5, 1.5])
def test_phase1_epochs_must_be_a_non_negative_integer(epochs):
    with pytest.raises(ValueError, match=rf"phase1_epochs must be a non-negative integer, got {epochs}"):
        module(phase1_epochs=epochs)


def test_sigma_schedule_epochs_must_be_ordered():
    with pytest.raises(ValueError, match=r"0 <= start_epoch <= end_epoch, got -1"):
        module(sigma_start_epoch=-1)
    with pytest.raises(ValueError, match=r"start_epoch <= end_epoch, got 3, 2"):
        module(sigma_start_epoch=3, sigma_end_epoch=2)


def test_phase1_beyond_max_epochs_fails_at_fit_start(tmp_path):
    train, _ = digits_loaders(n_train=128)
    m = module(phase1_epochs=3)
    with pytest.raises(ValueError, match=r"phase1_epochs=3 is beyond trainer.max_epochs=2: the structure would never be frozen"):
        trainer(tmp_path, max_epochs=2).fit(m, train)
    assert m.phase == 1 and m.real_optimizer_steps == 0  # failed before any step


# ------------------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("what,row,bad", [("widths", 0, math.nan), ("locations", 1, math.inf), ("widths", 1, -math.inf)])
def test_non_finite_structure_names_the_gsmify_layer(what, row, bad):
    net = named_tiny()
    gsmify(net, init="random")
    layer = net.enc.fc
    with torch.no_grad():
        getattr(layer, what)[row, 3] = bad
    side = ("input", "output")[row]
    msg = rf"non-finite {what} \({side} side, components \[3\]\) in layer 'enc\.fc' \(64->32\)"
    with pytest.raises(FloatingPointError, match=msg):
        net(torch.randn(2, 64))
    net.eval()  # the cached eval path checks too
    with torch.no_grad(), pytest.raises(FloatingPointError, match=msg):
        net(torch.randn(2, 64))
    with pytest.raises(FloatingPointError, match=msg):
        layer.freeze_structure()
    assert not layer.is_frozen


def test_non_finite_structure_in_training_names_the_qualified_layer(tmp_path):
    train, _ = digits_loaders(n_train=128)
    m = module(named_tiny(), budget=0.5)
    with torch.no_grad():
        m.backbone.head.widths[0, 1] = math.nan
    with pytest.raises(FloatingPointError, match=r"non-finite widths \(input side, components \[1\]\) in layer 'head' "
                                                 r"\(32->10\)"):
        trainer(tmp_path).fit(m, train)


def test_nan_loss_raises_floating_point_error(tmp_path):
    x = torch.randn(64, 64)
    x[5, 7] = math.nan  # one corrupt sample
    train = DataLoader(TensorDataset(x, torch.randint(0, 10, (64,))), batch_size=64)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at epoch 0, batch 0"):
        trainer(tmp_path).fit(module(), train)


# --------------------------------------------------------------------------------------------- data
def test_fashion_mnist_root_that_does_not_exist(tmp_path):
    root = tmp_path / "nope"
    dm = FashionMNISTDataModule(root=str(root))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST root '.*nope' does not exist") as err:
            step()
        assert str(root) in str(err.value)


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(head + array.astype(np.uint8).tobytes()))


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_fashion_mnist_file_is_named(tmp_path, damage):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx_gz(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx_gz(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    FashionMNISTDataModule(root=str(tmp_path), val_size=2).setup()  # the intact set loads
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else blob[:10] + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"corrupt or truncated idx file .*t10k-images-idx3-ubyte\.gz"):
        FashionMNISTDataModule(root=str(tmp_path), val_size=2).setup()


# ---------------------------------------------------------------------------------------------- CLI
def test_unknown_yaml_key_names_the_key(tmp_path, capsys):
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    assert "  conversion:" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  conversion:", "  convresion:"))
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "convresion" in capsys.readouterr().err


# --------------------------------------------------------------------------------- wrong structure
def _frozen_tiny(hidden: int = 96) -> nn.Module:
    net = tiny(hidden)
    gsmify(net, init="random", width_init=0.5)
    for layer in net.modules():
        if isinstance(layer, GBLRLinear):
            layer.freeze_structure()
    return net


def test_compact_export_into_wrong_architecture(tmp_path):
    path = tmp_path / "net.pt"
    save_compact(_frozen_tiny(), path)
    assert isinstance(load_compact(path, tiny)[0], GBLRLinear)  # the right architecture loads
    with pytest.raises(ValueError, match=r"stored GBLR layer '0' is 64->96 but Sequential\.0 is 64->80: wrong architecture"):
        load_compact(path, lambda: tiny(80))
    with pytest.raises(ValueError, match="stored GBLR layer '0' does not exist in Sequential"):
        load_compact(path, named_tiny)


def test_lightning_checkpoint_of_another_structure(tmp_path):
    train, _ = digits_loaders(n_train=128)
    m = module(budget=0.5)
    t = trainer(tmp_path)
    t.fit(m, train)
    ckpt = tmp_path / "gsm.ckpt"
    t.save_checkpoint(ckpt)
    loaded = GSMModule.load_from_checkpoint(ckpt, backbone=tiny())  # the same structure loads
    assert {n: s.structure() for n, s in loaded.gblr_layers} == {n: s.structure() for n, s in m.gblr_layers}
    with pytest.raises(ValueError, match=r"checkpoint layer '0' has in/out/rank \(64, 96, 1\), model has \(64, 80, 1\)"):
        GSMModule.load_from_checkpoint(ckpt, backbone=tiny(80))
    with pytest.raises(ValueError, match=r"does not match this model's GBLR layers: in checkpoint only: \['0', '2'\]; "
                                         r"in model only: \['enc.fc', 'head'\]"):
        GSMModule.load_from_checkpoint(ckpt, backbone=named_tiny())


def test_gblr_state_dict_of_another_shape():
    with pytest.raises(RuntimeError, match=r"GBLR layer 'GBLRLinear' has rank_per_component/in/out = \(1, 8, 16\), but the layer is "
                                           r"\(1, 8, 12\)"):
        GBLRLinear(8, 12).load_state_dict(GBLRLinear(8, 16).state_dict())


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("shape", [(3, 9), (2, 5, 7), (7,), (), (8, 0)])
def test_gblr_input_with_wrong_last_dim(shape):
    layer = GBLRLinear(8, 16)
    with pytest.raises(ValueError, match=rf"expected input with last dimension 8, got shape {re.escape(str(shape))}"):
        layer(torch.randn(shape))


# ------------------------------------------------------------------------------------ method / task
def test_unknown_method_and_task():
    with pytest.raises(ValueError, match=r"unknown method 'sparse'; expected gblr, dense, lowrank, monarch or blocksparse"):
        module(method="sparse")
    with pytest.raises(ValueError, match=r"unknown task 'segmentation'; expected 'classification', 'lm', 'regression' or 'embedding'"):
        module(task="segmentation")
    with pytest.raises(ValueError, match=r"unknown shrink 'lasso'; expected 'budget'"):
        module(shrink="lasso")
    with pytest.raises(ValueError, match=r"path_fraction must be a fraction of phase 1 in \[0, 1\], got 1.5"):
        module(path_fraction=1.5)
    with pytest.raises(ValueError, match=r"unknown width_step 'sgd'"):
        module(width_step="sgd")
    with pytest.raises(ValueError, match=r"unknown cut_weighting 'norm'"):
        module(cut_weighting="norm")
    with pytest.raises(ValueError, match=r"classification needs num_classes >= 2, got None"):
        module(num_classes=None)


# ============================================ issue 12: nothing damages a model silently, the CLI has no traps
# ------------------------------------------------------------------------------------------- gsmify
def test_pretrained_thin_layer_that_would_be_zeroed_is_kept_dense_with_a_warning():
    # at budget 0.2 the 8->1 head may spend 1.6 multiply-adds, and its cheapest component (1 x 1) costs 2: any fit
    # leaves it empty (at 0.3 a 1 x 1 component fits, and whether the fit keeps it is up to float rounding)
    net = nn.Sequential(nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 1))
    head = net[2]
    with pytest.warns(UserWarning, match=r"layer '2' \(8->1\) cannot be fitted at budget 0\.2 .*kept dense.*exclude"):
        report = gsmify(net, budget=0.2, init="pretrained", fit_steps=20)
    assert net[2] is head and isinstance(net[0], GBLRLinear)  # the head is untouched, the wide layer converted
    assert report.names == ["0"] and report.flops_ratio > 0
    x = torch.randn(4, 64)
    assert net(x).abs().sum() > 0


def test_linear_tied_to_an_embedding_stays_tied():
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

    lm = TinyLM()
    with pytest.warns(UserWarning, match=r"layer 'head' \(16->50\) shares its weight with emb\.weight; .*kept dense"):
        report = gsmify(lm, init="random")
    assert report.names == ["fc"] and isinstance(lm.fc, GBLRLinear)
    assert isinstance(lm.head, nn.Linear) and lm.head.weight is lm.emb.weight


def test_include_empty_list_is_an_error():
    with pytest.raises(ValueError, match=r"include=\[\] selects no layer; pass include=None .*method='dense'"):
        gsmify(tiny(), include=[])
    with pytest.raises(ValueError, match=r"include=\[\] selects no layer"):
        module(include=[])


def test_fp16_linear_with_pretrained_init_is_fitted_in_float32():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 32))
    half = nn.Sequential(nn.Linear(64, 32)).half()
    half.load_state_dict({k: v.half() for k, v in ref.state_dict().items()})
    r32 = gsmify(ref, budget=0.3, init="pretrained", fit_steps=30)
    torch.manual_seed(0)
    r16 = gsmify(half, budget=0.3, init="pretrained", fit_steps=30)  # used to fail with "non-finite widths"
    layer = half[0]
    assert layer.weight_in.dtype == torch.float16 and layer.widths.dtype == torch.float32
    assert math.isfinite(r16.layers[0].fit_error) and r16.layers[0].fit_error < 0.9
    assert r16.layers[0].fit_error == pytest.approx(r32.layers[0].fit_error, abs=0.05)
    assert 0 < r16.flops_ratio <= 0.3


def test_report_str_shows_the_fit_error_of_each_layer():
    net = tiny()
    report = gsmify(net, budget=0.5, init="pretrained", fit_steps=10)
    text = str(report)
    for layer in report.layers:
        assert re.search(rf"^  {layer.name} .* fit error {layer.fit_error:.4f}$", text, re.M), text
    assert "fit error" not in str(gsmify(tiny(), init="random"))  # random init has no fit


# ---------------------------------------------------------------------------------- GBLRLinear
@pytest.mark.parametrize("args", [(10.5, 10), (10, 7.25), (True, 4), ("8", 8)])
def test_gblr_sizes_must_be_integers(args):
    with pytest.raises(ValueError, match=r"_features must be an integer, got .*never rounded"):
        GBLRLinear(*args)
    with pytest.raises(ValueError, match=r"rank_per_component must be an integer, got 1\.5"):
        GBLRLinear(8, 8, rank_per_component=1.5)
    assert GBLRLinear(np.int64(8), 8.0).in_features == 8  # integral values of other types are fine


def test_flops_of_nan_widths_raises_instead_of_counting_zero():
    layer = GBLRLinear(8, 8)
    assert layer.flops() > 0
    with torch.no_grad():
        layer.widths[:] = math.nan
    with pytest.raises(FloatingPointError, match=r"non-finite widths .* in layer 'GBLRLinear' \(8->8\)"):
        layer.flops()


# ------------------------------------------------------------------------------------ GSMModule
def test_phase1_equal_to_max_epochs_warns_at_fit_start(tmp_path):
    train, _ = digits_loaders(n_train=128)
    m = module(phase1_epochs=2)
    with pytest.warns(UserWarning, match=r"phase1_epochs=2 equals trainer\.max_epochs=2: .* never reaches.*"
                                         r"Raise max_epochs above phase1_epochs, or call module\.freeze_structure\(\)"):
        trainer(tmp_path, max_epochs=2, limit_train_batches=1).fit(m, train)
    assert m.phase == 1  # what the warning says
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=3, limit_train_batches=1).fit(module(phase1_epochs=2), train)
    assert not [w for w in caught if "equals trainer.max_epochs" in str(w.message)]


def test_collapse_guard_names_the_layer_that_fell_to_zero_flops(tmp_path):
    """A layer whose components all reach width 0 in phase 1 is named once, with the rule's settings. The collapse
    is forced (the head's input widths zeroed after every step) so that the test does not hang on training dynamics."""

    class CollapseHead(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.phase == 1:
                with torch.no_grad():
                    pl_module.backbone.head.widths[0].zero_()

    train, _ = digits_loaders(n_train=256)
    m = module(named_tiny(), budget=0.4, shrink="paper", structure_lr=0.05, phase1_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=3, limit_train_batches=4, callbacks=[CollapseHead()]).fit(m, train)
    msgs = [str(w.message) for w in caught if "fell to 0 FLOPs" in str(w.message)]
    assert m.backbone.head.flops() == 0 and m.backbone.enc.fc.flops() > 0
    assert len(msgs) == 1, msgs  # reported once, not every epoch
    assert re.search(r"epoch 0: GBLR layer\(s\) 'head' fell to 0 FLOPs .*Likely cause: structure_lr=0\.05 with "
                     r"prox_lambda=0\.02 is too high.*Lower structure_lr", msgs[0]), msgs[0]
    assert "'enc.fc'" not in msgs[0]


def test_non_finite_loss_from_a_high_weight_lr_names_both_rates(tmp_path):
    train, _ = digits_loaders(n_train=256)
    m = module(optimizer=adamw(lr=1e5))
    with pytest.raises(FloatingPointError) as err:
        trainer(tmp_path, max_epochs=2, limit_train_batches=4).fit(m, train)
    msg = str(err.value)
    assert re.search(r"learning rates now: weights [\d.e+]+, structure [\d.e-]+; .*lower the weight learning rate", msg), msg
    assert "lower structure_lr" not in msg


def test_structure_blown_up_by_the_weight_lr_blames_the_weight_lr(tmp_path):
    train, _ = digits_loaders(n_train=256)
    # The paper's small factor init: the widths blow up before the outputs overflow (with the default LeCun
    # scale the outputs overflow first: test_outputs_overflowed_by_the_weight_lr_blames_the_weight_lr).
    m = module(optimizer=lambda groups: torch.optim.SGD(groups, lr=1e4), layer_kwargs={"init_std": 0.02})
    with pytest.raises(FloatingPointError) as err:
        trainer(tmp_path, max_epochs=2, limit_train_batches=4).fit(m, train)
    msg = str(err.value)
    assert re.search(r"non-finite widths .* in layer '0'.*learning rates now: weights [\d.e+]+, structure [\d.e-]+; "
                     r"the weights have grown .* lower the weight learning rate", msg), msg


def test_outputs_overflowed_by_the_weight_lr_blames_the_weight_lr(tmp_path):
    train, _ = digits_loaders(n_train=256)
    m = module(optimizer=lambda groups: torch.optim.SGD(groups, lr=1e4))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* learning rates now: weights [\d.e+]+, "
                                                 r"structure [\d.e-]+; every parameter and input is finite, so the "
                                                 r"outputs overflowed: lower the weight learning rate"):
        trainer(tmp_path, max_epochs=2, limit_train_batches=4).fit(m, train)


def test_nan_input_is_blamed_on_the_data(tmp_path):
    x = torch.randn(64, 64)
    x[5, 7] = math.nan
    train = DataLoader(TensorDataset(x, torch.randint(0, 10, (64,))), batch_size=64)
    with pytest.raises(FloatingPointError, match=r"learning rates now: weights 0\.003, structure 0\.0025; "
                                                 r"the input batch holds NaN/inf: check the data"):
        trainer(tmp_path).fit(module(optimizer=lambda g: torch.optim.AdamW(g, lr=3e-3)), train)


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_num_classes_smaller_than_the_labels(tmp_path, stage):
    train, val = digits_loaders(n_train=128)  # labels 0..9
    m = module(nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)), num_classes=8)
    with pytest.raises(ValueError, match=r"the data has label 9 but num_classes=8 \(labels must be in \[0, 7\]\): set "
                                         r"num_classes \(model\.num_classes\) .* at least 10"):
        if stage == "fit":
            trainer(tmp_path).fit(m, train)
        else:
            trainer(tmp_path, limit_val_batches=1).validate(m, val, verbose=False)


# -------------------------------------------------------------------------------------- export
def test_load_compact_of_a_truncated_or_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "net.pt"
    save_compact(_frozen_tiny(), path)
    blob = path.read_bytes()
    for name, data in (("short.pt", blob[: len(blob) - 100]), ("head.pt", blob[:50]), ("empty.pt", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=rf"cannot read compact file '.*{name}': the file is corrupt or truncated") as e:
            load_compact(bad, tiny)
        assert "weights_only" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def _unwritable_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, Path("/sys")):
        try:
            (d / "gsm_probe.pt").open("wb").close()
        except OSError:
            return d
    pytest.skip("no unwritable directory here (running as root without a read-only /sys)")


def test_save_compact_into_an_unwritable_directory_names_the_path(tmp_path):
    d = _unwritable_dir(tmp_path)
    target = d / "net.pt"
    with pytest.raises(OSError, match=rf"save_compact cannot write '{re.escape(str(target))}': .*writable location"):
        save_compact(_frozen_tiny(), target)
    missing = tmp_path / "no" / "such" / "dir" / "net.pt"
    with pytest.raises(FileNotFoundError, match=rf"save_compact cannot write '{re.escape(str(missing))}': No such file"):
        save_compact(_frozen_tiny(), missing)


# ------------------------------------------------------------------------------------------- CLI
CLI_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  default_root_dir: "{root}"
  max_epochs: 2
  limit_train_batches: 1
  limit_val_batches: 1
  num_sanity_val_steps: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{ckpt_dir}", save_last: true}}
model:
  backbone:
    class_path: gsm_lightning.models.ViT
    init_args: {{image_size: 8, patch_size: 4, in_chans: 1, num_classes: 10, dim: 16, depth: 1, heads: 2}}
  num_classes: 10
  budget: 0.5
  phase1_epochs: 1  # one step: the learner reaches the budget (path_fraction * 1 step rounds to 0), no projection
data:
  class_path: gsm_lightning.data.DigitsDataModule
  init_args: {{batch_size: 32}}
"""


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(CLI_CONFIG.format(ckpt_dir=tmp / "ckpt", root=tmp))  # config.yaml dumps land in tmp, not the cwd
    build_cli(["fit", "--config", str(cfg)])
    return cfg, tmp / "ckpt" / "last.ckpt"


def test_ckpt_path_with_a_conflicting_model_flag_is_an_error(cli_checkpoint, capsys):
    cfg, ckpt = cli_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["validate", "--config", str(cfg), f"--ckpt_path={ckpt}", "--model.budget=0.2",
                   "--model.conversion.include=[blocks.0.mlp.fc1]", "--model.label_smoothing=0.1"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert re.search(r"--ckpt_path .*last\.ckpt restores the model hyperparameters it was trained with, which would "
                     r"override --model\.budget 0\.2 \(checkpoint: 0\.5\), --model\.conversion\.include \['blocks\.0\.mlp\.fc1'\] "
                     r"\(checkpoint: None\)\. Drop these flags", err), err
    assert "label_smoothing" not in err  # same value as the checkpoint: no conflict
    # a flag with the checkpoint's value runs
    build_cli(["validate", "--config", str(cfg), f"--ckpt_path={ckpt}", "--model.budget", "0.5"])


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_checkpoint_is_named_without_weights_only_advice(cli_checkpoint, tmp_path, damage):
    cfg, ckpt = cli_checkpoint
    blob = ckpt.read_bytes()
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(blob[: len(blob) - 200])
    else:  # a valid archive whose pickle names a foreign global: torch's message suggests weights_only=False
        import os
        import pickle
        import zipfile

        with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(bad, "w") as dst:
            for info in src.infolist():
                dst.writestr(info, pickle.dumps(os.getcwd) if info.filename.endswith("data.pkl") else src.read(info))
        with pytest.raises(Exception, match="weights_only"):  # the unsafe advice this test keeps out of the error
            torch.load(bad, weights_only=True)
    with pytest.raises(ValueError, match=r"cannot read checkpoint '.*bad\.ckpt': the file is corrupt or truncated") as e:
        build_cli(["validate", "--config", str(cfg), f"--ckpt_path={bad}"])
    assert "weights_only" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_cli_predict_returns_logits_of_the_test_split(cli_checkpoint):
    cfg, ckpt = cli_checkpoint
    cli = build_cli(["predict", "--config", str(cfg), f"--ckpt_path={ckpt}", "--trainer.limit_predict_batches=2"],
                    run=True)
    preds = cli.trainer.predict_loop.predictions
    assert len(preds) == 2 and preds[0].shape == (32, 10) and torch.isfinite(preds[0]).all()
