"""Data modules: real digits and Fashion-MNIST, error messages, fake CIFAR / ImageFolder / WikiText on tmp files."""

from __future__ import annotations

import gzip
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from gsm_lightning.data import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    CharTokenizer,
    CIFARDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    WikiText103DataModule,
    read_idx,
    read_idx_header,
)

FASHION = Path(DEFAULT_FASHION_MNIST_ROOT)
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# ------------------------------------------------------------------------------------------ digits


def test_digits_full_splits_shapes_and_normalisation():
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")  # idempotent
    assert dm.train_set is train_set
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == round(0.15 * 1797)
    idx = torch.cat(list(dm.split_indices.values()))
    assert sorted(idx.tolist()) == list(range(1797))  # disjoint and complete
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    xs, ys = dm.train_set.tensors
    assert abs(float(xs.mean())) < 1e-5 and abs(float(xs.std()) - 1) < 1e-3
    assert set(ys.tolist()) == set(range(10)) and dm.num_classes == 10
    # the tensors are the real digits: un-normalising gives the integer 0..16 grid
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[dm.split_indices["train"][:5].numpy()], dtype=torch.float32)
    back = (xs[:5, 0] * dm.std + dm.mean) * 16
    torch.testing.assert_close(back, raw, atol=1e-4, rtol=0)


def test_digits_seed_and_upscale():
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2, image_size=16)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.split_indices["test"], b.split_indices["test"])
    assert not torch.equal(a.split_indices["test"], c.split_indices["test"])
    x, _ = c.val_set[0]
    assert x.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# ----------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_headers_and_normalisation_constants():
    for stem, n in (("train", 60000), ("t10k", 10000)):
        dtype, dims = read_idx_header(FASHION / f"{stem}-images-idx3-ubyte.gz")
        assert dtype == np.uint8 and dims == (n, 28, 28)
        assert read_idx_header(FASHION / f"{stem}-labels-idx1-ubyte.gz")[1] == (n,)
    counts = np.bincount(read_idx(FASHION / "train-images-idx3-ubyte.gz").ravel(), minlength=256)  # exact histogram
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert abs(mean - FASHION_MNIST_MEAN) < 1e-3 and abs(std - FASHION_MNIST_STD) < 1e-3


@needs_fashion
def test_fashion_subset_shapes_labels_and_determinism():
    kw = dict(batch_size=64, val_size=1000, train_subset=512, val_subset=200, test_subset=300, seed=3)
    dm = FashionMNISTDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (512, 200, 300)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.min() >= 0 and y.max() <= 9
    xv = torch.stack([dm.val_set[i][0] for i in range(200)])
    assert abs(float(xv.mean())) < 0.2 and abs(float(xv.std()) - 1) < 0.2  # normalised
    dm2 = FashionMNISTDataModule(**kw)
    dm2.setup()
    assert torch.equal(dm2.val_set[7][0], dm.val_set[7][0]) and dm2.test_set[5][1] == dm.test_set[5][1]


@needs_fashion
def test_fashion_full_sizes_augmentation_and_torchvision_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION.glob("*.gz"):
        (raw / f.name).symlink_to(f)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5000, augment=True, image_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    torch.manual_seed(0)
    draws = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert draws.shape == (8, 1, 32, 32) and not all(torch.equal(draws[0], d) for d in draws[1:])  # random crops/flips
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # no augmentation outside training


def test_fashion_missing_root_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        FashionMNISTDataModule(root=str(missing)).setup()
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found in any of") as err:
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = head + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_read_idx_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", arr)
    _write_idx(tmp_path / "ok", arr)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), arr) and np.array_equal(read_idx(tmp_path / "ok"), arr)
    i32 = np.array([1, -2, 70000], dtype=">i4")
    _write_idx(tmp_path / "i32", i32, code=0x0C)
    assert read_idx(tmp_path / "i32").tolist() == [1, -2, 70000]
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="bad magic number") as err:
        read_idx(tmp_path / "magic")
    assert "magic" in str(err.value)
    data = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(data[:-5]))  # valid gzip, payload too short
    with pytest.raises(ValueError, match=r"short\.gz.*declares dims \(2, 3, 4\)"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        read_idx(tmp_path / "empty")


@needs_fashion
def test_fashion_truncated_gz_names_the_file(tmp_path):
    for f in FASHION.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])  # truncated download
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        dm.setup()


# ------------------------------------------------------------------------------------------- CIFAR


