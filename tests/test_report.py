"""``python -m gsm_lightning.report``: a real checkpoint of each phase in, readable files out; bad files refused."""

from __future__ import annotations

import base64
import copy
import csv
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn

from gsm_lightning.core.layer import gblr_layers
from gsm_lightning.report import load_checkpoint, main, model_from_checkpoint
from gsm_lightning.report.structure import structure_table
from gsm_lightning.training.module import GSMModule

from .helpers import digits_loaders

MODEL_FIGURES = {"overview", "width_histograms", "flops_by_type", "flops_by_depth", "footprint_grid"}
LAYERS = ["backbone.0", "backbone.2"]


class KeepPhase1(Callback):
    """A copy of the backbone at the end of epoch 0: the state the epoch-0 checkpoint holds (phase 1)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.backbone = copy.deepcopy(pl_module.backbone)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch digits fit: epoch 0 learns the structure (phase 1), epoch 1 has it frozen (phase 2)."""
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    module = GSMModule(
        nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.GELU(), nn.Linear(32, 10)),
        num_classes=10, budget=0.5, include=["0", "2"], phase1_epochs=1,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
    )
    keep = KeepPhase1()
    ckpt = ModelCheckpoint(dirpath=str(tmp / "ckpt"), filename="{epoch}", save_top_k=-1)
    train, val = digits_loaders(n_train=256)
    trainer = Trainer(max_epochs=2, logger=False, callbacks=[keep, ckpt], accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp))
    trainer.fit(module, train, val)
    return tmp, module, keep.backbone, str(tmp / "ckpt" / "epoch=0.ckpt"), str(tmp / "ckpt" / "epoch=1.ckpt")


def read_pngs(out) -> dict[str, np.ndarray]:
    """Every PNG the report wrote, decoded (grayscale), by figure name; checks size and that it is not blank."""
    found = {}
    for folder, prefix in ((out, ""), (out / "layers", "layer:")):
        for name in sorted(os.listdir(folder)) if folder.exists() else []:
            if name.endswith(".png"):
                with Image.open(folder / name) as img:
                    pixels = np.asarray(img.convert("L"), dtype=np.float64)
                assert pixels.shape[1] >= 600 and pixels.shape[0] >= 400, name
                assert pixels.std() > 5 and (pixels < 100).mean() > 0.002, name  # ink on a white page
                found[prefix + name[:-4]] = pixels
    return found


def check_html(out, pngs) -> str:
    """report.html is one self-contained page: every PNG embedded (byte for byte), nothing linked."""
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    files = [(out / n).read_bytes() for n in os.listdir(out) if n.endswith(".png")]
    files += [(out / "layers" / n).read_bytes() for n in os.listdir(out / "layers")] if (out / "layers").exists() else []
    assert len(embedded) == len(files) == len(pngs)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files)
    assert len(re.findall(r'(?:src|href)="', text)) == len(embedded)  # no other link or resource
    return text


def test_report_of_a_phase2_checkpoint_matches_the_trained_model(run, tmp_path, capsys):
    _, module, _, _, ckpt = run
    out = tmp_path / "out"
    assert main([ckpt, "--out", str(out), "--layer-figures"]) == 0
    printed = capsys.readouterr().out
    assert "backbone.0" in printed and "report.html" in printed
    data = json.loads((out / "structure.json").read_text())
    # the same rows StructureReport writes for the live module (names, FLOPs, widths, params...)
    assert data["layers"] == json.loads(json.dumps(structure_table(module)))
    assert data["phase"] == 2 and data["target_flops_ratio"] == 0.5
    assert data["scalars"]["flops_ratio"] == pytest.approx(module.flops_ratio())
    assert data["scalars"]["phase1_end_ratio"] == pytest.approx(module.phase1_end_ratio)
    assert "sigma" not in data["scalars"]  # nothing is learning any more
    assert data["checkpoint"]["epoch"] == 1 and data["checkpoint"]["frozen_layers"] == 2
    with open(out / "structure.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [*LAYERS, "TOTAL_GBLR", "TOTAL_MODEL_PER_TOKEN"]
    assert int(rows[-2]["flops"]) == sum(m.flops() for _, m in gblr_layers(module))
    pngs = read_pngs(out)
    assert set(pngs) == MODEL_FIGURES | {f"layer:{n}__{k}" for n in LAYERS for k in ("weights", "windows")}
    text = check_html(out, pngs)
    assert all(n in text for n in LAYERS) and "phase</th><td>2" in text
    # the rebuilt layers compute what the trained ones compute
    rebuilt, _ = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.backbone._modules["0"](x), module.backbone[0](x))


def test_report_of_a_phase1_checkpoint(run, tmp_path):
    _, _, phase1_backbone, ckpt, _ = run
    stored = torch.load(ckpt, weights_only=True)["gsm_structure"]
    assert not any(s["frozen"] for s in stored.values())  # really a phase-1 checkpoint
    out = tmp_path / "out"
    assert main([ckpt, "--out", str(out), "--quiet", "--layer-figures"]) == 0
    data = json.loads((out / "structure.json").read_text())
    assert data["phase"] == 1 and data["checkpoint"]["frozen_layers"] == 0
    for row, (short, s) in zip(data["layers"], stored.items()):
        assert row["name"] == f"backbone.{short}"
        w_in, w_out = s["widths"]
        active = [i for i in range(s["num_components"]) if w_in[i] > 0 and w_out[i] > 0]
        assert row["flops"] == sum(w_in[i] + w_out[i] for i in active)  # rank 1 per component
        assert row["active"] == len(active) and row["components"] == s["num_components"]
    assert data["scalars"]["sigma"] == pytest.approx(float(phase1_backbone[0].sigma))  # still learning
    pngs = read_pngs(out)
    assert len(pngs) == len(MODEL_FIGURES) + 2 * len(LAYERS)
    check_html(out, pngs)
    rebuilt, _ = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    with torch.no_grad():  # soft Gaudi masks with the checkpoint's sigma, as during training
        for name, trained in (("0", phase1_backbone[0]), ("2", phase1_backbone[2])):
            layer = rebuilt.backbone._modules[name]
            assert not layer.is_frozen and float(layer.sigma) == float(trained.sigma)
            x = torch.randn(5, layer.in_features)
            torch.testing.assert_close(layer(x), trained(x))


