"""LightningDataModules for the GSM experiments.

Every module takes ``batch_size``, ``num_workers`` (default 0), ``seed`` and ``pin_memory``; ``setup``
is idempotent; anything that touches the network happens in ``prepare_data`` (rank 0 under DDP) while
``setup`` only reads local files.  The training loader is a :class:`ResumableDataLoader` over an
:class:`EpochSeededSampler`: its order depends on the seed and the epoch only, and Lightning checkpoints its place in
the epoch, so a run resumed from a mid-epoch checkpoint sees the same batches.  Vision batches are ``(images, labels)``; language-model batches are
``(input_ids, labels)`` with ``labels`` already shifted by one token (``labels[:, t]`` is the target of
``logits[:, t]``), so one loss ``cross_entropy(logits.flatten(0, -2), labels.flatten())`` serves both.

* :class:`DigitsDataModule` - scikit-learn's bundled 8x8 digits (offline, tiny, real).
* :class:`FashionMNISTDataModule` - reads the idx(.gz) files directly (Debian ``dataset-fashion-mnist``).
* :class:`CIFARDataModule` - torchvision CIFAR-10/100 with the usual crop/flip augmentation.
* :class:`ImageFolderDataModule` - ImageNet layout (``train/<class>/*``, ``val/<class>/*``), timm-like transforms.
* :class:`WikiText103DataModule` - raw WikiText-103 text, a HF tokenizer (or ``"char"``), blocks of ``block_size``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

__all__ = [
    "DigitsDataModule", "FashionMNISTDataModule", "CIFARDataModule", "ImageFolderDataModule", "WikiText103DataModule",
    "CharTokenizer", "read_idx", "read_idx_header", "DEFAULT_FASHION_MNIST_ROOT", "EpochSeededSampler",
    "ResumableDataLoader",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # training-set pixel statistics in [0, 1]
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_optional_int(name: str, value: Any, minimum: int = 1) -> None:
    if value is not None:
        _check_int(name, value, minimum)


def _seeded_perm(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _limit(n_available: int, subset: int | None, name: str) -> int:
    if subset is None:
        return n_available
    if subset > n_available:
        raise ValueError(f"{name}={subset} exceeds the {n_available} samples available")
    return subset


class EpochSeededSampler(Sampler[int]):
    """Random permutation drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` at every epoch start, also after resuming from a checkpoint, so a
    resumed run sees the same batches as an uninterrupted one (a DataLoader ``generator`` would restart
    from its seed instead).  Under DDP, Lightning wraps it in a distributed sampler."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(_seeded_perm(self.n, self.seed + self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


def _sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch of the loader's (batch) sampler if it has one (``set_epoch`` samplers), else ``None``."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        epoch = getattr(sampler, "epoch", None)
        if isinstance(epoch, int):
            return epoch
    return None


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    seen: set[int] = set()
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and id(sampler) not in seen and callable(getattr(sampler, "set_epoch", None)):
            seen.add(id(sampler))
            sampler.set_epoch(epoch)


class _ResumeIndexSampler:
    """The loader's index (batch) sampler, minus the batches a restored state says were already consumed.

    The skip is decided when the index iterator is first advanced, so that Lightning's ``set_epoch`` (called after
    the iterator is created, before the first batch) is seen: a pending position of epoch ``e`` is skipped only if
    the sampler is still at epoch ``e`` (a mid-epoch resume), not at ``e + 1`` (a resume at the end of an epoch)."""

    def __init__(self, loader: ResumableDataLoader, base: Any) -> None:
        self.loader, self.base = loader, base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Any]:
        pending, self.loader._pending = self.loader._pending, None
        return self._indices(pending)

    def _indices(self, pending: tuple[int | None, int] | None) -> Iterator[Any]:
        it = iter(self.base)
        if pending is not None:
            epoch, position = pending
            if epoch is None or _sampler_epoch(self.loader) in (None, epoch):
                for _ in range(position):
                    if next(it, _END) is _END:
                        return
                self.loader._position = position
        yield from it


_END = object()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose place in the epoch is saved in Lightning checkpoints and restored on resume.

    Lightning checkpoints the state of a training loader that has ``state_dict``/``load_state_dict`` (it warns
    "your dataloader is not resumable" otherwise and restarts the epoch from its first batch, so a mid-epoch
    resume trains on other batches than the uninterrupted run).  This loader records ``{"epoch", "batches"}``:
    the epoch of its sampler (a ``set_epoch`` sampler such as :class:`EpochSeededSampler`, whose order depends
    on the seed and the epoch only) and how many batches of that epoch it has handed out.  After
    ``load_state_dict`` the next pass sets the sampler to that epoch and skips those batches at the index level
    (no data is loaded for them).  A state saved at the end of an epoch resumes with the next epoch.

    With Lightning's DDP sampler injection the loader is re-created with the same arguments (the state then
    counts this rank's batches).  Limitation: with ``num_workers > 0`` and ``limit_train_batches`` below the
    epoch length, resume from an end-of-epoch checkpoint (not mid-epoch) would skip into the next epoch, as the
    workers fetch their first indices before Lightning sets the epoch: checkpoint mid-epoch or use full epochs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = 0  # batches of the current pass handed out (including any skipped on resume)
        self._pending: tuple[int | None, int] | None = None

    @property
    def _index_sampler(self) -> Any:
        return _ResumeIndexSampler(self, super()._index_sampler)

    def __iter__(self) -> Iterator[Any]:
        self._position = 0
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": _sampler_epoch(self), "batches": int(self._position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = state.get("epoch"), int(state.get("batches", 0))
        if position >= len(self):  # the epoch was complete: the next pass is a new epoch from its first batch
            if epoch is not None:
                _set_epoch(self, epoch + 1)
            self._pending = None
            return
        if epoch is not None:
            _set_epoch(self, epoch)  # before any eager (multi-worker) iterator draws its first indices
        self._pending = (epoch, position)


class _CountingIterator:
    """Counts the batches a :class:`ResumableDataLoader` pass hands out."""

    def __init__(self, loader: ResumableDataLoader, inner: Iterator[Any]) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._position += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)


class _BaseDataModule(LightningDataModule):
    """Shared loader logic; subclasses fill ``train_set``/``val_set``/``test_set`` in ``setup``."""

    def __init__(self, batch_size: int, num_workers: int, seed: int, pin_memory: bool) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        self.batch_size, self.num_workers, self.seed, self.pin_memory = batch_size, num_workers, seed, bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before {split}_dataloader()")
        # The training loader is resumable: Lightning saves its place in the epoch, so a mid-epoch resume is exact.
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (``trainer.predict`` / ``gsm-lightning predict``): batches are
        ``(inputs, targets)``; :meth:`GSMModule.predict_step` returns the logits of the inputs."""
        return self._loader(self.test_set, "predict", shuffle=False)


# ------------------------------------------------------------------------------------------ digits


class DigitsDataModule(_BaseDataModule):
    """scikit-learn's bundled handwritten digits: 1797 real 8x8 grey images, 10 classes, no download.

    Images are ``(1, image_size, image_size)`` float tensors: pixel/16, standardised with the training
    split's mean and std, bilinearly upscaled when ``image_size > 8``.  The train/val/test split is a
    seeded random permutation (``test_fraction`` and ``val_fraction`` of the samples).
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, image_size: int = 8) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac < 1:
                raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        _check_int("image_size", image_size, 8)
        self.val_fraction, self.test_fraction, self.image_size = float(val_fraction), float(test_fraction), image_size
        self.mean: float | None = None
        self.std: float | None = None
        self.split_indices: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
        y = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(y)
        perm = _seeded_perm(n, self.seed)
        n_test, n_val = round(self.test_fraction * n), round(self.val_fraction * n)
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}  # rows of load_digits()
        self.mean, self.std = float(x[train_idx].mean()), float(x[train_idx].std())
        x = ((x - self.mean) / self.std).unsqueeze(1)
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


# ----------------------------------------------------------------------------------- idx / Fashion-MNIST

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _parse_idx_header(head: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or not 1 <= head[3] <= 4:
        raise ValueError(f"{path} is not an idx file: bad magic number {head[:4].hex() or '(empty file)'} "
                         "(expected 0x0000 then a type code 08/09/0B-0E and 1-4 dimensions)")
    ndim = head[3]
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise ValueError(f"{path} is truncated: its idx header declares {ndim} dimensions but the file ends after "
                         f"{len(head)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(head[4:header_len], dtype=">u4"))
    return _IDX_DTYPES[head[2]], dims, header_len


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, dims) from the header of an idx file (``.gz`` or plain), without reading the data."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4 + 4 * 4)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt idx file {path}: {type(e).__name__}: {e}") from e
    dtype, dims, _ = _parse_idx_header(head, path)
    return dtype, dims


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) into an array of the declared dtype and shape.

    Raises ``ValueError`` naming the file when it is not valid gzip, has a bad magic number, or
    holds a different number of bytes than its header declares (truncated or corrupt)."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt or truncated idx file {path}: {type(e).__name__}: {e}") from e
    dtype, dims, header_len = _parse_idx_header(data, path)
    expected = int(np.prod(dims)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        raise ValueError(f"corrupt or truncated idx file {path}: header declares dims {dims} ({expected} data bytes) "
                         f"but the file holds {got} data bytes")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims).astype(dtype.newbyteorder("="))


_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_INSTALL = ("install it with `apt-get install dataset-fashion-mnist` (files in "
                    f"{DEFAULT_FASHION_MNIST_ROOT}) or pass root=<folder holding the idx files, or a torchvision root "
                    "with FashionMNIST/raw/>")


def _find_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist_files(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST idx files under ``root`` (default the Debian location), looking in
    ``root``, ``root/FashionMNIST/raw`` and ``root/raw``.  ``FileNotFoundError`` says where it looked."""
    root_path = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST root {str(root_path)!r} does not exist; {_FASHION_INSTALL}")
    candidates = [root_path, root_path / "FashionMNIST" / "raw", root_path / "raw"]
    for folder in candidates:
        found = {key: _find_in(folder, stem) for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    raise FileNotFoundError(
        f"Fashion-MNIST idx files ({', '.join(s + '[.gz]' for s in _FASHION_FILES.values())}) not found in any of "
        f"{', '.join(str(c) for c in candidates)}; {_FASHION_INSTALL}"
    )


class _GreyImages(Dataset):
    """uint8 images ``(N, H, W)`` + labels -> normalised ``(1, S, S)`` floats, optional crop/flip augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, mean: float, std: float, augment: bool, pad: int,
                 image_size: int) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std, self.augment, self.pad, self.image_size = mean, std, augment, pad, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].to(torch.float32).div_(255.0).unsqueeze(0)  # (1, H, W) in [0, 1]
        if self.augment:
            h, w = x.shape[-2:]
            if self.pad:
                x = F.pad(x, (self.pad,) * 4)  # black border, as torchvision's RandomCrop(padding=...)
                top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
                x = x[:, top:top + h, left:left + w]
            if bool(torch.rand(()) < 0.5):
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False).squeeze(0)
        return x, self.labels[i]


class FashionMNISTDataModule(_BaseDataModule):
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) read straight from the idx(.gz) files.

    ``root`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``); a
    torchvision root (``root/FashionMNIST/raw``) also works.  ``val_size`` training images (seeded) form
    the validation set; ``*_subset`` limit each split for quick runs (seeded random subsets).  Images are
    normalised with the training mean/std; ``augment`` adds random crops (``pad``) and horizontal flips.
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, root: str | None = None, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool = False, val_size: int = 5000, train_subset: int | None = None,
                 val_subset: int | None = None, test_subset: int | None = None, augment: bool = False, pad: int = 2,
                 image_size: int = 28) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
        _check_int("val_size", val_size, 0)
        _check_int("pad", pad, 0)
        _check_int("image_size", image_size, 1)
        for name, v in (("train_subset", train_subset), ("val_subset", val_subset), ("test_subset", test_subset)):
            _check_optional_int(name, v)
        if val_size == 0 and val_subset is not None:
            raise ValueError("val_subset needs val_size > 0")
        self.root = root
        self.val_size, self.augment, self.pad, self.image_size = val_size, bool(augment), pad, image_size
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self.mean, self.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD

    def prepare_data(self) -> None:
        find_fashion_mnist_files(self.root)  # fail early, on one rank, with a clear message

    @staticmethod
    def _load_pair(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{labels_path}: expected {len(images)} labels matching {images_path.name}, got shape {labels.shape}")
        if labels.size and int(labels.max()) >= 10:
            raise ValueError(f"{labels_path}: labels must be in 0..9, found {int(labels.max())}")
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = find_fashion_mnist_files(self.root)
        x_train, y_train = self._load_pair(files["train_images"], files["train_labels"])
        x_test, y_test = self._load_pair(files["test_images"], files["test_labels"])
        if self.val_size >= len(y_train):
            raise ValueError(f"val_size={self.val_size} must be smaller than the {len(y_train)} training images")
        perm = _seeded_perm(len(y_train), self.seed)
        val_idx, train_idx = perm[:self.val_size], perm[self.val_size:]
        train_idx = train_idx[:_limit(len(train_idx), self.train_subset, "train_subset")]
        val_idx = val_idx[:_limit(len(val_idx), self.val_subset, "val_subset")]
        if self.test_subset is None:
            test_idx = torch.arange(len(y_test))
        else:
            test_idx = _seeded_perm(len(y_test), self.seed + 1)[:_limit(len(y_test), self.test_subset, "test_subset")]

        def make(x: Tensor, y: Tensor, idx: Tensor, augment: bool) -> _GreyImages:
            return _GreyImages(x[idx], y[idx], self.mean, self.std, augment, self.pad, self.image_size)

        self.train_set = make(x_train, y_train, train_idx, self.augment)
        self.val_set = make(x_train, y_train, val_idx, False) if self.val_size else None
        self.test_set = make(x_test, y_test, test_idx, False)

    def val_dataloader(self) -> DataLoader:
        if self.val_size == 0 and self.test_set is not None:
            return self.test_dataloader()  # no carved validation set: validate on the test split
        return super().val_dataloader()


# ------------------------------------------------------------------------------------------- CIFAR


class CIFARDataModule(_BaseDataModule):
    """CIFAR-10/100 via torchvision (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).

    ``prepare_data`` downloads when the data is absent and ``download`` is true (a clear ``RuntimeError``
    when that fails, e.g. offline); ``setup`` only reads.  Training augmentation: RandomCrop(32, pad 4)
    and horizontal flip; all splits are normalised with the dataset's channel mean/std.  ``val_size``
    training images (seeded) form the validation set; with ``val_size=0`` (default, as in the paper's
    reports) validation uses the test split.
    """

    in_chans = 3
    image_size = 32

    def __init__(self, root: str = "data/cifar", num_classes: int = 10, download: bool = True, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False, val_size: int = 0, augment: bool = True,
                 train_subset: int | None = None, val_subset: int | None = None, test_subset: int | None = None) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
        if num_classes not in CIFAR_STATS:
            raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
        _check_int("val_size", val_size, 0)
        for name, v in (("train_subset", train_subset), ("val_subset", val_subset), ("test_subset", test_subset)):
            _check_optional_int(name, v)
        if val_size == 0 and val_subset is not None:
            raise ValueError("val_subset needs val_size > 0 (with val_size=0 validation uses the test split)")
        self.root, self.num_classes, self.download, self.val_size, self.augment = root, num_classes, bool(download), val_size, bool(augment)
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self.mean, self.std = CIFAR_STATS[num_classes]

    @property
    def _dataset_cls(self) -> type:
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.num_classes == 10 else CIFAR100

    @property
    def _name(self) -> str:
        return f"CIFAR-{self.num_classes}"

    def _offline_help(self) -> str:
        cls = self._dataset_cls
        return (f"To provide it offline: on a machine with internet download {cls.url}, then either extract it into "
                f"{self.root} (giving {os.path.join(self.root, cls.base_folder)}/) or copy the {cls.filename} archive "
                f"into {self.root} (it is checked and extracted without downloading), and use download=False")

    def _present(self) -> bool:
        try:
            self._dataset_cls(self.root, train=False, download=False)  # checks the md5 of every file
        except RuntimeError:
            return False
        return True

    def prepare_data(self) -> None:
        if self._present():
            return
        where = os.path.join(self.root, self._dataset_cls.base_folder)
        if not self.download:
            raise RuntimeError(f"{self._name} not found (or corrupt) in {where} and download=False. {self._offline_help()}")
        try:
            self._dataset_cls(self.root, train=True, download=True)
        except Exception as e:
            raise RuntimeError(f"{self._name} download failed ({type(e).__name__}: {e}); looked for the data in {where}. "
                               f"{self._offline_help()}") from e

    def _transforms(self, train: bool) -> Callable:
        from torchvision import transforms as T

        tail = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if train and self.augment:
            return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *tail])
        return T.Compose(tail)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cls = self._dataset_cls
        try:
            train_aug = cls(self.root, train=True, transform=self._transforms(True))
            test = cls(self.root, train=False, transform=self._transforms(False))
        except RuntimeError as e:
            where = os.path.join(self.root, cls.base_folder)
            raise RuntimeError(f"{self._name} not found (or corrupt) in {where}; run prepare_data() with download=True "
                               f"(the Trainer does) or provide the files. {self._offline_help()}") from e
        n = len(train_aug)
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} must be smaller than the {n} training images")
        perm = _seeded_perm(n, self.seed)
        val_idx, train_idx = perm[:self.val_size], perm[self.val_size:]
        train_idx = train_idx[:_limit(len(train_idx), self.train_subset, "train_subset")]
        self.train_set = Subset(train_aug, train_idx.tolist())
        if self.val_size:
            train_eval = cls(self.root, train=True, transform=self._transforms(False))
            self.val_set = Subset(train_eval, val_idx[:_limit(len(val_idx), self.val_subset, "val_subset")].tolist())
        test_idx = _seeded_perm(len(test), self.seed + 1)[:_limit(len(test), self.test_subset, "test_subset")]
        self.test_set = test if self.test_subset is None else Subset(test, test_idx.tolist())
        if not self.val_size:
            self.val_set = self.test_set