def test_cifar_offline_download_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    dm = CIFARDataModule(root=str(tmp_path), num_classes=10, download=True)
    with pytest.raises(RuntimeError, match="CIFAR-10 download failed") as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg and "offline" in msg
    with pytest.raises(RuntimeError, match="download=False"):
        CIFARDataModule(root=str(tmp_path), num_classes=100, download=False).prepare_data()
    with pytest.raises(RuntimeError, match="not found"):
        CIFARDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="num_classes"):
        CIFARDataModule(root=str(tmp_path), num_classes=20)


def _fake_cifar10(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar_pipeline_on_fake_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fake files: other md5 sums
    dm = CIFARDataModule(root=str(tmp_path), download=False, val_size=30, batch_size=16, seed=0)
    dm.prepare_data()  # data present: nothing to download
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (70, 30, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and int(y.max()) < 10
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # eval transform on the carved val split
    torch.manual_seed(0)
    assert not all(torch.equal(dm.train_set[0][0], dm.train_set[0][0]) for _ in range(5))  # crop/flip
    # normalisation: the eval image equals (pixels/255 - mean)/std
    raw = torch.as_tensor(dm.test_set.data[0], dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(dm.test_set[0][0], (raw - mean) / std)
    dm0 = CIFARDataModule(root=str(tmp_path), download=False)
    dm0.setup()
    assert dm0.val_set is dm0.test_set


# ------------------------------------------------------------------------------------- ImageFolder


def _fake_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
    _fake_image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=4)
    assert dm.num_classes == 3  # known before setup, from the folder names
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.max() < 3
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32)
    assert dm.classes == ["cat", "dog", "eel"] and dm.test_set is dm.val_set


def test_image_folder_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"missing folder\(s\).*val") as err:
        ImageFolderDataModule(root=str(tmp_path)).setup()
    assert "ImageNet layout" in str(err.value)
    shutil.rmtree(tmp_path / "train")
    _fake_image_folder(tmp_path, per_class=1)
    shutil.rmtree(tmp_path / "val" / "eel")
    with pytest.raises(ValueError, match="class folders differ"):
        ImageFolderDataModule(root=str(tmp_path), image_size=32).setup()


# ---------------------------------------------------------------------------------------- WikiText

TEXT = {
    "train": " = Valkyria Chronicles = \n\n The game began development in 2010 . \n It is a tactical role playing game . \n" * 6,
    "valid": " = Tower = \n The tower is tall . \n It was built in 1900 . \n" * 4,
    "test": " = Robert = \n Robert was a writer . \n He wrote many books about the game . \n" * 4,
}


def _write_wikitext(folder: Path, ext: str = "raw") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in TEXT.items():
        (folder / f"wiki.{split}.{ext}").write_text(text, encoding="utf-8")


def test_char_tokenizer_roundtrip():
    tok = CharTokenizer.from_text("hello wörld")
    ids = tok.encode("hello wörld!")
    assert ids.dtype == np.int32 and ids[-1] == 0 and (ids[:-1] > 0).all()  # '!' unseen -> <unk>
    assert tok.decode(ids[:-1]) == "hello wörld" and len(tok) == len(set("hello wörld")) + 1
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([len(tok)])