def test_bare_state_dict_without_figures(run, tmp_path):
    _, module, _, _, _ = run
    path = tmp_path / "weights.pt"
    torch.save(module.backbone.state_dict(), path)  # no Lightning wrapper, no gsm_structure
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--quiet", "--no-layer-figures"]) == 0
    data = json.loads((out / "structure.json").read_text())
    assert [r["name"] for r in data["layers"]] == ["0", "2"]
    assert [r["flops"] for r in data["layers"]] == [m.flops() for _, m in gblr_layers(module)]
    assert data["phase"] == 2 and "target_flops_ratio" not in data  # no budget stored
    pngs = read_pngs(out)
    assert set(pngs) == MODEL_FIGURES and not (out / "layers").exists()
    check_html(out, pngs)


def test_default_report_draws_the_model_figures_and_layer_figures_on_request(run, tmp_path, capsys):
    """By default only the model figures (the per-layer ones are most of the time of a deep model's report);
    ``--layer-figures-match REGEX`` draws them for the matching layers; ``--no-figures`` none at all."""
    _, module, _, _, ckpt = run
    out = tmp_path / "default"
    assert main([ckpt, "--out", str(out), "--quiet"]) == 0
    pngs = read_pngs(out)
    assert set(pngs) == MODEL_FIGURES and not (out / "layers").exists()
    text = check_html(out, pngs)
    assert "--layer-figures" in text  # the page says how to get the per-layer figures
    data = json.loads((out / "structure.json").read_text())
    assert data["layers"] == json.loads(json.dumps(structure_table(module)))  # the numbers do not depend on it

    some = tmp_path / "some"
    assert main([ckpt, "--out", str(some), "--quiet", "--layer-figures-match", r"\.2$"]) == 0
    pngs = read_pngs(some)
    assert set(pngs) == MODEL_FIGURES | {"layer:backbone.2__weights", "layer:backbone.2__windows"}
    text = check_html(some, pngs)
    assert "Layers, one by one" in text and "--layer-figures" not in text
    assert json.loads((some / "structure.json").read_text()) == data

    capsys.readouterr()
    none = tmp_path / "none"
    assert main([ckpt, "--out", str(none), "--quiet", "--layer-figures-match", "no_such_layer"]) == 0
    assert "no GBLR layer name matches" in capsys.readouterr().err
    assert set(read_pngs(none)) == MODEL_FIGURES

    bare = tmp_path / "bare"
    assert main([ckpt, "--out", str(bare), "--quiet", "--no-figures"]) == 0
    assert read_pngs(bare) == {} and "<img" not in (bare / "report.html").read_text()
    assert json.loads((bare / "structure.json").read_text()) == data

    for argv in (["--layer-figures-match", "("], ["--layer-figures", "--no-layer-figures"],
                 ["--layer-figures", "--layer-figures-match", "q"]):
        with pytest.raises(SystemExit) as err:
            main([ckpt, "--out", str(tmp_path / "bad"), *argv])
        assert err.value.code == 2  # a usage error, before anything is read or written
    assert not (tmp_path / "bad").exists()


def expect_exit(argv, match: str) -> None:
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = err.value.code
    assert isinstance(message, str) and message.startswith("gsm_lightning.report: error:")  # exit status 1
    assert re.search(match, message), message


def test_files_that_are_not_gsm_checkpoints_fail_clearly(run, tmp_path):
    _, _, _, _, ckpt = run
    out = str(tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    expect_exit([str(text), "--out", out], "not a readable PyTorch checkpoint")
    expect_exit([str(tmp_path / "missing.ckpt"), "--out", out], "no such file")
    expect_exit([str(tmp_path), "--out", out], "is a directory")
    truncated = tmp_path / "truncated.ckpt"
    data = open(ckpt, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    expect_exit([str(truncated), "--out", out], "not a readable PyTorch checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)}, "epoch": 0}, plain)
    expect_exit([str(plain), "--out", out], r"not a GSM checkpoint: no GBLR layer .*2 tensors")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    expect_exit([str(listed), "--out", out], "not a GSM checkpoint .*list")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "optimizer": functools.partial(print)}, pickled)
    expect_exit([str(pickled), "--out", out], r"functools\.partial.*--unsafe-load")
    ck = torch.load(ckpt, weights_only=True)
    ck["gsm_structure"]["0"]["num_components"] += 1
    torch.save(ck, tmp_path / "mismatch.ckpt")
    expect_exit([str(tmp_path / "mismatch.ckpt"), "--out", out], "corrupt GSM checkpoint: layer 'backbone.0'")
    ck = torch.load(ckpt, weights_only=True)
    ck["state_dict"]["backbone.2.widths"] = ck["state_dict"]["backbone.2.widths"][:, :3]
    torch.save(ck, tmp_path / "cut.ckpt")
    expect_exit([str(tmp_path / "cut.ckpt"), "--out", out], r"layer 'backbone.2': widths \(2, 3\)")
    assert not os.path.exists(out)  # nothing written for a refused file


def test_command_line_exit_status(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gsm_lightning.report", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "gsm_lightning.report: error:" in proc.stderr and "bad.ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr
