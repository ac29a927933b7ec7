"""Structure files (gsm_lightning.io.structure_io) and the real-structure fixtures in benchmarks/data/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.infer.inference import CompactGBLR
from gsm_lightning.io.structure_io import (
    apply_structure,
    compact_layer,
    frozen_layer,
    load_structure,
    save_structure,
    set_structure,
    structure_record,
)
from gsm_lightning.models import ViT

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
FIXTURES = sorted(DATA.glob("structures_*.json"))


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    a = GBLRLinear(16, 24, num_components=6, width_init=0.4, location_init="random").freeze_structure()
    b = GBLRLinear(24, 8, bias=False, num_components=5, width_init=0.6, location_init="random").freeze_structure()
    return nn.Sequential(a, nn.ReLU(), b, nn.Linear(8, 2))


def test_round_trip(tmp_path):
    model = small_model()
    path = tmp_path / "s.json"
    rec = save_structure(model, path, name="small", budget=0.5)
    loaded = load_structure(path)
    assert loaded == json.loads(json.dumps(rec))
    assert set(loaded["layers"]) == {"0", "2"} and loaded["name"] == "small"
    assert loaded["layers"]["2"]["bias"] is False
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        rebuilt = frozen_layer(loaded["layers"][name])
        assert rebuilt.is_frozen
        assert torch.equal(rebuilt.int_widths(), layer.int_widths())
        assert torch.equal(rebuilt.int_locations(), layer.int_locations())
        assert (rebuilt.bias is None) == (layer.bias is None)
    flops = sum(model.get_submodule(n).flops() for n in ("0", "2"))
    assert loaded["flops"] == flops and loaded["flops_ratio"] == pytest.approx(flops / (16 * 24 + 24 * 8))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        structure_record(nn.Sequential(GBLRLinear(8, 8)))
    bad = structure_record(small_model())
    bad["layers"]["0"]["widths"][0][0] = 99
    with pytest.raises(ValueError, match="widths outside"):
        save_structure(bad, tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x", "layers": {}}))
    with pytest.raises(ValueError, match="not a gsm_lightning structure file"):
        load_structure(tmp_path / "other.json")
    rec = structure_record(small_model())
    with pytest.raises(ValueError, match="does not exist"):
        apply_structure(nn.Sequential(nn.Linear(16, 24)), rec)
    with pytest.raises(ValueError, match="is 24->8"):
        apply_structure(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 9)), rec)


def test_apply_structure_keeps_bias_and_rest():
    rec = structure_record(small_model())
    target = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False), nn.Linear(8, 2))
    bias = target[0].bias.detach().clone()
    head = target[3].weight.detach().clone()
    apply_structure(target, rec)
    assert isinstance(target[0], GBLRLinear) and target[0].is_frozen and isinstance(target[3], nn.Linear)
    assert torch.equal(target[0].bias, bias) and torch.equal(target[3].weight, head)
    assert target(torch.randn(3, 16)).shape == (3, 2)


@pytest.mark.skipif(not FIXTURES, reason="no fixtures in benchmarks/data")
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixtures_load_and_compact_exactly(path):
    s = load_structure(path)
    assert s["layers"] and "command" in s and s["command"].startswith("python benchmarks/save_structures.py")
    assert 0 < s["flops_ratio"] <= 1
    for i, rec in enumerate(list(s["layers"].values())[:3]):  # a few layers per file keep the test fast
        layer = frozen_layer(rec, seed=i, dtype=torch.float64)
        x = torch.randn(5, rec["in_features"], dtype=torch.float64)
        ref = nn.functional.linear(x, layer.to_dense(), layer.bias)
        for path_kind in ("tiles", "blocks"):
            c = CompactGBLR.from_gblr(layer, path=path_kind)
            torch.testing.assert_close(c(x), ref, rtol=1e-10, atol=1e-10)
        assert isinstance(compact_layer(rec, tokens=8), CompactGBLR)


def test_fmnist_fixture_fits_its_backbone():
    path = DATA / "structures_fmnist_vit_b0.3_s0.json"
    if not path.exists():
        pytest.skip("fixture missing")
    vit = ViT(image_size=28, patch_size=4, in_chans=1, num_classes=10, dim=96, depth=4, heads=4, mlp_ratio=2.0, pool="mean")
    apply_structure(vit, load_structure(path))
    assert sum(isinstance(m, GBLRLinear) for m in vit.modules()) == 20
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_set_structure_trains_a_stored_structure_from_the_layer_s_own_factors():
    stored = structure_record(small_model())
    torch.manual_seed(1)
    fresh = nn.Sequential(GBLRLinear(16, 24, num_components=8), nn.ReLU(), GBLRLinear(24, 8, bias=False), nn.Linear(8, 2))
    factors = fresh[0].weight_in.detach().clone()
    set_structure(fresh, stored)
    assert torch.equal(fresh[0].weight_in, factors)  # only the structure is written
    assert (fresh[0].widths[:, 6:] == 0).all()  # components beyond the stored ones get width 0
    for i in (0, 2):
        fresh[i].freeze_structure()
    assert structure_record(fresh)["layers"] == stored["layers"]


def test_set_structure_errors():
    stored = structure_record(small_model())
    too_few = nn.Sequential(GBLRLinear(16, 24, num_components=2), nn.ReLU(), GBLRLinear(24, 8, bias=False))
    with pytest.raises(ValueError, match="6 components but the model's has only 2; raise num_components"):
        set_structure(too_few, stored)
    frozen = small_model()
    with pytest.raises(ValueError, match="must be a trainable GBLRLinear"):
        set_structure(frozen, stored)
    wrong = nn.Sequential(GBLRLinear(16, 20), nn.ReLU(), GBLRLinear(24, 8, bias=False))
    with pytest.raises(ValueError, match="is 16->24 rank 1 but the model's is 16->20 rank 1"):
        set_structure(wrong, stored)
    with pytest.raises(ValueError, match="does not exist"):
        set_structure(nn.Sequential(GBLRLinear(16, 24)), stored)