def test_wikitext_char_blocks_and_cache(tmp_path):
    _write_wikitext(tmp_path / "data" / "wikitext-103-raw")
    kw = dict(root=str(tmp_path / "data"), tokenizer="char", block_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm = WikiText103DataModule(**kw)
    dm.prepare_data()
    dm.setup()
    n_train = len(TEXT["train"])
    assert len(dm.train_set) == (n_train - 1) // 16
    x, y = dm.train_set[0]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])  # labels are the next tokens
    tok = dm.tokenizer
    joined = torch.cat([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert tok.decode(joined) == TEXT["train"][: len(joined)]
    assert dm.vocab_size == len(set(TEXT["train"])) + 1
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == yb.shape == (4, 16)
    assert len(list((tmp_path / "cache").glob("wiki.*.npy"))) == 3
    dm2 = WikiText103DataModule(**kw, train_subset=5, val_subset=2)  # loads from the cache
    dm2.setup()
    assert isinstance(dm2.train_set.dataset.ids, np.memmap)
    assert len(dm2.train_set) == 5 and len(dm2.val_set) == 2
    assert torch.equal(dm2.val_set[1][0], dm.val_set[1][0])


def test_wikitext_local_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _write_wikitext(tmp_path / "data", ext="tokens")
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXT["train"].splitlines(), trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    hf_tok.save_pretrained(tmp_path / "tok")
    backend.save(str(tmp_path / "tokenizer.json"))
    for name in (str(tmp_path / "tok"), str(tmp_path / "tokenizer.json")):
        dm = WikiText103DataModule(root=str(tmp_path / "data"), tokenizer=name, block_size=8, use_cache=False)
        dm.setup()
        expected = [i for line in TEXT["test"].splitlines(keepends=True) for i in hf_tok.encode(line)]
        assert len(dm.test_set) == (len(expected) - 1) // 8
        joined = torch.cat([dm.test_set[i][0] for i in range(len(dm.test_set))])
        assert joined.tolist() == expected[: len(joined)]
        x, y = dm.test_set[len(dm.test_set) - 1]
        k = 8 * (len(dm.test_set) - 1)
        assert x.tolist() == expected[k:k + 8] and y.tolist() == expected[k + 1:k + 9]
        assert dm.vocab_size == len(hf_tok)
        assert "[UNK]" in hf_tok.convert_ids_to_tokens(expected)  # 'Robert' etc. are not in the train vocab


def test_wikitext_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WikiText103DataModule(root=str(tmp_path / "missing"), tokenizer="char").setup()
    (tmp_path / "wiki.train.raw").write_text("abc")
    with pytest.raises(FileNotFoundError, match="wiki.{train,valid,test}.raw"):
        WikiText103DataModule(root=str(tmp_path), tokenizer="char", variant="raw").setup()
    _write_wikitext(tmp_path)
    dm = WikiText103DataModule(root=str(tmp_path), tokenizer="no-such-org/no-such-tokenizer", local_files_only=True,
                               use_cache=False)
    with pytest.raises(RuntimeError, match="(?s)could not load the tokenizer.*offline"):
        dm.setup()
    with pytest.raises(ValueError, match="fewer than block_size"):
        WikiText103DataModule(root=str(tmp_path), tokenizer="char", block_size=10_000, use_cache=False).setup()
    with pytest.raises(ValueError, match="variant"):
        WikiText103DataModule(root=str(tmp_path), variant="bpe")


def test_train_order_is_a_function_of_seed_and_epoch_only():
    """Resumed runs see the same batches: the train order depends on (seed, epoch), not on RNG history."""
    from gsm_lightning.data import DigitsDataModule, EpochSeededSampler

    dm = DigitsDataModule(batch_size=32, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededSampler)
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100)  # unrelated global RNG use must not matter
        orders.append(list(loader.sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == list(range(len(dm.train_set)))


# ------------------------------------------------------------------------------------------ predict
def _predict(dm, backbone, task: str = "classification", num_classes: int | None = 10) -> list:
    import lightning.pytorch as pl

    from gsm_lightning.training.module import GSMModule

    module = GSMModule(backbone, task=task, num_classes=num_classes, method="dense", budget=1.0)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_predict_batches=2)
    return trainer.predict(module, datamodule=dm)


@pytest.mark.parametrize("kind", ["digits", "fashion", "cifar", "image_folder", "wikitext"])
def test_predict_works_on_every_data_module(tmp_path, monkeypatch, kind):
    """trainer.predict (and `gsm-lightning predict`) returns the logits of the test inputs, in order."""
    from torch import nn

    if kind == "digits":
        dm, backbone, classes = DigitsDataModule(batch_size=16), nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10
    elif kind == "fashion":
        rng = np.random.default_rng(0)
        for split, n in (("train", 12), ("t10k", 6)):
            _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
        dm = FashionMNISTDataModule(root=str(tmp_path), val_size=2, batch_size=4)
        backbone, classes = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), 10
    elif kind == "cifar":
        import torchvision.datasets.cifar as tv_cifar

        _fake_cifar10(tmp_path)
        monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
        dm = CIFARDataModule(root=str(tmp_path), download=False, val_size=30, batch_size=4)
        backbone, classes = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), 10
    elif kind == "image_folder":
        _fake_image_folder(tmp_path)
        dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=4)
        backbone, classes = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), 3
    else:
        _write_wikitext(tmp_path / "data")
        dm = WikiText103DataModule(root=str(tmp_path / "data"), tokenizer="char", block_size=16, batch_size=4,
                                   use_cache=False)
        dm.prepare_data()
        backbone, classes = nn.Sequential(nn.Embedding(dm.vocab_size, 8), nn.Linear(8, dm.vocab_size)), dm.vocab_size
    task = "lm" if kind == "wikitext" else "classification"
    preds = _predict(dm, backbone, task=task, num_classes=classes if task == "classification" else None)
    assert len(preds) == 2
    first = next(iter(dm.test_dataloader()))[0]  # predict follows the test split, in order
    with torch.no_grad():
        expected = backbone(first)
    assert preds[0].shape == expected.shape and preds[0].shape[-1] == classes
    torch.testing.assert_close(preds[0], expected)