# ------------------------------------------------------------------------------------ ImageFolder


class ImageFolderDataModule(_BaseDataModule):
    """ImageNet-style folders ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    Train: RandomResizedCrop(image_size, scale=(min_scale, 1)) + horizontal flip; val/test:
    Resize(image_size / crop_pct) + CenterCrop(image_size); both normalised with ``mean``/``std``
    (ImageNet statistics by default).  The test split is the val folder.  ``num_classes`` is the
    number of class folders in ``train``.
    """

    in_chans = 3

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool = False, train_dir: str = "train", val_dir: str = "val", crop_pct: float = 0.875,
                 min_scale: float = 0.08, interpolation: str = "bicubic", mean: list[float] | None = None,
                 std: list[float] | None = None, train_subset: int | None = None, val_subset: int | None = None) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
        _check_int("image_size", image_size, 1)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}")
        for name, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {stats!r}")
        for name, v in (("train_subset", train_subset), ("val_subset", val_subset)):
            _check_optional_int(name, v)
        self.root, self.image_size, self.train_dir, self.val_dir = root, image_size, train_dir, val_dir
        self.crop_pct, self.min_scale, self.interpolation = float(crop_pct), float(min_scale), interpolation
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        self.train_subset, self.val_subset = train_subset, val_subset
        self.classes: list[str] | None = None

    def _folders(self) -> tuple[Path, Path]:
        root = Path(self.root).expanduser()
        train, val = root / self.train_dir, root / self.val_dir
        missing = [str(p) for p in (train, val) if not p.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageFolderDataModule: missing folder(s) {', '.join(missing)}; expected the ImageNet layout "
                f"{root}/{self.train_dir}/<class>/<images> and {root}/{self.val_dir}/<class>/<images> (the official "
                "ImageNet val images must first be sorted into class folders)"
            )
        return train, val

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            train, _ = self._folders()
            return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        return len(self.classes)

    def prepare_data(self) -> None:
        self._folders()

    def _transforms(self, train: bool) -> Callable:
        from torchvision import transforms as T

        interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}[self.interpolation]
        tail = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if train:
            return T.Compose([T.RandomResizedCrop(self.image_size, scale=(self.min_scale, 1.0), interpolation=interp),
                              T.RandomHorizontalFlip(), *tail])
        resize = int(self.image_size / self.crop_pct + 0.5)  # floor(size / crop_pct), rounded
        return T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(self.image_size), *tail])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.datasets import ImageFolder

        train_dir, val_dir = self._folders()
        try:
            train = ImageFolder(str(train_dir), transform=self._transforms(True))
            val = ImageFolder(str(val_dir), transform=self._transforms(False))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"ImageFolderDataModule: {e} (expected one sub-folder per class with images)") from e
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))[:5]
            only_val = sorted(set(val.classes) - set(train.classes))[:5]
            raise ValueError(f"class folders differ between {train_dir} and {val_dir} (e.g. only in train: {only_train}, "
                             f"only in val: {only_val})")
        self.classes = list(train.classes)
        train_idx = _seeded_perm(len(train), self.seed)[:_limit(len(train), self.train_subset, "train_subset")]
        self.train_set = train if self.train_subset is None else Subset(train, train_idx.tolist())
        val_idx = _seeded_perm(len(val), self.seed + 1)[:_limit(len(val), self.val_subset, "val_subset")]
        self.val_set = val if self.val_subset is None else Subset(val, val_idx.tolist())
        self.test_set = self.val_set


