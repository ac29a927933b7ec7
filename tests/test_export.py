"""merge_to_dense, compact save/load, torch.export and ONNX export of frozen GBLR models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.infer.inference import CompactGBLR, optimize_inference
from gsm_lightning.io.export import compact_state, export_onnx, export_program, load_compact, merge_to_dense, save_compact


class Net(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


def gblr_net(seed: int = 0) -> Net:
    """A Net whose fc1/fc2 are frozen GBLR layers with random structures."""
    torch.manual_seed(seed)
    net = Net()
    for name in ("fc1", "fc2"):
        lin = getattr(net, name)
        layer = GBLRLinear(lin.in_features, lin.out_features, num_components=12)
        with torch.no_grad():
            layer.widths.uniform_(0.05, 0.8)
            layer.locations.uniform_(0, 1)
        setattr(net, name, layer.freeze_structure())
    return net.eval()


def test_merge_to_dense():
    net = gblr_net()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = net(x)
        merge_to_dense(net)
        assert not any(isinstance(m, (GBLRLinear, CompactGBLR)) for m in net.modules())
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)
    net2 = gblr_net()
    optimize_inference(net2, mode="compact")
    with torch.no_grad():
        merge_to_dense(net2)
        torch.testing.assert_close(net2(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimized", [False, True, "padded"])
def test_save_load_compact_round_trip(tmp_path, optimized):
    net = gblr_net(1)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        ref = net(x)
    if optimized == "padded":  # block ranks zero-padded to 8: the padding is not stored
        optimize_inference(net, mode="compact", path="blocks", rank_multiple=8)
        assert net.fc1.rank_multiple == 8
    elif optimized:
        optimize_inference(net, mode="compact")
    path = tmp_path / "model.pt"
    assert save_compact(net, path) > 0
    state = compact_state(net)
    for name in ("fc1", "fc2"):  # only the values inside the windows are stored
        rec = state["layers"][name]
        assert rec["weight_in"].numel() + rec["weight_out"].numel() == getattr(gblr_net(1), name).flops()
    assert set(state["state_dict"]) == {"norm.weight", "norm.bias", "head.weight"}
    loaded = load_compact(path, Net)  # fresh backbone from a factory
    assert isinstance(loaded.fc1, GBLRLinear) and loaded.fc1.is_frozen
    assert torch.equal(loaded.fc1.int_widths(), gblr_net(1).fc1.int_widths())
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_load_compact_wrong_architecture(tmp_path):
    path = tmp_path / "model.pt"
    save_compact(gblr_net(), path)
    with pytest.raises(ValueError, match=r"'fc1' is 16->32 but Net.fc1 is 16->64"):
        load_compact(path, lambda: Net(hidden=64))

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(16, 32)

    with pytest.raises(ValueError, match="'fc2' does not exist in Other"):
        load_compact(path, Other)

    class Extra(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"missing keys \['extra.weight', 'extra.bias'\]"):
        load_compact(path, Extra)

    class NotLinear(Net):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Conv1d(32, 16, 1)

    with pytest.raises(ValueError, match="Conv1d"):
        load_compact(path, NotLinear)
    with pytest.raises(ValueError, match="not a gsm_lightning compact file"):
        torch.save({"a": 1}, tmp_path / "other.pt")
        load_compact(tmp_path / "other.pt", Net)


def test_save_compact_errors(tmp_path):
    net = Net()
    with pytest.raises(ValueError, match="no GBLR layer"):
        save_compact(net, tmp_path / "x.pt")
    net.fc1 = GBLRLinear(16, 32)
    with pytest.raises(ValueError, match="not frozen: fc1"):
        save_compact(net, tmp_path / "x.pt")


@pytest.mark.parametrize("mode", ["compact", "dense", "auto"])
def test_export_program(tmp_path, mode):
    net = gblr_net(2)
    x = torch.randn(4, 16)
    ep = export_program(net, (x,), mode=mode, path=tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    x2 = torch.randn(9, 16)  # another batch size: dynamic leading dim
    with torch.no_grad():
        ref = net(x2)
        torch.testing.assert_close(ep.module()(x2), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.module()(x2), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(net.fc1, GBLRLinear)  # the original model is untouched


@pytest.mark.parametrize("mode", ["compact", "dense"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, mode):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net = gblr_net(3)
    x = torch.randn(2, 5, 16)
    path = tmp_path / "m.onnx"
    report = export_onnx(net, (x,), path, mode=mode, input_names=["x"], output_names=["y"])
    assert {c.choice for c in report.layers} == {mode}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 6, 16)
    (y,) = sess.run(None, {"x": x2.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), net(x2), rtol=1e-4, atol=1e-5)


def test_export_rejects_unfrozen():
    net = Net()
    net.fc1 = GBLRLinear(16, 32)
    with pytest.raises(ValueError, match="not frozen: fc1"):
        export_program(net, (torch.randn(2, 16),))