# ------------------------------------------------------------------------------------- WikiText-103


class CharTokenizer:
    """Character-level tokenizer: id 0 is ``<unk>``, ids 1.. are the sorted characters of a training text.

    Meant for tests and offline demos; ``encode`` is vectorised (no Python loop over characters)."""

    def __init__(self, chars: str) -> None:
        codes = np.unique(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32))
        self.codes = codes  # sorted unique code points; id = 1 + index
        self.vocab_size = len(codes) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chars(self) -> str:
        return self.codes.astype("<u4").tobytes().decode("utf-32-le")

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of the characters of ``text`` (0 for characters outside the vocabulary)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if not len(self.codes):
            return np.zeros(len(cps), dtype=np.int32)
        pos = np.searchsorted(self.codes, cps).clip(max=len(self.codes) - 1)
        return np.where(self.codes[pos] == cps, pos + 1, 0).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray | Tensor) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        out = np.where(ids > 0, self.codes[np.maximum(ids - 1, 0)], ord("\N{REPLACEMENT CHARACTER}")).astype("<u4")
        return out.tobytes().decode("utf-32-le")


class _LMBlocks(Dataset):
    """Non-overlapping blocks: item ``i`` is ``(ids[iB : iB+B], ids[iB+1 : iB+B+1])`` as int64 tensors."""

    def __init__(self, ids: np.ndarray, block_size: int, name: str) -> None:
        self.ids, self.block_size = ids, block_size
        self.num_blocks = (len(ids) - 1) // block_size
        if self.num_blocks < 1:
            raise ValueError(f"the {name} split has {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        start = i * self.block_size
        chunk = torch.from_numpy(np.asarray(self.ids[start:start + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class WikiText103DataModule(_BaseDataModule):
    """WikiText-103 for causal LM: raw text -> tokenizer -> one token stream per split -> blocks.

    Files: ``wiki.{train,valid,test}.raw`` (``variant="raw"``) or ``wiki.{...}.tokens`` (``"tokens"``),
    looked up in ``root``, ``root/wikitext-103-raw`` and ``root/wikitext-103``; ``"auto"`` prefers raw.
    ``tokenizer``: a HF hub name (``"gpt2"``, from the HF cache; downloading needs internet), a local
    tokenizer directory, a ``tokenizer.json`` file, or ``"char"`` (:class:`CharTokenizer` built from the
    training text).  Lines are tokenised separately (newlines kept) and concatenated, as HF's run_clm.
    Token ids are cached as ``.npy`` in ``cache_dir`` (default ``~/.cache/gsm_lightning/wikitext``) by
    ``prepare_data``; ``setup`` memory-maps them.  Batches: ``(input_ids, labels)`` of shape
    ``(B, block_size)``, labels shifted by one.  ``train_subset`` picks seeded random blocks;
    ``val_subset``/``test_subset`` the first blocks.
    """

    SPLITS = ("train", "valid", "test")

    def __init__(self, root: str, tokenizer: str = "gpt2", block_size: int = 1024, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False, variant: str = "auto",
                 cache_dir: str | None = None, use_cache: bool = True, local_files_only: bool = False,
                 train_subset: int | None = None, val_subset: int | None = None, test_subset: int | None = None) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
        _check_int("block_size", block_size, 1)
        if variant not in ("auto", "raw", "tokens"):
            raise ValueError(f"variant must be 'auto', 'raw' or 'tokens', got {variant!r}")
        for name, v in (("train_subset", train_subset), ("val_subset", val_subset), ("test_subset", test_subset)):
            _check_optional_int(name, v)
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be a non-empty string, got {tokenizer!r}")
        self.root, self.tokenizer_name, self.block_size, self.variant = root, tokenizer, block_size, variant
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gsm_lightning", "wikitext")
        self.use_cache, self.local_files_only = bool(use_cache), bool(local_files_only)
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self._tokenizer: Any = None
        self._tokenizer_key: str | None = None

    # ---- files
    def files(self) -> dict[str, Path]:
        """Paths of the three split files (``FileNotFoundError`` says where it looked)."""
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"WikiText-103 root {str(root)!r} does not exist; it must hold wiki.train.raw, "
                                    "wiki.valid.raw, wiki.test.raw (or the .tokens files) from wikitext-103-raw-v1.zip")
        folders = [root, root / "wikitext-103-raw", root / "wikitext-103"]
        exts = {"auto": ("raw", "tokens"), "raw": ("raw",), "tokens": ("tokens",)}[self.variant]
        for ext in exts:
            for folder in folders:
                paths = {s: folder / f"wiki.{s}.{ext}" for s in self.SPLITS}
                if all(p.is_file() for p in paths.values()):
                    return paths
        names = " or ".join(f"wiki.{{train,valid,test}}.{e}" for e in exts)
        raise FileNotFoundError(f"WikiText-103 files {names} not found in any of {', '.join(map(str, folders))}")

    # ---- tokenizer
    def _load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        name = self.tokenizer_name
        if name == "char":
            train_path = self.files()["train"]
            vocab_cache = self._cache_path("charvocab", train_path, "vocab", ext=".json")
            if self.use_cache and vocab_cache.is_file():
                chars = json.loads(vocab_cache.read_text(encoding="utf-8"))["chars"]
            else:
                chars = CharTokenizer.from_text(train_path.read_text(encoding="utf-8")).chars
                if self.use_cache:
                    _atomic_write(vocab_cache, json.dumps({"chars": chars}).encode("utf-8"))
            self._tokenizer = CharTokenizer(chars)
            self._tokenizer_key = "char:" + hashlib.sha1(chars.encode("utf-8")).hexdigest()
            return
        try:
            if name.endswith(".json") and Path(name).expanduser().is_file():
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(name).expanduser()))
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(name, local_files_only=self.local_files_only)
        except Exception as e:
            raise RuntimeError(
                f"could not load the tokenizer {name!r} ({type(e).__name__}: {e}). A hub name needs internet or the "
                "Hugging Face cache (HF_HOME); offline, pass tokenizer=<local folder saved with save_pretrained, or a "
                "tokenizer.json file>, or tokenizer='char'"
            ) from e
        self._tokenizer = tok
        self._tokenizer_key = f"hf:{getattr(tok, 'name_or_path', name)}:{len(tok)}"

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (a HF tokenizer or a :class:`CharTokenizer`), loaded on first use."""
        self._load_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode(self, text: str) -> np.ndarray:
        tok = self.tokenizer
        if isinstance(tok, CharTokenizer):
            return tok.encode(text)
        lines = text.splitlines(keepends=True)
        parts: list[np.ndarray] = []
        step = 20000
        for i in range(0, len(lines), step):
            enc = tok(lines[i:i + step], add_special_tokens=False, verbose=False)["input_ids"]
            parts.extend(np.asarray(ids, dtype=np.int32) for ids in enc if len(ids))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    # ---- cache
    def _cache_path(self, kind: str, path: Path, key: str, ext: str = ".npy") -> Path:
        st = path.stat()
        ident = json.dumps([kind, str(path.resolve()), st.st_size, st.st_mtime_ns, key])
        return Path(self.cache_dir) / f"{path.name}.{hashlib.sha1(ident.encode()).hexdigest()[:16]}{ext}"

    def _token_ids(self, split: str) -> np.ndarray:
        self._load_tokenizer()
        path = self.files()[split]
        cache = self._cache_path("ids", path, str(self._tokenizer_key))
        if self.use_cache and cache.is_file():
            return np.load(cache, mmap_mode="r")
        ids = self._encode(path.read_text(encoding="utf-8"))
        if self.use_cache:
            _atomic_write_npy(cache, ids)
        return ids

    def prepare_data(self) -> None:
        self.files()
        self._load_tokenizer()
        if self.use_cache:
            for split in self.SPLITS:
                self._token_ids(split)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ids = {s: self._token_ids(s) for s in self.SPLITS}
        train = _LMBlocks(ids["train"], self.block_size, "train")
        val = _LMBlocks(ids["valid"], self.block_size, "valid")
        test = _LMBlocks(ids["test"], self.block_size, "test")
        if self.train_subset is not None:
            idx = _seeded_perm(len(train), self.seed)[:_limit(len(train), self.train_subset, "train_subset")]
            self.train_set = Subset(train, idx.tolist())
        else:
            self.train_set = train
        self.val_set = val if self.val_subset is None else Subset(val, range(_limit(len(val), self.val_subset, "val_subset")))
        self.test_set = (test if self.test_subset is None
                         else Subset(test, range(_limit(len(test), self.test_subset, "test_subset"))))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
